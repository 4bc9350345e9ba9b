"""Checkpoints you can trust: exact resume (1 and 2 processes, mid-epoch), SIGTERM, interrupted saves, --eval.

The reference run (`helpers.RUN`, checkpoints at updates 3, 4, 6, 8) is a session fixture in conftest.py. Resuming in
two processes, mid-epoch, with the uninterrupted run's weights bit for bit, and resuming on another process count are
tests/test_stream.py::test_elastic_resume_keeps_the_stream_and_the_weights."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, RUN, assert_same_weights, launch, main, results


def resume_copy(source: Path, target: Path, update: int) -> None:
    """A run folder holding only `source`'s checkpoint of `update` (and its fitted teacher)."""
    (target / 'checkpoints').mkdir(parents=True)
    name = f'update_{update:08d}'
    shutil.copytree(source / 'checkpoints' / name, target / 'checkpoints' / name)
    for f in ('teacher.safetensors', 'teacher.json'):
        if (source / f).exists():  # a run that fitted its teacher
            shutil.copy(source / f, target / f)


def test_checkpoints_every_epoch_and_every_n_updates(reference):
    names = sorted(p.name for p in (reference / 'checkpoints').iterdir())
    assert names == ['update_00000003', 'update_00000004', 'update_00000006', 'update_00000008']
    state = json.loads((reference / 'checkpoints' / 'update_00000003' / 'trainer_state.json').read_text())
    assert (state['epoch'], state['micro_batches_done'], state['update']) == (0, 3, 3)
    assert state['best_of'] == 'top1_cls'  # SHAKE's model is its cls head
    files = {p.name for p in (reference / 'checkpoints' / 'update_00000008').iterdir()}
    assert {'model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'ema.safetensors',
            'trainer_state.json'} <= files


@pytest.mark.parametrize('update', [3, 4])  # mid-epoch (batches skipped) and an epoch boundary
def test_resume_gives_identical_weights_in_one_process(reference, tmp_path, update):
    resume_copy(reference, tmp_path, update)
    proc = main([*RUN, f'train.output_dir={tmp_path}', '--resume', 'auto'])
    assert f'resumed from {tmp_path}/checkpoints/update_{update:08d}' in proc.stdout
    assert_same_weights(reference / 'student.safetensors', tmp_path / 'student.safetensors')
    last = 'checkpoints/update_00000008/ema.safetensors'
    assert_same_weights(reference / last, tmp_path / last)


def test_sigterm_saves_then_resume_auto_completes_with_identical_weights(tmp_path):
    long_run = [*RUN, 'train.epochs=3', 'train.max_updates_per_epoch=40', 'ckpt.interval_updates=0']
    uninterrupted, out = tmp_path / 'uninterrupted', tmp_path / 'killed'
    main([*long_run, f'train.output_dir={uninterrupted}'])
    out.mkdir()
    for f in ('teacher.safetensors', 'teacher.json'):
        shutil.copy(uninterrupted / f, out / f)
    proc = subprocess.Popen([sys.executable, 'train.py', *long_run, f'train.output_dir={out}'], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list((out / 'checkpoints').glob('update_*')) and time.time() < deadline:
        time.sleep(0.05)  # the end of epoch 0 is saved: the signal lands inside epoch 1
    # a few of epoch 1's 40 updates first (a signal during the save stopped it at batch 0, 1 run in ~10)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-3000:]
    assert 'SIGTERM received' in stdout and 'Continue with the same command plus --resume auto' in stdout
    assert not (out / 'results.json').exists()
    newest = sorted((out / 'checkpoints').glob('update_*'))[-1]
    stopped_at = json.loads((newest / 'trainer_state.json').read_text())
    assert stopped_at['epoch'] == 1 and 0 < stopped_at['micro_batches_done'] < 40, stopped_at
    main([*long_run, f'train.output_dir={out}', '--resume', 'auto'])
    assert results(out)['epochs'] == 3
    assert_same_weights(uninterrupted / 'student.safetensors', out / 'student.safetensors')


def test_eval_reproduces_the_accuracy_the_run_reported(reference, tmp_path):
    main(['--eval', str(reference)])
    evaluated = json.loads((reference / 'checkpoints' / 'update_00000008' / 'eval.json').read_text())
    trained = results(reference)
    for key in ('top1_cls', 'top1_shadow', 'top1_avg', 'top5_cls', 'teacher_top1', 'agree_cls_shadow',
                'ema_top1_cls', 'num_samples'):
        assert evaluated[key] == trained[key], key


def test_eval_counts_every_image_once_in_two_processes(reference):
    launch(['--eval', str(reference / 'checkpoints' / 'update_00000004')], num_processes=2)
    evaluated = json.loads((reference / 'checkpoints' / 'update_00000004' / 'eval.json').read_text())
    assert evaluated['num_samples'] == 360


def test_a_save_that_fails_part_way_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from shake_vit.core.checkpoint import Checkpointer, CheckpointError, Progress
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(torch.nn.Linear(3, 2), torch.optim.AdamW(torch.nn.Linear(3, 2).parameters()))
    ckpt = Checkpointer(acc, tmp_path / 'checkpoints', ema=None, keep_last=2, metric='top1_cls')
    good = ckpt.save(Progress(update=1, run={'num_processes': 1}))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def full_disk(output_dir, **kwargs):
        Path(output_dir, 'model.safetensors').write_bytes(b'half a file')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(acc, 'save_state', full_disk)
    with pytest.raises(CheckpointError, match='No space left on device.*newest complete checkpoint .*update_00000001'):
        ckpt.save(Progress(update=2, run={'num_processes': 1}))
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['update_00000001']
    # A crash (no cleanup at all) leaves a temporary folder and maybe a folder without its state file: both ignored.
    (tmp_path / 'checkpoints' / '.tmp-update_00000005').mkdir()
    (tmp_path / 'checkpoints' / 'update_00000006').mkdir()
    assert ckpt.latest() == good
    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.undo()
    ckpt.load(good)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_resume_refuses_a_checkpoint_of_another_architecture(reference, tmp_path):
    resume_copy(reference, tmp_path, 4)
    proc = main([*RUN, 'model.kwargs.embed_dim=48', f'train.output_dir={tmp_path}', '--resume', 'auto'], check=False)
    assert proc.returncode == 2
    assert 'does not match the configuration' in proc.stderr and 'embed_dim' in proc.stderr
