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
from test_detection import SMOKE

from shake_vit.core.config import load_config
from shake_vit.detection import data as det_data
from shake_vit.detection.family import DetectionFamily


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
    for term in ('kl_shadow_teacher', 'box_shadow_teacher', 'kl_cls_shadow', 'box_cls_shadow', 'anchor_classifier',
                 'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'):
        assert any(tag.endswith(term) for tag in tags), term
    # the default shadow learns from the teacher and the labels alone (loss.mutual_shadow null: 0 for detection)
    assert not any(tag.endswith(('kl_shadow_cls', 'box_shadow_cls')) for tag in tags)
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


def test_two_processes_on_coco_format_data_count_every_image_once_and_resume_on_one(coco, tmp_path):
    """Two processes of one image each (a global batch of 2, two updates an epoch) on COCO-format data count every
    validation image once. Stopped after update 1 of epoch 0 (the checkpoint alone copied to a new folder) and finished
    by one process accumulating two micro-batches, the detector ends with the uninterrupted run's parameters bit for
    bit: the RPN's and the RoI heads' sampling is seeded per global micro-batch, BatchNorm normalises each
    micro-batch by its own statistics, and the sum of two micro-batches' gradients (g0 / 2 + g1 / 2) has one order
    (tests/test_stream.py). The BatchNorm running statistics (this backbone trains from scratch, so they are not
    frozen) follow process 0's micro-batches under DDP and all of them in one process: they are left out."""
    args = [*SMOKE, 'data.name=coco', f'data.root={coco}', 'train.batch_size=1', 'eval.batch_size=1',
            'train.cpu_threads=1', 'ckpt.interval_updates=1', 'ckpt.keep_last=10']
    two, one = tmp_path / 'two', tmp_path / 'one'
    proc = launch([*args, f'train.output_dir={two}'], num_processes=2)
    assert 'processes 2, global batch 2' in proc.stdout
    r = results(two)
    assert r['num_samples'] == 3 and 'shadow_ap' in r and 'teacher_ap' in r  # 3 val images on 2 processes
    shutil.copytree(two / 'checkpoints' / 'update_00000001', one / 'checkpoints' / 'update_00000001')
    for f in ('teacher.safetensors', 'teacher.json'):
        shutil.copy(two / f, one / f)
    proc = main([*args, f'train.output_dir={one}', '--resume', 'auto'])
    assert 'written by 2 processes x 1 accumulation, this run has 1 x 2' in proc.stdout
    a, b = load_file(str(two / 'student.safetensors')), load_file(str(one / 'student.safetensors'))
    parameters = [k for k in a if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert len(parameters) > 50 and all(torch.equal(a[k], b[k]) for k in parameters)


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
    time.sleep(0.3)  # a moment into epoch 1 (signalled during the save's last steps it stopped at batch 0, 1 run in ~8)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, stdout[-3000:]
    assert 'SIGTERM received' in stdout and not (killed / 'results.json').exists()
    stopped = json.loads((sorted((killed / 'checkpoints').glob('update_*'))[-1] / 'trainer_state.json').read_text())
    assert stopped['epoch'] == 1 and 0 < stopped['micro_batches_done'] < 12, stopped
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


# ------------------------------------------------------------------------------------------------ health checks

def test_a_detection_teacher_far_below_its_record_stops_the_run(det_run, tmp_path):
    out, _ = det_run
    shutil.copy(out / 'teacher.safetensors', tmp_path / 'teacher.safetensors')
    record = json.loads((out / 'teacher.json').read_text())
    recorded = record['metrics']['teacher_ap'] + 50  # the file claims 50 points more than it scores
    record['metrics']['teacher_ap'] = recorded
    (tmp_path / 'teacher.json').write_text(json.dumps(record))
    proc = main([*SMOKE, f'teacher.checkpoint={tmp_path / "teacher.safetensors"}',
                 f'train.output_dir={tmp_path / "r"}'], check=False)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert 'The teacher check stopped the run before its first update' in proc.stderr
    assert f'below the AP {recorded:.2f} its record holds' in proc.stderr
    assert json.loads((tmp_path / 'r/health.json').read_text())['teacher']['status'] == 'failed'
    # the same file with its true record passes, and the run reports the check
    record['metrics']['teacher_ap'] = recorded - 50
    (tmp_path / 'teacher.json').write_text(json.dumps(record))
    main([*SMOKE, f'teacher.checkpoint={tmp_path / "teacher.safetensors"}', f'train.output_dir={tmp_path / "ok"}'])
    assert results(tmp_path / 'ok')['health']['teacher']['status'] == 'ok'


def test_a_detection_teacher_without_a_record_that_finds_nothing_stops_the_run(tmp_path):
    """An untrained teacher file (no teacher.json beside it): AP50 near 0 is a broken teacher, not a weak one."""
    from safetensors.torch import save_file

    from shake_vit.detection.family import teacher_detector
    cfg = load_config([str(ROOT / 'configs/det_quickstart.yaml'), str(ROOT / 'configs/smoke_det.yaml')])
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in teacher_detector(cfg, 11).state_dict().items()},
              str(tmp_path / 'random.safetensors'))
    proc = main([*SMOKE, f'teacher.checkpoint={tmp_path / "random.safetensors"}',
                 f'train.output_dir={tmp_path / "r"}'], check=False)
    assert proc.returncode == 2 and 'below 1 (health.det_min_ap50): it finds almost nothing' in proc.stderr


