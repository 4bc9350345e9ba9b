"""Detection, whole runs: a SHAKE run with every head reported, mid-epoch resume, SIGTERM then resume, --eval,
--export loaded by torchvision alone, fine-tuning on new classes, two processes on COCO-format data."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, launch, main, results, scalar_tags, write_coco
from safetensors.torch import load_file

from shake_vit.config import load_config
from shake_vit.detection import data as det_data
from shake_vit.detection.family import DetectionFamily
from test_detection import SMOKE


@pytest.fixture(scope='module')
def det_run(tmp_path_factory):
    """SHAKE on tiny digit scenes with an EMA: a teacher fitted for 20 epochs (its AP is above 0 on this seed, so
    the --eval test compares a number that could differ), checkpoints at updates 2, 3, 4, 6."""
    out = tmp_path_factory.mktemp('det_run')
    proc = main([*SMOKE, 'teacher.fit.epochs=20', 'train.ema=true', 'train.ema_decay=0.9', 'ckpt.interval_updates=2',
                 'ckpt.keep_last=10', f'train.output_dir={out}'])
    return out, proc


def test_a_run_fits_the_teacher_distils_and_reports_every_head(det_run):
    out, proc = det_run
    r = results(out)
    for head in ('student', 'shadow', 'teacher', 'ema_student', 'ema_shadow'):
        for metric in ('ap', 'ap50', 'ap75', 'ap_small', 'ap_medium', 'ap_large'):
            assert 0 <= r[f'{head}_{metric}'] <= 100 or r[f'{head}_{metric}'] == -100, (head, metric)
    assert r['num_samples'] == 12 and r['best_student_ap'] >= r['student_ap'] and r['best_epoch'] in (1, 2)
    assert r['teacher_ap50'] > 0
    assert 'fitting the teacher fasterrcnn_resnet18_fpn' in proc.stdout and 'fitted teacher: AP' in proc.stdout
    table = proc.stdout[proc.stdout.index('head '):]
    assert 'student' in table and 'shadow predictor' in table and 'teacher' in table and 'AP50' in table
    assert (out / 'teacher.safetensors').is_file() and (out / 'config.yaml').is_file()
    assert 'shadow_predictors.0.cls_score.weight' in load_file(str(out / 'student.safetensors'))
    tags = scalar_tags(out)
    for term in ('kl_shadow_teacher', 'box_shadow_teacher', 'kl_shadow_cls', 'box_shadow_cls', 'kl_cls_shadow',
                 'box_cls_shadow', 'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'):
        assert any(tag.endswith(term) for tag in tags), term
    for metric in ('student_ap', 'shadow_ap50', 'teacher_ap'):
        assert any(tag.endswith(metric) for tag in tags), metric


def test_resume_mid_epoch_gives_identical_weights(det_run, tmp_path):
    out, _ = det_run
    (tmp_path / 'checkpoints').mkdir()
    shutil.copytree(out / 'checkpoints/update_00000002', tmp_path / 'checkpoints/update_00000002')
    for f in ('teacher.safetensors', 'teacher.json'):
        shutil.copy(out / f, tmp_path / f)
    proc = main([*SMOKE, 'teacher.fit.epochs=20', 'train.ema=true', 'train.ema_decay=0.9', 'ckpt.interval_updates=2',
                 'ckpt.keep_last=10', f'train.output_dir={tmp_path}', '--resume', 'auto'])
    assert 'resumed from' in proc.stdout and 'reusing the teacher' in proc.stdout
    a, b = load_file(str(out / 'student.safetensors')), load_file(str(tmp_path / 'student.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_reproduces_the_runs_ap_and_export_loads_in_torchvision_alone(det_run, tmp_path):
    out, _ = det_run
    final = sorted((out / 'checkpoints').glob('update_*'))[-1]
    evaluated = main(['--eval', str(final)])
    e, r = json.loads((final / 'eval.json').read_text()), results(out)
    for key in ('student_ap', 'shadow_ap', 'teacher_ap', 'teacher_ap50', 'teacher_ap75', 'ema_student_ap'):
        assert e[key] == pytest.approx(r[key], abs=1e-9), key
    assert 'shadow predictor' in evaluated.stdout
    export = tmp_path / 'export'
    proc = main(['--export', str(out), '--export-dir', str(export)])
    code = proc.stdout[proc.stdout.index('import torchvision'):]
    assert 'shake_vit' not in code and (export / 'model.safetensors').is_file()
    # the printed lines in an isolated interpreter elsewhere (no shake_vit), on images the test saves
    cfg = load_config([str(out / 'config.yaml')])
    images = [det_data.build_transforms(cfg)[1](*det_data.build_splits(cfg).val[i])[0].as_subclass(torch.Tensor)
              for i in range(3)]
    torch.save(images, tmp_path / 'images.pt')
    script = code + (f"\nimport torch\nmodel.eval()\nwith torch.no_grad():\n"
                     f"    found = model(torch.load('{tmp_path / 'images.pt'}'))\n"
                     f"torch.save(found, '{tmp_path / 'found.pt'}')\n")
    subprocess.run([sys.executable, '-I', '-c', script], cwd=tmp_path, check=True)
    student = DetectionFamily().build_student(cfg, 11)
    student.load_state_dict(load_file(str(out / 'student.safetensors')))
    expected = student.eval().predict(images, with_shadow=False)['student']
    assert all(len(e['boxes']) for e in expected)  # the comparison below compares detections, not empty lists
    for got, want in zip(torch.load(tmp_path / 'found.pt'), expected):
        assert torch.allclose(got['boxes'], want['boxes'], atol=1e-4) and torch.equal(got['labels'], want['labels'])
    main(['--eval', str(export), '--config', str(out / 'config.yaml')])
    assert json.loads((export / 'eval.json').read_text())['student_ap'] == pytest.approx(r['student_ap'])


def test_fine_tuning_on_other_classes_starts_a_new_box_predictor(det_run, coco, tmp_path):
    out, _ = det_run
    proc = main([*SMOKE, 'data.name=coco', f'data.root={coco}', 'loss.method=none', 'train.batch_size=2',
                 f'model.pretrained={out / "student.safetensors"}', f'train.output_dir={tmp_path / "ft"}'])
    assert 'fine-tuning from' in proc.stdout and 'a new box predictor' in proc.stdout
    assert results(tmp_path / 'ft')['num_samples'] == 3
    wrong = main([*SMOKE, 'det.fpn_channels=32', f'model.pretrained={out / "student.safetensors"}',
                  f'train.output_dir={tmp_path / "wrong"}'], check=False)
    assert wrong.returncode != 0 and 'does not fit fasterrcnn_resnet18_fpn as configured' in wrong.stderr


def test_two_processes_on_coco_format_data_count_every_image_once(coco, tmp_path):
    out = tmp_path / 'ddp'
    proc = launch([*SMOKE, 'data.name=coco', f'data.root={coco}', 'train.batch_size=2', 'eval.batch_size=1',
                   f'train.output_dir={out}'], num_processes=2)
    assert 'processes 2, global batch 4' in proc.stdout
    r = results(out)
    assert r['num_samples'] == 3 and 'shadow_ap' in r and 'teacher_ap' in r  # 3 val images on 2 processes


def test_sigterm_saves_then_resume_auto_completes_with_identical_weights(det_run, tmp_path):
    out, _ = det_run
    long_run = [*SMOKE, 'train.epochs=3', 'train.max_updates_per_epoch=0', 'det.scenes=[48,12]',
                'ckpt.stop_check_every=1', f'teacher.checkpoint={out / "teacher.safetensors"}']
    uninterrupted, killed = tmp_path / 'uninterrupted', tmp_path / 'killed'
    main([*long_run, f'train.output_dir={uninterrupted}'])
    proc = subprocess.Popen([sys.executable, 'train.py', *long_run, f'train.output_dir={killed}'], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    deadline = time.time() + 180
    while not list((killed / 'checkpoints').glob('update_*')) and time.time() < deadline:
        time.sleep(0.05)  # the end of epoch 0 is saved: the signal lands in epoch 1 (12 updates)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, stdout[-3000:]
    assert 'SIGTERM received' in stdout and not (killed / 'results.json').exists()
    stopped = json.loads((sorted((killed / 'checkpoints').glob('update_*'))[-1] / 'trainer_state.json').read_text())
    assert stopped['epoch'] == 1 and 0 < stopped['batches_done'] < 12, stopped
    main([*long_run, f'train.output_dir={killed}', '--resume', 'auto'])
    a, b = load_file(str(uninterrupted / 'student.safetensors')), load_file(str(killed / 'student.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_print_config_and_check_data_work_for_detection(coco, tmp_path):
    proc = main([*SMOKE, '--print-config'])
    assert 'task: detection' in proc.stdout and 'fasterrcnn_resnet18_fpn' in proc.stdout
    proc = main([*SMOKE, 'data.name=coco', f'data.root={coco}', '--check-data'])
    assert proc.returncode == 0 and 'all 7 images of coco are readable' in proc.stdout
    corrupt = write_coco(tmp_path / 'corrupt')
    (corrupt / 'val2017/001.png').write_bytes(b'not a png')
    proc = main([*SMOKE, 'data.name=coco', f'data.root={corrupt}', '--check-data'], check=False)
    assert proc.returncode == 2 and '1 of 7 images cannot be read' in proc.stdout and 'val2017/001.png' in proc.stdout
