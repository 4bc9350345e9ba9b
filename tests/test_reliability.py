"""Every bad input gets a one-paragraph error before training; no fault loses work (docs/reliability.md).

Configuration errors are checked in this process (`helpers.main`, what `python train.py` runs); the kill tests need
a process to kill and run train.py as one."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from helpers import ROOT, RUN, TINY, main, results
from safetensors.torch import save_file
from test_checkpoint import assert_same_weights


def fails(args, *expected, code=2):
    """train.py exits with `code` and prints one `error:` paragraph containing `expected` (an uncaught exception,
    which a user would see as a traceback, fails the test)."""
    proc = main(args, check=False)
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, proc.stderr[-2000:]
    for text in expected:
        assert text in errors[0], (text, errors[0])
    return proc


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    """Teacher files: a good one (10 classes), one with 7 classes, a truncated one, one that unpickles code."""
    root = tmp_path_factory.mktemp('teachers')
    good = timm.create_model('test_byobnet', num_classes=10).state_dict()
    save_file({k: v.contiguous() for k, v in good.items()}, str(root / 'good.safetensors'))
    seven = timm.create_model('test_byobnet', num_classes=7).state_dict()
    torch.save(seven, root / 'seven.pth')
    torch.save(good, root / 'full.pth')
    data = (root / 'full.pth').read_bytes()
    (root / 'truncated.pth').write_bytes(data[:len(data) // 2])
    torch.save({'state_dict': good, 'hook': Payload(str(root / 'payload_ran'))}, root / 'pickled.pth')
    return root


class Payload:
    """An object whose unpickling would create a file: proof of foreign code running."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


@pytest.mark.parametrize('args, expected', [
    (['train.epoch=3'], ["Unknown config key 'train.epoch'", "Did you mean 'train.epochs'"]),
    (['optim.lr=-0.1'], ["'optim.lr' is -0.1; it must be positive"]),
    (['train.batch_size=big'], ["Bad value for 'train.batch_size'"]),
    (['loss.method=shaek'], ["'loss.method' is 'shaek'", "Did you mean 'shake'"]),
    (['model.name=deit_tiny_distiled_patch16_224'], ['timm does not know', 'deit_tiny_distilled_patch16_224']),
    (['teacher.name=resnet1O'], ["'teacher.name' is 'resnet1O'", 'Close matches']),
    (['model.name=vit_tiny_patch16_224', 'model.shadow_on=token'], ['no distillation token', 'distilled DeiT']),
    (['train.batch_size=63', 'aug.mixup=0.8'], ["'train.batch_size' is 63", 'even when mixup']),
    (['data.name=imagefolder'], ['data.root is not set']),
    (['data.img_size=30'], ['The image size 30x30 (data.img_size) is not a multiple of the patch size 8x8 '
                            '(model.kwargs.patch_size)', 'the 3x3 patch grid would leave out the last 6',
                            '(24 or 32)']),
    (['loss.method=kd', 'model.predict=avg'], ["model.predict=avg averages the shadow heads with the cls head, but "
                                               "loss.method='kd' trains no shadow head"]),
])
def test_bad_configuration_values(args, expected, tmp_path):
    fails([*TINY, f'train.output_dir={tmp_path / "run"}', *args], *expected)


def test_missing_empty_and_mismatched_data_roots(tmp_path, imagefolder):
    imagenet = ['--config', 'configs/deit_tiny_shake_in1k.yaml']
    fails([*imagenet, f'data.root={tmp_path / "nowhere"}', f'train.output_dir={tmp_path / "a"}'],
          "has no 'train/' folder")
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    (empty / 'val').mkdir()
    fails([*imagenet, f'data.root={empty}', f'train.output_dir={tmp_path / "b"}'], 'No images found under')
    odd = tmp_path / 'odd'
    shutil.copytree(imagefolder, odd)
    shutil.move(odd / 'val' / 'class_3', odd / 'val' / 'class_x')
    fails([*imagenet, f'data.root={odd}', f'train.output_dir={tmp_path / "c"}'], 'class folders',
          "only in val: ['class_x']")


def test_teacher_checkpoint_missing_unreadable_wrong_classes_or_pickled(teachers, tmp_path):
    base = [*TINY, f'train.output_dir={tmp_path / "run"}']
    fails([*base, f'teacher.checkpoint={teachers / "absent.pth"}'], 'does not exist')
    fails([*base, f'teacher.checkpoint={teachers / "truncated.pth"}'], 'is not a readable checkpoint')
    fails([*base, f'teacher.checkpoint={teachers / "seven.pth"}'], 'predicts 7 classes but the data has 10')
    fails([*base, f'teacher.checkpoint={teachers / "pickled.pth"}'], 'was refused', 'train.trust_pickled_files=true')
    assert not (teachers / 'payload_ran').exists()  # the foreign code never ran
    fails([*base, f'teacher.checkpoint={teachers / "good.safetensors"}', 'teacher.name=resnet18'], 'does not fit')


