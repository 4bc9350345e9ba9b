import json

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its process state in singletons; each test starts as a new interpreter would."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope='session')
def imagefolder(tmp_path_factory):
    """A tiny ImageNet-layout folder: train/ and val/, 4 classes, 12 and 5 JPEGs each, 48x40 px."""
    from helpers import write_imagefolder
    rng = np.random.default_rng(0)

    def image(c: int) -> np.ndarray:
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        pixels[:, :, c % 3] = 200 + c * 10  # a class-dependent colour
        return pixels
    return write_imagefolder(tmp_path_factory.mktemp('imagefolder'), {'train': 12, 'val': 5}, 4, image)


@pytest.fixture(scope='session')
def reference(tmp_path_factory):
    """One reference run (`helpers.RUN`, in this process), shared by the checkpoint, resume, kill and --eval tests:
    checkpoints at updates 3, 4, 6 and 8, its fitted teacher, student and EMA weights. Tests copy from it, never
    write into it (but for eval.json, which --eval writes next to a checkpoint)."""
    from helpers import RUN, main
    out = tmp_path_factory.mktemp('reference')
    main([*RUN, f'train.output_dir={out}'])
    return out


@pytest.fixture(scope='session')
def two_machines(teacher_file, tmp_path_factory):
    """`helpers.LAYOUT` on two "machines" of one process each (machine ranks 0 and 1 over 127.0.0.1, gloo): a global
    batch of 64, one micro-batch of 32 per process per update. Its trace (`SHAKE_VIT_TRACE`) lists the micro-batches
    each process trained. Shared by the layout, elastic-resume and two-process resume tests."""
    from helpers import LAYOUT, launch_machines
    out = tmp_path_factory.mktemp('two_machines')
    out.joinpath('machines').write_text(json.dumps([
        {'stdout': p.stdout, 'stderr': p.stderr} for p in launch_machines(
            [*LAYOUT, f'teacher.checkpoint={teacher_file}', f'train.output_dir={out}'],
            env={'SHAKE_VIT_TRACE': str(out / 'trace')})]))
    return out


@pytest.fixture(scope='session')
def accumulating(teacher_file, tmp_path_factory):
    """`helpers.LAYOUT` in one process accumulating two micro-batches of 32 per update: the same global batch and
    stream as `two_machines`, in this process, traced likewise."""
    from helpers import LAYOUT, main, traced
    out = tmp_path_factory.mktemp('accumulating')
    with traced(out / 'trace'):
        main([*LAYOUT, f'teacher.checkpoint={teacher_file}', 'train.grad_accum=2', f'train.output_dir={out}'])
    return out


@pytest.fixture(scope='session')
def teacher_file(reference):
    """The reference run's fitted test_byobnet teacher (10 digit classes, 32 px), for runs that need a teacher but
    do not test fitting one: `teacher.checkpoint=...` skips the fit."""
    return reference / 'teacher.safetensors'


@pytest.fixture(scope='session')
def coco(tmp_path_factory):
    """COCO's layout with the oddities a real file has (helpers.write_coco)."""
    from helpers import write_coco
    return write_coco(tmp_path_factory.mktemp('coco'))
