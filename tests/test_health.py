"""Distillation you can trust (issue 17): health checks that fire on purpose and stay quiet on a healthy run, teachers
mapped to the data's classes by name, Accelerate's trackers, and the ONNX export."""
import json

import numpy as np
import pytest
import torch
from helpers import TINY, main, results, scalar_tags
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DIGITS = [str(i) for i in range(10)]
# the tiny student of the other tests, for runs that test the checks rather than training
SMALL = [t for t in TINY if not t.startswith(('teacher.', 'train.max_updates'))] + ['train.max_updates_per_epoch=6',
                                                                                     'train.log_interval=2']


@pytest.fixture(scope='module')
def good_teacher(tmp_path_factory):
    """The quick start's teacher (test_byobnet on digits), fitted for 8 epochs: about 98% top-1; its file records its
    normalisation, its classes and its top-1."""
    out = tmp_path_factory.mktemp('good_teacher')
    main([*SMALL, 'teacher.fit.epochs=8', 'train.epochs=1', 'train.max_updates_per_epoch=0', f'train.output_dir={out}'])
    return out / 'teacher.safetensors'


def rewrite(source, target, permutation=None, classes=None, extra_rows=0, top1=None):
    """A copy of teacher file `source` with its output rows permuted (`permutation[j]`: the old row that becomes row
    j), `extra_rows` random outputs appended, and its recorded class names / top-1 replaced."""
    state = load_file(str(source))
    with safe_open(str(source), framework='pt') as f:
        meta = dict(f.metadata())
    for key in ('head.fc.weight', 'head.fc.bias'):
        value = state[key] if permutation is None else state[key][list(permutation)]
        if extra_rows:
            value = torch.cat([value, torch.randn(extra_rows, *value.shape[1:]) * 0.01])
        state[key] = value.contiguous()
    if classes is not None:
        meta['classes'] = json.dumps(classes)
    if top1 is not None:
        meta['top1'] = json.dumps(top1)
    save_file(state, str(target), metadata=meta)
    return target


def run(tmp_path, *extra, check=True):
    return main([*SMALL, f'train.output_dir={tmp_path / "run"}', *extra], check=check)


def test_the_good_teacher_records_what_the_checks_read(good_teacher):
    with safe_open(str(good_teacher), framework='pt') as f:
        meta = f.metadata()
    assert json.loads(meta['classes']) == DIGITS and json.loads(meta['top1']) > 90


def test_a_teacher_whose_outputs_are_shuffled_stops_the_run_before_training(good_teacher, tmp_path):
    shuffled = rewrite(good_teacher, tmp_path / 'shuffled.safetensors', permutation=[3, 7, 1, 9, 0, 2, 8, 4, 6, 5])
    proc = run(tmp_path, f'teacher.checkpoint={shuffled}', check=False)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert 'The teacher check stopped the run before its first update' in proc.stderr
    assert 'points below the' in proc.stderr and 'its file records' in proc.stderr
    assert 'teacher.class_map=auto' in proc.stderr and 'teacher.mean/std' in proc.stderr
    assert not (tmp_path / 'run' / 'checkpoints').exists()  # no update ran
    # the same teacher passes once the check is switched off
    run(tmp_path, f'teacher.checkpoint={shuffled}', 'health.teacher=false', 'train.epochs=1')


def test_a_teacher_fed_the_wrong_statistics_stops_the_run(good_teacher, tmp_path):
    proc = run(tmp_path, f'teacher.checkpoint={good_teacher}', 'teacher.mean=[0.9,0.9,0.9]',
               'teacher.std=[0.05,0.05,0.05]', check=False)
    assert proc.returncode == 2 and 'The teacher check stopped the run' in proc.stderr, proc.stderr[-2000:]
    assert 'teacher.mean/std override it' in proc.stderr


