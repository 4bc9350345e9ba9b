"""One input stream for any number of processes and machines (shake_vit/core/stream.py).

- The stream is the same in every layout: 1 process x 4 accumulation steps, 2 x 2 and 4 x 1 load the same samples
  with the same augmentation seeds and the same mixup draws in every global micro-batch.
- Layouts train alike: one process accumulating two micro-batches and two machines of one process each end with the
  same weights up to the order in which the micro-batches' gradients are summed (TOLERANCE says why that is exact
  here).
- Elastic resume: a run checkpointed mid-epoch on two machines finishes on one process, and the reverse, with the
  uninterrupted run's samples and weights.
- A teacher cache written on two machines serves one process, bit for bit.

The runs are `helpers.LAYOUT` (a global batch of 64 = two micro-batches of 32; 4 updates per epoch, 2 epochs; one
CPU thread per process) with the reference run's fitted teacher; `two_machines` and `accumulating` are session
fixtures in conftest.py.
"""
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LAYOUT, ROOT, assert_same_weights, launch, launch_machines, main, trace, traced
from safetensors.torch import load_file

from shake_vit.classification import data
from shake_vit.core import data as shared_data
from shake_vit.core import stream
from shake_vit.core.config import ConfigError, load_config

# Two layouts of one global batch differ only in how the micro-batches' gradients are summed: DDP all-reduces the
# processes' gradients, each already divided by the process count; accumulation adds each micro-batch's gradient of
# the loss divided by the accumulation count. With two micro-batches per update both compute g0 / 2 + g1 / 2: a
# division by 2 is exact in binary floating point and a sum of two terms has one order, so on one CPU thread per
# process (the same kernels in every layout) the weights agree bit for bit: the measured difference is 0. More
# micro-batches per update (a sum of 3 or more terms in another order), GPU all-reduce trees and non-deterministic
# kernels break that tie, by float32 rounding (relative 1e-7 per update); a skipped, repeated or differently mixed
# micro-batch moves these weights by 1e-3 and more (a misaligned accumulation after a resume: 1.6e-3).
TOLERANCE = 0.0
QUICKSTART = str(ROOT / 'configs' / 'quickstart.yaml')  # what train.py reads without --config


def largest_difference(a: Path, b: Path, skip=()) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa if not k.endswith(skip))


def epoch_of(cfg, world: int, rank: int, epoch: int, splits, train_tf, mixup):
    """What process `rank` of `world` feeds the model in `epoch`: {global micro-batch: (keys, images after mixup,
    targets after mixup)}, loaded through the trainer's own loader and mixing."""
    loader = shared_data.train_loader(cfg, splits.train, train_tf, world, rank, repeats=cfg.aug.repeated_aug)
    sampler = loader.batch_sampler
    sampler.set_epoch(epoch)
    keys = list(sampler)  # what the loader asks the data set for, micro-batch by micro-batch
    out = {}
    for step, ((x, y), k) in enumerate(zip(loader, keys)):
        m = sampler.layout.micro_batch_of(step)
        x, y = shared_data.mixed(mixup, x, y, cfg.train.seed, epoch, m)
        out[m] = (k, x, y)
    return out