def test_shadow_drift_and_a_stalled_detector_are_warned_with_what_to_try(tmp_path):
    from accelerate import Accelerator

    from shake_vit.detection.health import DetectionHealth as Health
    cfg = load_config([str(ROOT / 'configs/det_quickstart.yaml'), str(ROOT / 'configs/smoke_det.yaml')],
                      [f'train.output_dir={tmp_path}'])
    lines = []
    health = Health(cfg, Accelerator(cpu=True), ['background', *'0123456789'], 100, lines.append)
    healthy = {'monitor_shadow_kl': 0.004, 'monitor_fg_acc': 0.6, 'kl_shadow_teacher': 0.004, 'loss': 1.0}
    health.observe(healthy, 10)
    assert not lines and "stall" not in health.findings  # the stall check waits for 40% of the updates
    health.observe({**healthy, "monitor_shadow_kl": 2.15, "monitor_fg_acc": 0.0}, 45)
    drift, stall = health.findings['shadow_drift'], health.findings['stall']
    assert drift['status'] == 'warning' and "KL from the teacher is 2.150, above 0.5" in drift['seen']
    assert 'loss.shadow_anchor=1' in drift['try'] and 'loss.mutual_shadow' in drift['try']
    assert stall['status'] == 'warning' and '0.0% of the foreground RoIs' in stall['seen']
    assert 'det.backbone_weights' in stall['try']
    assert len(lines) == 2 and all(line.startswith('health check ') for line in lines)
    health.observe({**healthy, 'monitor_shadow_kl': 3.0}, 40)
    assert len(lines) == 2  # each warned once
    quiet = Health(cfg, Accelerator(cpu=True), ['background', *'0123456789'], 100, lines.append)
    for update in (20, 60, 100):
        quiet.observe(healthy, update)
    assert quiet.findings['stall']['status'] == 'ok' and quiet.findings['shadow_drift']['status'] == 'ok'
    assert 'largest 0.004' in quiet.findings['shadow_drift']['seen']


def test_a_run_logs_each_sides_loss_sum_and_the_monitors(det_run):
    out, proc = det_run
    tags = scalar_tags(out)
    for name in ('sum_student', 'sum_shadow', 'monitor_fg_acc', 'monitor_shadow_kl', 'anchor_classifier',
                 'anchor_box_reg'):
        assert any(tag == f'train/{name}' for tag in tags), name
    health = results(out)['health']
    assert health['teacher']['status'] == 'ok' and 'shadow_drift' in health and 'stall' in health


# ------------------------------------------------------------------------------------------------- COCO holes

def test_coco_says_what_it_clamps_drops_and_flags_and_refuses_missing_images_before_any_fit(coco, tmp_path):
    cfg = load_config([str(ROOT / 'configs/det_quickstart.yaml'), str(ROOT / 'configs/smoke_det.yaml')],
                      ['data.name=coco', f'data.root={coco}'])
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        det_data.build_splits(cfg)
    # train image 0: one crowd box, one running out of the image, one of zero width (helpers.write_coco)
    assert ('COCO train: 6 boxes; 1 reach outside their image and are clamped to it, 1 are under a pixel wide or '
            'high and dropped, 1 crowd boxes are left out of training') in printed.getvalue()
    assert ('COCO val: 5 boxes; 1 reach outside their image and are clamped to it, 1 are under a pixel wide or high '
            'and dropped, 1 crowd boxes are kept, flagged, for evaluation') in printed.getvalue()
    broken = write_coco(tmp_path / 'broken')
    (broken / 'train2017/002.png').unlink()
    proc = main([*SMOKE, 'data.name=coco', f'data.root={broken}', f'train.output_dir={tmp_path / "r"}'], check=False)
    assert proc.returncode == 2 and '1 of the 4 images' in proc.stderr and '002.png' in proc.stderr
    assert "remove those images' entries" in proc.stderr
    assert not (tmp_path / 'r/teacher.safetensors').exists() and 'fitting the teacher' not in proc.stdout


def test_coco_size_aps_read_the_annotations_area():
    """COCO's small/medium/large split goes by the annotation's `area` (a mask's), not its box's."""
    from torchmetrics.detection import MeanAveragePrecision
    box = torch.tensor([[0.0, 0.0, 40.0, 40.0]])  # a 1600 px box: medium by its box
    target = {'boxes': box, 'labels': torch.tensor([1]), 'iscrowd': torch.tensor([0])}
    found = {'boxes': box, 'scores': torch.tensor([0.9]), 'labels': torch.tensor([1])}
    for area, small in ((None, -100.0), (500.0, 100.0)):  # -1 (x 100): no small object; an area of 500 px: small
        meter = MeanAveragePrecision(box_format='xyxy', iou_type='bbox', backend='pycocotools')
        meter.update([found], [target if area is None else {**target, 'area': torch.tensor([area])}])
        assert 100 * float(meter.compute()['map_small']) == pytest.approx(small)