def test_a_teacher_fitted_at_another_image_size_is_stopped_with_that_cause_first(good_teacher, tmp_path):
    """The good teacher was fitted at 32 px; at 48 px it scores far below its record, and the message says why."""
    with safe_open(str(good_teacher), framework='pt') as f:
        assert json.loads(f.metadata()['img_size']) == 32
    proc = run(tmp_path, f'teacher.checkpoint={good_teacher}', 'data.img_size=48', check=False)
    assert proc.returncode == 2 and 'The teacher check stopped the run' in proc.stderr, proc.stderr[-2000:]
    causes = proc.stderr[proc.stderr.index('Likely causes:'):]
    assert causes.startswith('Likely causes: it was fitted at 32 px and this run feeds it 48 px (data.img_size)')
    assert 'Try: run at data.img_size=32, or refit the teacher at 48 px' in proc.stderr


def test_a_teacher_without_a_record_near_chance_stops_the_run(good_teacher, tmp_path):
    state = load_file(str(good_teacher))
    state['head.fc.weight'] = torch.zeros_like(state['head.fc.weight'])  # a constant output: 10% top-1
    save_file(state, str(tmp_path / 'plain.safetensors'))  # no metadata: nothing recorded
    proc = run(tmp_path, f'teacher.checkpoint={tmp_path / "plain.safetensors"}', check=False)
    assert proc.returncode == 2 and 'near chance (10.00%' in proc.stderr, proc.stderr[-2000:]


def test_a_teacher_recording_its_classes_in_another_order_stops_the_run(good_teacher, tmp_path):
    named = rewrite(good_teacher, tmp_path / 'named.safetensors', classes=DIGITS[::-1])
    proc = run(tmp_path, f'teacher.checkpoint={named}', check=False)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "The class-order check stopped the run" in proc.stderr
    assert "its output 0 is '9', the data's class 0 is '0'" in proc.stderr


def test_class_map_auto_selects_and_orders_a_teachers_outputs_by_name(good_teacher, tmp_path):
    """A teacher of 12 classes in another order, with the data's 10 among them: mapped by name, it scores what the
    good teacher scores, and the run trains."""
    order = [5, 2, 9, 0, 7, 1, 8, 3, 6, 4]
    bigger = rewrite(good_teacher, tmp_path / 'bigger.safetensors', permutation=order, extra_rows=2,
                     classes=[DIGITS[i] for i in order] + ['cat', 'dog'])
    proc = run(tmp_path, f'teacher.checkpoint={bigger}', 'teacher.class_map=auto', 'train.epochs=1')
    assert '10 of its 12 classes mapped' in proc.stdout
    health = results(tmp_path / 'run')['health']
    assert health['teacher']['status'] == 'ok' and health['teacher']['teacher_top1'] > 90, health
    assert health['teacher_classes']['status'] == 'ok'


def test_class_map_file_renames_and_unmatched_classes_are_listed(good_teacher, tmp_path):
    words = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
    worded = rewrite(good_teacher, tmp_path / 'worded.safetensors', classes=words)
    mapping = tmp_path / 'map.yaml'
    mapping.write_text(''.join(f"'{d}': {w}\n" for d, w in zip(DIGITS, words)))
    run(tmp_path, f'teacher.checkpoint={worded}', f'teacher.class_map={mapping}', 'train.epochs=1')
    mapping.write_text(''.join(f"'{d}': {w}\n" for d, w in zip(DIGITS[:8], words)))  # 8 and 9 left to match by name
    proc = run(tmp_path, f'teacher.checkpoint={worded}', f'teacher.class_map={mapping}', 'train.overwrite=true',
               check=False)
    assert proc.returncode == 2 and "2 of the data's 10 classes match no teacher class" in proc.stderr
    assert ': 8, 9.' in proc.stderr
    # names listed in a file, for a teacher whose file records none; a renaming file without the names fails
    plain = tmp_path / 'plain.safetensors'
    save_file(load_file(str(good_teacher)), str(plain))
    proc = run(tmp_path, f'teacher.checkpoint={plain}', 'teacher.class_map=auto', check=False)
    assert proc.returncode == 2 and 'set teacher.class_names to a file' in proc.stderr
    names = tmp_path / 'names.txt'
    names.write_text('\n'.join(words))
    mapping.write_text(''.join(f"'{d}': {w}\n" for d, w in zip(DIGITS, words)))
    proc = run(tmp_path, f'teacher.checkpoint={plain}', f'teacher.class_names={names}',
               f'teacher.class_map={mapping}', 'train.epochs=1')
    assert results(tmp_path / 'run')['health']['teacher']['teacher_top1'] > 90