def test_the_stream_is_the_same_in_every_layout():
    """1 x 4, 2 x 2 and 4 x 1: every micro-batch of an epoch has the same (sample index, augmentation seed) pairs,
    the same augmented images and the same mixup/cutmix draw. Repeated augmentation (DeiT's 3 copies), random erasing,
    mixup and cutmix all on. What a micro-batch holds is a function of (seed, epoch, m) by construction; what a layout
    can get wrong, and what fails here if it does, is which process loads which micro-batch: every one exactly once,
    none on two processes, and the loader's own output for it."""
    cfg = load_config(None, ['data.name=digits', 'data.img_size=16', 'data.num_workers=0', 'aug.repeated_aug=3',
                             'aug.mixup=0.8', 'aug.cutmix=1.0', 'aug.re_prob=0.25', 'train.batch_size=8',
                             'train.global_batch=32', 'train.seed=5'])
    splits = data.build_splits(cfg)
    train_tf, _ = data.build_transforms(cfg.aug, cfg.data.img_size, (0.5,) * 3, (0.5,) * 3)
    mixup = data.build_mixup(cfg.aug, len(splits.classes))
    layouts = {}
    for world in (1, 2, 4):
        seen = {}
        for rank in range(world):
            mine = epoch_of(cfg, world, rank, 1, splits, train_tf, mixup)
            assert not set(mine) & set(seen)  # no micro-batch on two processes
            seen.update(mine)
        layouts[world] = seen
    one = layouts[1]
    # DeiT's repeated-augmentation epoch: 1,437 digits -> 1,280 samples, 40 updates of 4 micro-batches of 8
    assert sorted(one) == list(range(160))
    for world in (2, 4):
        assert sorted(layouts[world]) == sorted(one)
        for m, (keys, x, y) in one.items():
            other_keys, other_x, other_y = layouts[world][m]
            assert other_keys == keys, (world, m)
            assert torch.equal(other_x, x) and torch.equal(other_y, y), (world, m)
    # every copy of an image has its own augmentation, and the copies of one update land in different micro-batches
    samples = [key for keys, _, _ in one.values() for key in keys]
    assert len({seed for _, seed in samples}) == len(samples) == 1280
    for update in range(40):
        for m in range(update * 4, update * 4 + 4):
            indices = [i for i, _ in one[m][0]]
            assert len(set(indices)) == len(indices)
    # another epoch is another order
    assert [k for k, _, _ in epoch_of(cfg, 1, 0, 2, splits, train_tf, None).values()] != [k for k, _, _ in
                                                                                            one.values()]


def test_the_process_count_must_divide_the_micro_batches_of_an_update(accumulating):
    cfg = load_config(None, ['train.batch_size=32', 'train.global_batch=128'])
    assert stream.resolve(cfg, 2).train.grad_accum == 2 and stream.resolve(cfg, 4).train.grad_accum == 1
    with pytest.raises(ConfigError, match='3 processes cannot share the global batch 128 = 4 micro-batches of 32: '
                                          'the process count must divide 4. Launch 1, 2, 4 processes'):
        stream.resolve(cfg, 3)
    # with the global batch set, the accumulation follows from it: a run's config.yaml (which records both) serves
    # another process count
    both = load_config(None, ['train.batch_size=32', 'train.global_batch=128', 'train.grad_accum=3'])
    assert stream.resolve(both, 1).train.grad_accum == 4 and stream.resolve(both, 2).train.grad_accum == 2
    with pytest.raises(ConfigError, match="'train.global_batch' is 100"):
        load_config(None, ['train.batch_size=32', 'train.global_batch=100'])
    # resuming: a checkpoint of 2 micro-batches per update on 3 processes names the counts that can resume it
    from shake_vit.core.checkpoint import CheckpointError
    from shake_vit.core.runner import resume_layout
    run = load_config([QUICKSTART], LAYOUT)
    start = accumulating / 'checkpoints' / 'update_00000003'
    with pytest.raises(CheckpointError, match=r'3 processes cannot share the global batch 64 .* Launch 1, 2 '
                                              r'processes\.$'):
        resume_layout(run, start, 3)
    resumed, note = resume_layout(run, start, 2)
    assert (resumed.train.global_batch, resumed.train.grad_accum) == (64, 1)
    assert 'written by 1 process x 2 accumulation, this run has 2 x 1' in note


def test_one_process_accumulating_and_two_machines_train_alike(two_machines, accumulating):
    """The same stream in two layouts: the weights after 3 updates, and at the end, differ by summation order alone;
    both saw every micro-batch of both epochs once. Machine 1 writes no log line and no file of its own."""
    for name in ('checkpoints/update_00000003/model.safetensors', 'student.safetensors',
                 'checkpoints/update_00000008/ema.safetensors'):
        assert largest_difference(two_machines / name, accumulating / name) <= TOLERANCE, name
    expected = [(epoch, m) for epoch in range(2) for m in range(8)]
    assert sorted((e, m) for e, m, _ in trace(two_machines / 'trace')) == expected
    assert sorted((e, m) for e, m, _ in trace(accumulating / 'trace')) == expected
    machines = json.loads((two_machines / 'machines').read_text())
    assert '[shake-vit]' in machines[0]['stdout'] and '[shake-vit]' not in machines[1]['stdout']
    assert 'global batch 64 (2 micro-batches of 32, 1 per process per update)' in machines[0]['stdout']
    results = json.loads((two_machines / 'results.json').read_text())
    assert results['num_samples'] == 360  # the validation set counted once across the machines