def test_explicit_opt_in_loads_a_trusted_pickled_file(teachers, tmp_path):
    main([*TINY, f'teacher.checkpoint={teachers / "pickled.pth"}', 'train.trust_pickled_files=true',
          'health.teacher=false', f'train.output_dir={tmp_path / "run"}'])  # a random teacher: at chance
    assert (teachers / 'payload_ran').exists()  # unpickling ran code: why it is opt-in
    os.remove(teachers / 'payload_ran')


def test_output_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    fails([*TINY, f'train.output_dir={blocker / "run"}'], "train.output_dir", 'is not writable')


def test_resume_with_another_class_count_is_refused(reference, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(reference / 'checkpoints' / 'update_00000008', out / 'checkpoints' / 'update_00000008')
    fails(['data.name=fake', 'data.num_classes=7', *RUN, f'train.output_dir={out}', '--resume', 'auto'],
          'does not match the configuration', 'num_classes')


def test_nan_loss_stops_with_the_term_and_update_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from shake_vit.core.config import load_config
    from shake_vit.core.engine import NonFiniteLoss
    from shake_vit.core.runner import train
    from shake_vit.distill import losses
    calls = {'n': 0}
    real = losses.shake_loss

    def poisoned(*args, **kwargs):  # the teacher term blows up from the 6th step on (epoch 1, update 2)
        calls['n'] += 1
        terms = real(*args, **kwargs)
        if calls['n'] >= 6:
            terms['kl_shadow_teacher'] = terms['kl_shadow_teacher'] * float('nan')
        return terms
    monkeypatch.setattr(losses, 'shake_loss', poisoned)
    out = tmp_path / 'run'
    cfg = load_config([str(ROOT / 'configs/quickstart.yaml')],
                      [*TINY, 'train.epochs=3', 'train.max_updates_per_epoch=4', 'train.log_interval=10',
                       'ckpt.interval_updates=0', f'train.output_dir={out}'])
    with pytest.raises(NonFiniteLoss, match=r'kl_shadow_teacher became NaN or infinite at update 6'):
        train(cfg)
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['update_00000004']


# SIGKILL at several points, then `--resume auto`: the run completes with the reference's weights every time.
KILL_POINTS = ['update:2', 'save:3', 'update:5', 'save:4']

@pytest.mark.parametrize('point', KILL_POINTS)
def test_sigkill_then_resume_auto_completes_with_identical_weights(reference, point, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    for f in ('teacher.safetensors', 'teacher.json'):  # training draws the same numbers with a loaded teacher
        shutil.copy(reference / f, out / f)
    killed = subprocess.run([sys.executable, 'train.py', *RUN, f'train.output_dir={out}'], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, SHAKE_VIT_KILL=point))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / 'results.json').exists()
    if point.startswith('save'):  # died mid-save: the half-written checkpoint is only a temporary folder
        assert (out / 'checkpoints' / f'.tmp-update_{int(point.split(":")[1]):08d}').is_dir()
    main([*RUN, f'train.output_dir={out}', '--resume', 'auto'])
    assert results(out)['epochs'] == 2
    assert_same_weights(reference / 'student.safetensors', out / 'student.safetensors')
    assert_same_weights(reference / 'checkpoints/update_00000008/ema.safetensors',
                        out / 'checkpoints/update_00000008/ema.safetensors')


