"""Helpers shared by the end-to-end tests: run train.py as a user would, in this process, or in one or two new ones.

`main(args)` runs `train.main(args)` here, which is what `python train.py ARGS` runs after the interpreter starts
(5 s of imports on this machine): every test uses it unless a process boundary is what it tests (two processes,
signals, a clean interpreter without shake_vit), and then uses `launch` or `python_train`.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]

# A student and teacher small enough for a CPU test; one teacher epoch and three updates per epoch.
TINY = [
    'model.kwargs.patch_size=8', 'model.kwargs.embed_dim=32', 'model.kwargs.depth=1', 'model.kwargs.num_heads=2',
    'teacher.name=test_byobnet', 'teacher.fit.epochs=1', 'train.epochs=1', 'train.max_updates_per_epoch=3',
    'train.log_interval=1', 'eval.batch_size=100',
]

# Every RNG consumer on: mixup/cutmix, random erasing, drop path, EMA; 4 updates per epoch, a checkpoint every 3.
RUN = [*TINY, 'train.epochs=2', 'train.max_updates_per_epoch=4', 'aug.mixup=0.8', 'aug.cutmix=1.0',
       'aug.re_prob=0.25', 'model.drop_path_rate=0.1', 'train.ema=true', 'train.ema_decay=0.9',
       'ckpt.interval_updates=3', 'ckpt.keep_last=10', 'train.batch_size=32']


# The layout tests' runs (tests/test_stream.py): `RUN` with one CPU thread per process, so that a layout changes
# nothing but the order in which gradients are summed.
LAYOUT = [*RUN, 'train.cpu_threads=1']


@contextlib.contextmanager
def traced(path: Path):
    """Runs in this process append the micro-batches they train to PATH.0 (engine.trace_hook)."""
    os.environ['SHAKE_VIT_TRACE'] = str(path)
    try:
        yield
    finally:
        del os.environ['SHAKE_VIT_TRACE']


def trace(path: Path) -> List[tuple]:
    """Every (epoch, micro-batch, update before it) a traced run's processes trained, sorted."""
    return sorted(tuple(map(int, line.split())) for f in path.parent.glob(f'{path.name}.*')
                  for line in f.read_text().splitlines())