def test_a_cnn_student_trains_alike_in_two_processes(teacher_file, tmp_path):
    """A BatchNorm student with the authors' proxy-teacher shadow head (the CNN recipe): each micro-batch is
    normalised with its own statistics in every layout, so the parameters agree up to summation order. The running
    statistics do not: DDP copies process 0's buffers to the others at every forward (as in every DDP trainer), so
    they follow process 0's micro-batches alone; they are left out here."""
    cnn = ['--config', 'configs/cnn_resnet34_resnet18_in1k.yaml', '--config', 'configs/smoke_cnn.yaml',
           'data.name=digits', 'teacher.name=test_byobnet', f'teacher.checkpoint={teacher_file}', 'train.epochs=1',
           'train.batch_size=32', 'train.max_updates_per_epoch=4', 'train.cpu_threads=1', 'eval.batch_size=100']
    launch([*cnn, f'train.output_dir={tmp_path / "two"}'], num_processes=2)
    main([*cnn, 'train.grad_accum=2', f'train.output_dir={tmp_path / "one"}'])
    weights = load_file(str(tmp_path / 'one' / 'student.safetensors'))
    assert any('bn' in k for k in weights)
    buffers = ('running_mean', 'running_var', 'num_batches_tracked')
    assert largest_difference(tmp_path / 'two' / 'student.safetensors', tmp_path / 'one' / 'student.safetensors',
                              skip=buffers) <= TOLERANCE


def samples_seen(*traces, before_update=None):
    """(epoch, micro-batch) of every traced micro-batch, counted; `before_update` keeps those of the updates a
    checkpoint at that update holds (a micro-batch's trace line records the updates done before it)."""
    return collections.Counter((e, m) for t in traces for e, m, u in t if before_update is None or u < before_update)


@pytest.mark.parametrize('direction', ['two machines to one process', 'one process to two'])
def test_elastic_resume_keeps_the_stream_and_the_weights(two_machines, accumulating, teacher_file, tmp_path,
                                                         direction):
    """A run stopped 3 updates into its first epoch (its checkpoint alone copied to a new folder, as a preempted job
    leaves it) resumes on another process count with the uninterrupted run's samples and weights."""
    source = two_machines if direction.startswith('two') else accumulating
    name = 'update_00000003'
    shutil.copytree(source / 'checkpoints' / name, tmp_path / 'checkpoints' / name)
    # the command the run was started with, unchanged: the accumulation follows from the checkpoint's global batch
    args = [*LAYOUT, f'teacher.checkpoint={teacher_file}', f'train.output_dir={tmp_path}', '--resume', 'auto']
    if direction.startswith('two'):
        with traced(tmp_path / 'trace'):
            proc = main(args)
        assert 'written by 2 processes x 1 accumulation, this run has 1 x 2' in proc.stdout
    else:
        proc = launch(args, num_processes=2, env={'SHAKE_VIT_TRACE': str(tmp_path / 'trace')})
        assert 'written by 1 process x 2 accumulation, this run has 2 x 1' in proc.stdout
    assert 'global batch (64), the lr schedule and the data stream are unchanged' in proc.stdout
    for reference in (accumulating, two_machines):
        assert largest_difference(reference / 'student.safetensors', tmp_path / 'student.safetensors') <= TOLERANCE
    # no sample skipped or repeated: the stopped run's micro-batches and the resumed run's are the uninterrupted run's
    seen = samples_seen(trace(source / 'trace'), before_update=3) + samples_seen(trace(tmp_path / 'trace'))
    assert seen == samples_seen(trace(accumulating / 'trace')) and set(seen.values()) == {1}
    state = json.loads((tmp_path / 'checkpoints' / 'update_00000008' / 'trainer_state.json').read_text())
    assert state['run']['layout'] == {'global_batch': 64, 'processes': 1 if direction.startswith('two') else 2,
                                      'accum': 2 if direction.startswith('two') else 1}