def test_a_corrupt_image_names_the_file_and_the_last_checkpoint_stays_usable(imagefolder, tmp_path):
    """A truncated JPEG met mid-run (in a loader worker): one error line naming the file, exit status 2, the last
    checkpoint intact; `--check-data` lists it; once the file is replaced, `--resume auto` finishes the run."""
    from shake_vit.core.checkpoint import complete_checkpoints
    root, out = tmp_path / 'data', tmp_path / 'run'
    shutil.copytree(imagefolder, root)
    run = [*TINY, 'data.name=imagefolder', f'data.root={root}', 'train.batch_size=8', 'train.max_updates_per_epoch=0',
           'eval.batch_size=8', f'train.output_dir={out}']
    main(run)  # epoch 1 of 1: 6 updates, every image read
    bad = root / 'train' / 'class_2' / '3.jpg'
    good = bad.read_bytes()
    bad.write_bytes(good[:len(good) // 3])  # a truncated download
    proc = fails([*run, 'train.epochs=2', 'data.num_workers=1', '--resume', 'auto'], f"Cannot read the image '{bad}'",
                 'OSError', '--check-data')
    assert 'DataLoader worker' not in proc.stderr
    assert [p.name for p in complete_checkpoints(out / 'checkpoints')] == ['update_00000006']
    check = main([*run, '--check-data', 'data.num_workers=1'], check=False)
    assert check.returncode == 2 and '1 of 68 images cannot be read' in check.stdout and str(bad) in check.stdout
    bad.write_bytes(good)
    assert 'all 68 images of imagefolder are readable' in main([*run, '--check-data']).stdout
    main([*run, 'train.epochs=2', '--resume', 'auto'])
    assert results(out)['epochs'] == 2


def test_one_run_per_folder_a_second_run_refuses_or_overwrites_cleanly(teacher_file, tmp_path):
    """A new run aimed at a folder that holds another run stops with the choices; train.overwrite=true removes the
    other run's files first, so the folder's checkpoints, --eval and results.json all speak of the new run."""
    out = tmp_path / 'run'
    first = [*TINY, f'teacher.checkpoint={teacher_file}', f'train.output_dir={out}']
    main(first)
    proc = fails([*first, 'train.seed=1'], f"train.output_dir '{out}' holds another run (checkpoints up to "
                 'update_00000003, results.json, student.safetensors)', 'Continue that run with --resume auto',
                 f'train.output_dir={out}_2', 'train.overwrite=true')
    assert 'resumed from' not in proc.stdout
    main([*first, 'train.seed=1', 'train.overwrite=true'])
    from shake_vit.core.checkpoint import complete_checkpoints
    assert [p.name for p in complete_checkpoints(out / 'checkpoints')] == ['update_00000003']
    second = results(out)
    main(['--eval', str(out)])
    evaluated = json.loads((out / 'checkpoints' / 'update_00000003' / 'eval.json').read_text())
    assert evaluated['top1_cls'] == pytest.approx(second['top1_cls'])


def test_resume_auto_refuses_a_checkpoint_of_another_run_naming_the_keys(teacher_file, tmp_path):
    out = tmp_path / 'run'
    first = [*TINY, f'teacher.checkpoint={teacher_file}', f'train.output_dir={out}', 'train.epochs=2',
             'train.max_updates_per_epoch=2']
    main([*first, 'train.epochs=1'])  # stopped after epoch 1, as if preempted
    proc = main([*first, 'optim.lr=0.5', 'aug.smoothing=0.2', '--resume', 'auto'], check=False)
    message = ' '.join(proc.stderr.split())  # the paragraph, unwrapped
    assert proc.returncode == 2 and 'belongs to another run than this config describes' in message, message
    assert 'aug.smoothing: checkpoint 0.0, config 0.2; optim.lr: checkpoint 0.001, config 0.5' in message
    assert 'its config.yaml' in message and 'resumed from' not in proc.stdout
    # what a resume may change: more epochs, another log interval, a moved data folder, other eval settings
    proc = main([*first, 'train.log_interval=2', 'eval.batch_size=50', 'data.num_workers=0', '--resume', 'auto'])
    assert 'resumed from' in proc.stdout and results(out)['epochs'] == 2


def test_under_accelerate_launch_an_error_is_one_paragraph():
    """The Quick start's launch settings: no launcher warnings, the trainer's paragraph alone; with two processes a
    config error is said once."""
    launch = ['accelerate', 'launch', '--config_file', 'configs/accelerate/one_process.yaml', '-q', 'train.py']
    proc = subprocess.run([*launch, 'train.epoch=3'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1 and lines == ["error: Unknown config key 'train.epoch' (from override "
                                              "'train.epoch=3'). Did you mean 'train.epochs'?"], lines
    two = subprocess.run(['accelerate', 'launch', '--multi_gpu', '--num_processes', '2', '-q', 'train.py',
                          'train.epoch=3'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert two.returncode == 1 and two.stderr.count('error: Unknown config key') == 1, two.stderr[-2000:]


def test_offline_a_hub_teacher_fails_at_once_with_the_clear_message(tmp_path):
    """No network (here: a hub endpoint nothing answers, an empty cache): one probe, the hub's offline mode, and the
    error paragraph, instead of about 50 s of retries and as many warning lines."""
    env = {**os.environ, 'HF_ENDPOINT': 'http://127.0.0.1:9', 'HF_HOME': str(tmp_path / 'hf'),
           'CUDA_VISIBLE_DEVICES': ''}
    env.pop('HF_HUB_OFFLINE', None)
    proc = subprocess.run([sys.executable, 'train.py', *TINY, 'teacher.name=resnet18.a1_in1k',
                           'teacher.pretrained=true', f'train.output_dir={tmp_path / "run"}'], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1, errors[-10:]
    assert "Could not fetch timm's pretrained weights for teacher.name='resnet18.a1_in1k'" in errors[0]
    assert 'teacher.checkpoint=/path/to/weights' in errors[0]