def test_the_coco_loader_hands_the_annotations_area_to_evaluation(coco):
    cfg = load_config([str(ROOT / 'configs/det_quickstart.yaml'), str(ROOT / 'configs/smoke_det.yaml')],
                      ['data.name=coco', f'data.root={coco}'])
    splits = det_data.build_splits(cfg)
    _, val_tf = det_data.build_transforms(cfg)
    image, target = val_tf(*splits.val[0])
    # image 0: its box, a crowd box, one running out of the image, one of zero width (dropped, with its area)
    assert target['area'].tolist() == [32 * 20, 20 * 20, 30 * 30]
    assert 'area' in det_data.collate([(image, target)])[1][0]
    _, train_target = splits.train[0]
    assert 'area' not in train_target and 'iscrowd' not in train_target


# ------------------------------------------------------------------------------- the digits-pretrained backbone

def test_the_digits_backbone_is_pretrained_once_and_a_wrong_backbone_file_is_refused(tmp_path):
    """det.backbone_weights=digits: a classification run of this trainer on the training scenes' digits, reused by
    the next run with the same settings; the detector's ResNet (frozen BatchNorm) starts from its weights."""
    out = tmp_path / 'run'
    args = [*SMOKE, 'loss.method=none', 'det.backbone_weights=digits', 'det.backbone_fit.epochs=1',
            'det.backbone_fit.img_size=16', 'train.epochs=1', f'train.output_dir={out}']
    first = main(args)
    assert 'pretraining resnet18 on the digits of the training scenes' in first.stdout
    assert "the student's backbone: digits" in first.stdout
    record = json.loads((out / 'backbone/backbone.json').read_text())
    assert record['record']['data.val_fraction'] == 0.2 and record['record']['model.name'] == 'resnet18'
    assert 'train.output_dir' not in record['record'] and 'train.cpu_threads' not in record['record']
    pretrained = load_file(str(out / 'backbone/student.safetensors'))
    student = load_file(str(out / 'student.safetensors'))
    for key in ('bn1.running_mean', 'layer4.1.bn2.running_var'):  # frozen BatchNorm: what the pretraining left
        assert torch.equal(student[f'detector.backbone.body.{key}'], pretrained[f'model.{key}']), key
    again = main([*args, f'train.output_dir={out}', '--resume', 'auto'])
    assert 'pretraining' not in again.stdout  # done and recorded: reused
    changed = main([*args, 'det.backbone_fit.epochs=2', 'train.overwrite=true'])
    assert 'pretraining resnet18' in changed.stdout  # other settings: pretrained again
    # a file of another ResNet, and a file for a torchvision detector, are refused with the fix
    from safetensors.torch import save_file
    from torchvision.models import resnet34
    save_file(resnet34().state_dict(), str(tmp_path / 'r34.safetensors'))
    wrong = main([*SMOKE, 'loss.method=none', f'det.backbone_weights={tmp_path / "r34.safetensors"}',
                  f'train.output_dir={tmp_path / "wrong"}'], check=False)
    assert wrong.returncode == 2 and "does not fit the detector's ResNet" in wrong.stderr
    assert 'resnet18 for fasterrcnn_resnet18_fpn' in wrong.stderr
    big = main([*SMOKE, 'loss.method=none', 'model.name=fasterrcnn_resnet50_fpn', 'det.backbone_weights=digits',
                f'train.output_dir={tmp_path / "big"}'], check=False)
    assert big.returncode == 2 and 'is for the small ResNet detectors' in big.stderr


def test_ramped_mutual_weights_start_at_zero_and_grow_over_the_warmup(tmp_path):
    """The trainer tells the task its update count; loss.ramp_* scale their direction by the warm-up's share done."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'ramp'
    # 3 updates per epoch: a 3-update warm-up, a log point per update
    main([*SMOKE, 'loss.ramp_student=true', 'loss.ramp_shadow=true', 'loss.mutual_shadow=0.1', 'optim.warmup_epochs=1',
          'train.epochs=2', f'train.output_dir={out}'])
    values = {}
    for events in out.rglob('events.out.tfevents.*'):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in ('train/kl_cls_shadow', 'train/kl_shadow_cls', 'train/kl_shadow_teacher'):
            if tag in acc.Tags()['scalars']:
                values[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    for tag in ('train/kl_cls_shadow', 'train/kl_shadow_cls'):
        assert values[tag][1] == 0.0 and values[tag][4] > 0, values[tag]  # update 0: ramp 0; update 3 on: full
    # the teacher term is not ramped: logged at full weight from update 0, and it moves once the shadow does
    assert set(values['train/kl_shadow_teacher']) == set(values['train/kl_cls_shadow'])
    assert values['train/kl_shadow_teacher'][4] > 0