def test_a_cache_written_on_two_machines_serves_one_process(tmp_path):
    """Two machines fit the teacher (saved once) and write the cache; one process reads it with the teacher named by
    its file: the same teacher outputs, bit for bit, for every micro-batch, and the live run's weights. A shard lost
    is written again by one process, identical."""
    writer, cache = tmp_path / 'writer', tmp_path / 'cache'
    launch_machines([*LAYOUT, f'train.output_dir={writer}', '--cache-teacher', str(cache)])
    assert sorted(p.name for p in writer.iterdir()) == ['teacher.json', 'teacher.safetensors']
    manifest = json.loads((cache / 'manifest.json').read_text())
    assert manifest['micro_batches_per_epoch'] == 8 and manifest['identity']['global_batch'] == 64
    assert 'num_processes' not in json.dumps(manifest['identity'])
    fitted = writer / 'teacher.safetensors'
    one = [*LAYOUT, 'train.grad_accum=2', f'teacher.checkpoint={fitted}']
    main([*one, f'train.output_dir={tmp_path / "live"}'])
    proc = main([*one, f'teacher.cache={cache}', f'train.output_dir={tmp_path / "cached"}'])
    assert 'no teacher is built' in proc.stdout
    other = main([*LAYOUT, f'teacher.checkpoint={fitted}', f'teacher.cache={cache}', 'train.epochs=1',
                  f'train.output_dir={tmp_path / "other"}'], check=False)  # one process without accumulation: 32
    assert other.returncode == 2 and 'global_batch: cache 64, this run 32' in other.stderr
    assert_same_weights(tmp_path / 'live' / 'student.safetensors', tmp_path / 'cached' / 'student.safetensors')
    assert_cached_outputs_are_the_teachers(load_config([QUICKSTART], [*one, f'teacher.cache={cache}']), cache)
    # half a cache (a shard lost, a writer preempted) finished by another process count
    lost = next(p for p in sorted(cache.iterdir()) if p.name.startswith('e0001'))
    kept = {f.name: np.load(f) for f in lost.glob('*.npy')}
    shutil.rmtree(lost)
    proc = main([*LAYOUT, 'train.grad_accum=2', f'train.output_dir={writer}', '--cache-teacher', str(cache)])
    assert 'reusing the teacher fitted earlier' in proc.stdout and '1 of 2 shards to write' in proc.stdout
    assert all(np.array_equal(np.load(lost / name), array) for name, array in kept.items())


def assert_cached_outputs_are_the_teachers(cfg, cache: Path) -> None:
    """For every micro-batch of epoch 1: what the reader hands the loss equals the teacher's outputs on that
    micro-batch, computed here through the live run's own task."""
    from accelerate import Accelerator

    from shake_vit.classification.family import ClassificationFamily
    from shake_vit.classification.tasks import DistillationTask
    from shake_vit.classification.teacher import cache_claims, get_teachers, teacher_options
    from shake_vit.distill.cache import open_reader
    cfg = stream.resolve(cfg, 1)
    acc = Accelerator(cpu=True)
    family = ClassificationFamily()
    splits = family.build_splits(cfg)
    pipe = family.build_pipeline(cfg, acc, splits, family.build_student(cfg, len(splits.classes)))
    cfg_live = cfg.copy()
    cfg_live.teacher.cache = None
    teachers = get_teachers(cfg_live, acc, pipe, fit=False)
    task = DistillationTask(torch.nn.Identity(), teachers, None, None, pipe.mean, pipe.std, **teacher_options(cfg))
    task.eval()
    reader = open_reader(cfg, pipe, cache_claims(cfg, pipe), log=lambda m: None)
    sampler, mixup = pipe.train_loader.batch_sampler, family.mixup(cfg, pipe)
    sampler.set_epoch(1)
    reader.start_epoch(1, [m for _, m in sampler.plan])
    try:
        for (x, y), (epoch, m) in zip(pipe.train_loader, list(sampler.plan)):
            reader.next_batch(y)
            x, _ = shared_data.mixed(mixup, x, y, cfg.train.seed, epoch, m)
            with torch.no_grad():
                logits, _ = task.teacher_outputs(x)
            assert torch.equal(reader.take(torch.device('cpu')), logits), m
    finally:
        reader.close()


def test_only_global_rank_zero_writes_files():
    """On several machines every machine has a local rank 0: a file written under `is_local_main_process` would be
    written once per machine into a shared folder. Node-local ranks appear only where they must: progress bars (one
    per machine), the thread count of a machine's processes, and downloads (`downloads_first`: one per disk)."""
    allowed = {'disable=not acc.is_local_main_process', 'disable=not accelerator.is_local_main_process',
               "int(os.environ.get('LOCAL_WORLD_SIZE', '1'))", 'acc.local_main_process_first()'}
    found = []
    for path in (ROOT / 'shake_vit').rglob('*.py'):
        for line in path.read_text().splitlines():
            for hit in re.findall(r'local_main_process\w*|local_process_index|LOCAL_RANK|LOCAL_WORLD_SIZE', line):
                if not any(a in line for a in allowed):
                    found.append(f'{path.relative_to(ROOT)}: {line.strip()}')
    assert not found, found