def free_port() -> int:
    """A port nobody listens on, for the launcher's rendezvous: each launch gets its own instead of the default
    29500, which the previous launch may still hold."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launcher(num_processes: int) -> List[str]:
    """`accelerate launch` on the CPU: N processes (gloo) on its own port, no mixed precision, no dynamo."""
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--num_machines', '1', '--mixed_precision', 'no',
           '--dynamo_backend', 'no', '--num_processes', str(num_processes)]
    return cmd + (['--multi_gpu', '--main_process_port', str(free_port())] if num_processes > 1 else [])


def failure(cmd: Sequence[str], proc: subprocess.CompletedProcess) -> str:
    """What a failed launch printed: the tails, and every line of stderr that names an error (a process that aborts
    prints its reason long before the launcher's summary, which fills the tail)."""
    errors = [line for line in proc.stderr.splitlines()
              if any(w in line for w in ('Error', 'error:', 'what()', 'terminate', 'Abort', 'Exception'))]
    return (f'{" ".join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\nerror lines:\n' + '\n'.join(errors[:40])
            + f'\nstderr tail:\n{proc.stderr[-4000:]}')


def launch(args: Sequence[str], num_processes: int = 1, timeout: int = 600, check: bool = True,
           env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    """`accelerate launch [--multi_gpu --num_processes N] train.py ARGS` on the CPU, from the repository root."""
    cmd = [*launcher(num_processes), 'train.py', *args]
    full_env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1', **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(failure(cmd, proc))
    return proc


def launch_machines(args: Sequence[str], machines: int = 2, timeout: int = 600, env: Dict[str, str] = None
                    ) -> List[subprocess.CompletedProcess]:
    """`accelerate launch --num_machines N --machine_rank R --main_process_ip 127.0.0.1 ... train.py ARGS` for every
    machine rank R at once, one process per "machine", all on this host (gloo): what N nodes of one GPU run.
    Returns each machine's CompletedProcess, machine 0 first."""
    port = str(free_port())
    cmds = [[sys.executable, '-m', 'accelerate.commands.launch', '--num_machines', str(machines), '--machine_rank',
             str(rank), '--main_process_ip', '127.0.0.1', '--main_process_port', port, '--num_processes',
             str(machines), '--multi_gpu', '--mixed_precision', 'no', '--dynamo_backend', 'no', 'train.py', *args]
            for rank in range(machines)]
    full_env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1', **(env or {}))
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
             for cmd in cmds]
    done = []
    for cmd, proc in zip(cmds, procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    for cmd, proc in zip(cmds, done):
        if proc.returncode != 0:
            raise AssertionError(failure(cmd, proc))
    return done


def python_train(args: Sequence[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python train.py ARGS`: one process without the launcher."""
    cmd = [sys.executable, 'train.py', *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    if check and proc.returncode != 0:
        raise AssertionError(failure(cmd, proc))
    return proc


def main(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    """`train.main(ARGS)` in this process, with its stdout and stderr captured: a CompletedProcess as `python_train`
    returns. Accelerate's process state is reset first, as a new interpreter would have it."""
    from accelerate.state import AcceleratorState, GradientState

    import train
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(list(args))
    proc = subprocess.CompletedProcess(['train.py', *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f'train.main({" ".join(args)}) returned {code}\n{proc.stdout[-3000:]}\n'
                             f'{proc.stderr[-3000:]}')
    return proc


def assert_same_weights(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


def results(out: Path) -> dict:
    return json.loads((out / 'results.json').read_text())


def scalar_tags(out: Path) -> List[str]:
    """Every scalar tag in the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for events in out.rglob('events.out.tfevents.*'):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags.update(acc.Tags()['scalars'])
    return sorted(tags)


def write_imagefolder(root: Path, counts: Dict[str, int], classes: int, image, quality: int = 90) -> Path:
    """ImageNet's layout: root/SPLIT/class_C/I.jpg, `counts[SPLIT]` JPEGs per class, each `image(c)` ([h, w, 3]
    uint8), drawn in split, class, image order."""
    from PIL import Image
    for split, count in counts.items():
        for c in range(classes):
            folder = root / split / f'class_{c}'
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(image(c)).save(folder / f'{i}.jpg', quality=quality)
    return root


def write_coco(root, categories=({'id': 1, 'name': 'cat'}, {'id': 3, 'name': 'dog'}), bad_category=False):
    """COCO's layout: annotations/instances_{train,val}2017.json, train2017/, val2017/. Train image 0 has a normal
    box, a crowd box, a box running out of the image and one of zero width; image 1 has no annotations."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / 'annotations').mkdir(parents=True)
    for split, n in (('train', 4), ('val', 3)):
        (root / f'{split}2017').mkdir()
        images, annotations = [], []
        for i in range(n):
            pixels = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
            pixels[10:30, 8:40] = 220
            Image.fromarray(pixels).save(root / f'{split}2017' / f'{i:03d}.png')
            images.append({'id': 100 + i, 'file_name': f'{i:03d}.png', 'height': 48, 'width': 64})
            if i == 1:
                continue
            boxes = [([8, 10, 32, 20], 1, 0)]
            if i == 0:
                boxes += [([0, 0, 20, 20], 3, 1), ([50, 30, 30, 30], 3, 0), ([10, 10, 0, 5], 1, 0)]
            for box, cat, crowd in boxes:
                annotations.append({'id': len(annotations) + 1, 'image_id': 100 + i, 'bbox': box, 'iscrowd': crowd,
                                    'category_id': 7 if bad_category else cat, 'area': box[2] * box[3],
                                    'segmentation': []})
        (root / 'annotations' / f'instances_{split}2017.json').write_text(json.dumps(
            {'images': images, 'annotations': annotations, 'categories': list(categories)}))
    return root