def test_an_imagenet_teacher_knows_its_class_names():
    """timm's ImageNet heads name their classes by WordNet id and description: auto maps folder names of either."""
    import timm
    from omegaconf import OmegaConf

    from shake_vit.classification.classmap import resolve, teacher_names
    model = timm.create_model('test_byobnet', num_classes=1000)
    t = OmegaConf.create({'class_names': None})
    known = teacher_names(t, model, None)
    assert known['names'][0] == 'n01440764'
    assert resolve('auto', known, ['n01443537', 'tench', 'Great_White_Shark']) == [1, 0, 2]
    from shake_vit.core.config import ConfigError
    with pytest.raises(ConfigError, match='crane .*name several teacher classes'):  # the bird and the machine
        resolve('auto', known, ['crane'])


def test_a_student_that_cannot_learn_and_a_dominating_term_are_reported(good_teacher, tmp_path):
    proc = run(tmp_path, f'teacher.checkpoint={good_teacher}', 'optim.lr=1e-12', 'loss.teacher_weight=100',
               'train.epochs=2')
    health = results(tmp_path / 'run')['health']
    assert health['stall']['status'] == 'warning', health
    assert health['dominance']['status'] == 'warning' and health['dominance']['dominance_ratio'] > 10
    assert 'health check stall: WARNING' in proc.stdout and 'health check dominance: WARNING' in proc.stdout
    assert 'loss.temperature' in health['stall']['try']
    tags = set(scalar_tags(tmp_path / 'run'))
    assert {'health/stall', 'health/dominance', 'health/teacher', 'health/teacher_top1', 'train/monitor_ce'} <= tags


def test_a_healthy_quick_start_raises_none(good_teacher, tmp_path):
    """The quick start's own recipe (its student, lr and warmup) with its trained teacher, cut from 40 epochs to 10:
    the stall check is moved to update 176, where the full quick start makes it (0.2 x 880 updates)."""
    proc = main([f'teacher.checkpoint={good_teacher}', 'train.epochs=10', 'eval.interval=10',
                 'health.stall_after=0.8', f'train.output_dir={tmp_path}'])
    health = results(tmp_path)['health']
    assert {k: v['status'] for k, v in health.items()} == {'teacher': 'ok', 'dominance': 'ok', 'stall': 'ok'}, health
    assert 'health check' not in proc.stdout


def test_trackers_are_checked_by_name_and_by_package(tmp_path):
    proc = main([*SMALL, 'train.log_with=[wandb]', f'train.output_dir={tmp_path}'], check=False)
    assert proc.returncode == 2 and 'pip install wandb' in proc.stderr
    proc = main([*SMALL, 'train.log_with=[tensorbord]', f'train.output_dir={tmp_path}'], check=False)
    assert proc.returncode == 2 and "Did you mean 'tensorboard'?" in proc.stderr


def test_onnx_export_without_onnx_names_the_install(reference, tmp_path, monkeypatch):
    """`onnx` is in requirements-test.txt, not in the trainer's requirements: without it the export says so."""
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnx' else find_spec(name, *a))
    proc = main(['--export', str(reference), '--export-format', 'onnx', '--export-dir', str(tmp_path)], check=False)
    assert proc.returncode == 2 and 'pip install onnx onnxruntime' in proc.stderr


def test_onnx_export_matches_the_timm_export(reference, tmp_path):
    import onnxruntime
    import timm
    main(['--export', str(reference), '--export-format', 'onnx', '--export-dir', str(tmp_path / 'onnx')])
    main(['--export', str(reference), '--export-head', 'cls', '--export-dir', str(tmp_path / 'timm')])
    model = timm.create_model(f'local-dir:{tmp_path / "timm"}', pretrained=True).eval()
    session = onnxruntime.InferenceSession(str(tmp_path / 'onnx' / 'model.onnx'), providers=['CPUExecutionProvider'])
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's
    got = session.run(None, {'input': x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() < 1e-4