def slurm_stand_ins(tmp_path, srun: str) -> dict:
    """Stand-ins for SLURM's `scontrol`, `scancel` and `srun` and for `accelerate` (which prints its arguments) on
    PATH; each call of scontrol and scancel is logged to tmp_path/calls."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    calls = tmp_path / 'calls'
    stand_ins = {
        'scontrol': f'echo "scontrol $*" >> {calls}; [ "$1" = show ] && printf "gpu-node-17\\ngpu-node-18\\n"; true',
        'scancel': f'echo "scancel $*" >> {calls}',
        'srun': srun,
        'accelerate': 'echo "accelerate $*"',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f'#!/bin/bash\n{body}\n')
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_NNODES='2', SLURM_GPUS_ON_NODE='8',
                SLURM_JOB_NODELIST='gpu-node-[17-18]', SLURM_JOB_ID='4242')


SBATCH = ['bash', 'configs/slurm/train.sbatch', 'configs/deit_base_shake_in1k.yaml', 'train.output_dir=runs/deit_b']


def test_the_slurm_script_launches_one_machine_rank_per_node(tmp_path):
    """configs/slurm/train.sbatch under stand-ins (srun: one task per node, SLURM_NODEID set): each node gets its
    rank and the first node's address; a job that ends by itself is not requeued."""
    env = slurm_stand_ins(tmp_path, 'shift; for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@"; done')
    proc = subprocess.run(SBATCH, cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert (f'--num_machines 2 --machine_rank {rank} --num_processes 16 --main_process_ip gpu-node-17 '
                '--main_process_port 29500 train.py --config configs/deit_base_shake_in1k.yaml '
                'train.output_dir=runs/deit_b --resume auto') in line, line
    assert 'requeue' not in (tmp_path / 'calls').read_text()


def test_the_slurm_script_stops_the_run_then_requeues_near_the_time_limit(tmp_path):
    """SLURM's USR1 before the time limit: the script sends SIGTERM to the run's step, waits for the run to save and
    exit, then requeues the job."""
    env = slurm_stand_ins(tmp_path, f'trap "echo saved > {tmp_path}/saved; exit 0" TERM; '
                                    f'echo $$ > {tmp_path}/running; while true; do sleep 0.1; done')
    proc = subprocess.Popen(SBATCH, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 30
    while not (tmp_path / 'running').exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` sends
    while 'scancel' not in (tmp_path / 'calls').read_text() and time.time() < deadline:
        time.sleep(0.05)
    # the stand-in scancel only logs: deliver the SIGTERM it asked for to the stand-in srun
    assert 'scancel --signal=TERM 4242.0' in (tmp_path / 'calls').read_text()
    os.kill(int((tmp_path / 'running').read_text()), signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / 'saved').exists() and 'the job is requeued' in out
    assert (tmp_path / 'calls').read_text().splitlines()[-1] == 'scontrol requeue 4242'


def test_a_checkpoint_written_before_the_global_stream_still_resumes(accumulating, teacher_file, tmp_path):
    """A trainer_state.json of the previous format (per-process `batches_done`, `num_processes`, no layout, no
    train.global_batch in its config identity) resumes: its global batch is batch size x processes x accumulation."""
    name = 'update_00000003'
    shutil.copytree(accumulating / 'checkpoints' / name, tmp_path / 'checkpoints' / name)
    state_file = tmp_path / 'checkpoints' / name / 'trainer_state.json'
    state = json.loads(state_file.read_text())
    state['batches_done'] = state.pop('micro_batches_done')  # one process: its batches are the micro-batches
    del state['run']['layout']
    state['run']['num_processes'] = 1
    del state['run']['config']['train.global_batch']
    state['run']['config']['train.grad_accum'] = 2  # the identity then held the accumulation
    state_file.write_text(json.dumps(state))
    proc = main([*LAYOUT, f'teacher.checkpoint={teacher_file}', 'train.grad_accum=2', f'train.output_dir={tmp_path}',
                 '--resume', 'auto'])
    assert 'update 3 (micro-batch 6 of the epoch)' in proc.stdout and 'elastic' not in proc.stdout
    assert_same_weights(accumulating / 'student.safetensors', tmp_path / 'student.safetensors')
