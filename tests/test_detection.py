"""Detection's parts: the digit scenes, the COCO-format loader, the mAP, the student/teacher wiring on the same RoIs,
the shadow predictor, the config checks and the COCO recipe (the loss terms: test_detection_losses.py; whole runs:
test_detection_runs.py)."""

import numpy as np
import pytest
import torch
from helpers import ROOT, write_coco

from shake_vit.core.config import ConfigError, load_config
from shake_vit.detection import data as det_data
from shake_vit.detection import losses as losses
from shake_vit.detection.family import DetectionFamily, student_detector
from shake_vit.detection.models import DetectionStudent, check_teacher, teacher_on_rois
from shake_vit.detection.task import DetectionTask

SMOKE = ['--config', 'configs/det_quickstart.yaml', '--config', 'configs/smoke_det.yaml']


# ----------------------------------------------------------------------------------------------------- the data

def smoke_cfg(*overrides):
    return load_config([str(ROOT / 'configs/det_quickstart.yaml'), str(ROOT / 'configs/smoke_det.yaml')], overrides)


def test_digit_scenes_are_deterministic_with_tight_boxes_around_their_digits():
    cfg = smoke_cfg('det.noise=0.0', 'det.scenes=[40,10]', 'det.canvas=96', 'det.digit_sizes=[16,40]')
    splits = det_data.build_splits(cfg)
    train = splits.train
    assert splits.classes == ['background', *'0123456789']
    counts = []
    for i in range(len(train)):
        image, target = train[i]
        again, target_again = train[i]
        assert torch.equal(image, again) and torch.equal(target['boxes'], target_again['boxes'])
        pixels, boxes = image[0], target['boxes'].round().long()
        assert image.shape == (3, 96, 96) and pixels.min() >= 0 and pixels.max() <= 1
        assert 1 <= len(boxes) <= 4 and ((target['labels'] >= 1) & (target['labels'] <= 10)).all()
        counts.append(len(boxes))
        outside = torch.ones_like(pixels, dtype=torch.bool)
        for x0, y0, x1, y1 in boxes.tolist():
            ink = pixels[y0:y1, x0:x1] > 0.15
            # tight: ink in the first and last row and column of the box
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
            outside[y0:y1, x0:x1] = False
        assert (pixels[outside] <= 0.15).all()  # no ink outside the boxes
        area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes.tolist())
        assert int((~outside).sum()) == area  # the boxes do not overlap
    assert len(set(counts)) > 1
    assert not torch.equal(train[0][0], splits.val[0][0])


def test_digit_scene_labels_name_the_digit_drawn():
    sevens = np.full((5, 8, 8), 0, np.uint8)
    sevens[:, 1:7, 2:6] = 255
    scenes = det_data.DigitScenes(sevens, np.full(5, 7), count=3, canvas=64, per_scene=(2, 3), sizes=(12, 20),
                                  noise=0.0, seed=1)
    assert all((scenes[i][1]['labels'] == 8).all() for i in range(3))  # class 7 is label 8: 0 is the background


def test_train_and_val_scenes_draw_from_disjoint_digits():
    cfg = smoke_cfg()
    splits = det_data.build_splits(cfg)
    train = {d.tobytes() for d in splits.train.digits}
    val = {d.tobytes() for d in splits.val.digits}
    assert len(train) == len(splits.train.digits)  # no digit image twice: bytes identify them
    assert train.isdisjoint(val) and len(train) + len(val) == 1797


def test_coco_loader_clamps_drops_and_keeps_what_it_should(coco):
    cfg = smoke_cfg('data.name=coco', f'data.root={coco}')
    splits = det_data.build_splits(cfg)
    assert splits.classes == ['background', 'cat', 'N/A', 'dog']  # labels are the category ids
    train_tf, _ = det_data.build_transforms(cfg)
    image, target = train_tf(*splits.train[0])
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64) and image.max() <= 1
    # the crowd box and the zero-width box are gone; the box past the edge is clamped to the image
    assert target['labels'].tolist() == [1, 3]
    assert target['boxes'].tolist() == [[8, 10, 40, 30], [50, 30, 64, 48]]
    empty_image, empty = train_tf(*splits.train[1])  # an image without annotations is kept, with no boxes
    assert empty_image.shape == (3, 48, 64) and empty['boxes'].shape == (0, 4) and empty['labels'].numel() == 0
    images, targets = det_data.collate([train_tf(*splits.train[i]) for i in range(3)])
    assert len(images) == 3 and [t['image_id'] for t in targets] == [100, 101, 102]
    # evaluation keeps the crowd box, flagged, and drops the zero-width one with its flag
    evaluated = det_data.CocoImages(coco / 'train2017', coco / 'annotations/instances_train2017.json',
                                    keep_crowd=True)
    _, target = det_data.build_transforms(cfg)[1](*evaluated[0])
    assert target['labels'].tolist() == [1, 3, 3] and target['iscrowd'].tolist() == [0, 1, 0]
    assert det_data.collate([(_, target)])[1][0]['iscrowd'].tolist() == [0, 1, 0]


def test_coco_errors_name_the_file_and_the_fix(coco, tmp_path):
    def error(root, *more):
        with pytest.raises(ConfigError) as err:
            det_data.build_splits(smoke_cfg('data.name=coco', f'data.root={root}', *more))
        return str(err.value)
    assert 'needs data.root' in error('null')
    assert "instances_train2017.json' does not exist" in error(tmp_path / 'nowhere')
    assert 'det.train_annotations' in error(tmp_path / 'nowhere')
    assert "image folder '" in error(coco, 'det.val_images=missing')
    bad = write_coco(tmp_path / 'bad', bad_category=True)
    message = error(bad)
    assert 'category ids [7]' in message and 'instances_train2017.json' in message
    zero = write_coco(tmp_path / 'zero', categories=({'id': 0, 'name': 'thing'}, {'id': 1, 'name': 'cat'},
                                                     {'id': 3, 'name': 'dog'}))
    assert 'category ids must be 1 or more' in error(zero)
    broken = write_coco(tmp_path / 'broken')
    (broken / 'annotations/instances_val2017.json').write_text('{"images": [')
    assert 'is not a COCO-format annotation file' in error(broken)
    corrupt = write_coco(tmp_path / 'corrupt')
    (corrupt / 'train2017/002.png').write_bytes(b'not a png')
    splits = det_data.build_splits(smoke_cfg('data.name=coco', f'data.root={corrupt}'))
    with pytest.raises(Exception, match='002.png') as err:
        splits.train[2]
    assert "remove its entry (and its annotations) from '" in str(err.value)  # COCO data: the fix is in the json


# ----------------------------------------------------------------------------------------------- the evaluation

def test_map_is_100_for_the_ground_truth_and_drops_for_a_missed_or_misplaced_box():
    from accelerate import Accelerator

    from shake_vit.detection.evaluation import evaluate_detection
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 90.0, 95.0]])
    loader = [([torch.zeros(3, 100, 100)], [{'boxes': boxes, 'labels': torch.tensor([1, 2])}])]

    def predict(images):
        shifted = boxes.clone()
        shifted[1] += 12.0  # IoU with its truth 0.35: a false positive at IoU 0.5 and a missed box
        return {'truth': [{'boxes': boxes, 'scores': torch.tensor([0.9, 0.8]), 'labels': torch.tensor([1, 2])}],
                'shifted': [{'boxes': shifted, 'scores': torch.tensor([0.9, 0.8]), 'labels': torch.tensor([1, 2])}],
                'none': [{'boxes': torch.zeros(0, 4), 'scores': torch.zeros(0), 'labels': torch.zeros(0).long()}]}
    metrics = evaluate_detection(predict, loader, Accelerator(cpu=True))
    assert metrics['truth_ap'] == pytest.approx(100) and metrics['truth_ap50'] == pytest.approx(100)
    assert metrics['shifted_ap50'] == pytest.approx(50) and metrics['none_ap'] == 0 and metrics['num_samples'] == 1
    # a detection on a crowd region is ignored, as COCO's evaluation does, not a false positive
    crowd = torch.tensor([[60.0, 0.0, 99.0, 30.0]])
    loader = [([torch.zeros(3, 100, 100)], [{'boxes': torch.cat([boxes, crowd]), 'labels': torch.tensor([1, 2, 1]),
                                            'iscrowd': torch.tensor([0, 0, 1])}])]
    found = {'boxes': torch.cat([crowd, boxes]), 'scores': torch.tensor([0.95, 0.9, 0.8]),
             'labels': torch.tensor([1, 1, 2])}
    assert evaluate_detection(lambda images: {'h': [found]}, loader, Accelerator(cpu=True))['h_ap'] == \
        pytest.approx(100)


# ------------------------------------------------------------------------------------ the student and the teacher

def tiny_batch(n=2):
    cfg = smoke_cfg('det.scenes=[4,2]')
    scenes = det_data.build_splits(cfg).train
    tf = det_data.build_transforms(cfg)[1]
    return cfg, det_data.collate([tf(*scenes[i]) for i in range(n)])


def test_the_teacher_scores_the_students_rois_row_for_row():
    """A teacher with the student's own weights gives the student's outputs on every sampled RoI, and the kd terms
    between them vanish."""
    import copy
    cfg, (images, targets) = tiny_batch()
    torch.manual_seed(0)
    student = DetectionStudent(student_detector(cfg, 11), num_shadow=1).eval()  # eval: BatchNorm running stats
    teacher = copy.deepcopy(student.detector).eval()
    torch.manual_seed(1)
    out = student(images, targets, lambda x, proposals, sizes: teacher_on_rois(teacher, x, proposals, sizes))
    t_cls, t_box = out['teacher']
    assert t_cls.shape == out['s_cls'].shape == (len(out['labels']), 11) and t_box.shape == (len(out['labels']), 44)
    assert torch.allclose(t_cls, out['s_cls'], atol=1e-5) and torch.allclose(t_box, out['s_box'], atol=1e-5)
    task = DetectionTask(student, teacher, losses.det_kd_loss, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    torch.manual_seed(1)
    terms = task(images, targets)
    assert not task.renormalize
    assert terms['kl_cls_teacher'].item() < 1e-8 and terms['box_cls_teacher'].item() < 1e-8
    assert {'loss_classifier', 'loss_box_reg'} <= terms.keys()  # torchvision's RPN has losses in train mode only
    assert {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'} <= task.train()(images,
                                                                                                      targets).keys()


def test_a_teacher_with_other_input_statistics_sees_its_own_normalisation():
    cfg, (images, _targets) = tiny_batch()
    student = DetectionStudent(student_detector(cfg, 11), num_shadow=1)
    teacher = student_detector(cfg, 11).eval()
    teacher.transform.image_mean, teacher.transform.image_std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    seen = []
    teacher.backbone.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0]))
    task = DetectionTask(student, teacher, losses.det_shake_loss, student.detector.transform.image_mean,
                         student.detector.transform.image_std)
    task(images, _targets)
    assert task.renormalize
    expected = teacher.transform(images)[0].tensors  # 64-px images: same size, no padding
    assert torch.allclose(seen[0], expected, atol=1e-5)
    # images of two sizes: the smaller one's padding is 0 for the teacher, as its own transform pads
    mixed = [images[0], images[1][:, :40]]
    seen.clear()
    task(mixed, [_targets[0], {'boxes': torch.tensor([[2.0, 2.0, 30.0, 30.0]]), 'labels': torch.tensor([1])}])
    expected = teacher.transform(mixed)[0].tensors
    assert expected.shape == seen[0].shape and torch.allclose(seen[0], expected, atol=1e-5)


def test_a_teacher_of_other_classes_or_box_coding_is_refused():
    cfg = smoke_cfg()
    student = DetectionStudent(student_detector(cfg, 11))
    with pytest.raises(ConfigError, match='predicts 5 classes .* and the student 11'):
        check_teacher(student_detector(cfg, 5), student, 'fasterrcnn_resnet18_fpn')
    other = student_detector(cfg, 11)
    other.roi_heads.box_coder.weights = (1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match='codes boxes with weights'):
        check_teacher(other, student, 'fasterrcnn_resnet18_fpn')


def test_the_shadow_predictor_reads_the_students_box_features_or_its_own_box_head():
    cfg, (images, targets) = tiny_batch()
    shared = DetectionStudent(student_detector(cfg, 11), num_shadow=1, shadow_on='student')
    own = DetectionStudent(student_detector(cfg, 11), num_shadow=1, own_box_head=True, shadow_on='student')
    assert len(shared.shadow_box_heads) == 0 and len(own.shadow_box_heads) == 1
    for student in (shared, own):
        out = student(images, targets)
        (h_cls, h_box), = out['shadows']
        assert h_cls.shape == out['s_cls'].shape and h_box.shape == out['s_box'].shape
    heads = own.eval().predict(images)
    assert set(heads) == {'student', 'shadow'} and len(heads['shadow']) == 2


def test_the_proxy_teacher_shadow_starts_as_the_teacher_and_learns_on_its_features_alone():
    """det.shadow_on=teacher: the shadow predictor (and its own box head) reads the teacher's features of the
    student's RoIs, begins equal to the teacher's, and its gradients reach only itself; without the teacher
    --eval scores the student's predictor alone."""
    cfg, (images, targets) = tiny_batch()
    family = DetectionFamily()
    torch.manual_seed(0)
    for own_head in (False, True):
        wide = smoke_cfg('teacher.kwargs.box_head_dim=48', f'det.shadow_box_head={own_head}')
        student = family.build_student(wide, 11)
        teacher = family.build_student(smoke_cfg('loss.method=none', 'det.box_head_dim=48'), 11).detector.eval()
        assert student.shadow_predictors[0].cls_score.in_features == 48  # the teacher's box features' width
        family.start_from_teachers(wide, student, [teacher])
        task = DetectionTask(student, teacher, losses.det_shake_loss, student.detector.transform.image_mean,
                             student.detector.transform.image_std)
        out = student(images, targets, task.teacher_on_rois)
        (h_cls, h_box), (t_cls, t_box) = out['shadows'][0], out['teacher']
        assert torch.allclose(h_cls, t_cls, atol=1e-6) and torch.allclose(h_box, t_box, atol=1e-6)
        terms = task(images, targets)
        assert terms['kl_shadow_teacher'].item() < 1e-10 and terms['box_shadow_teacher'].item() < 1e-10
        student.zero_grad()
        terms['kl_shadow_cls'].backward()  # the shadow's pull toward the student moves the shadow alone
        moved = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert moved and all(n.startswith(('shadow_predictors', 'shadow_box_heads')) for n in moved), moved
        assert any(n.startswith('shadow_box_heads') for n in moved) == own_head
        assert all(p.grad is None for p in teacher.parameters())  # scored under no_grad
        student.eval()
        assert set(student.predict(images, teacher=task.teacher_on_rois)) == {'student', 'shadow'}
        assert set(student.predict(images)) == {'student'}
    with pytest.raises(ConfigError, match='predicts 5 classes'):  # checked before its predictor is copied
        family.start_from_teachers(wide, student, [student_detector(smoke_cfg(), 5)])


def test_config_refuses_settings_of_the_other_task():
    with pytest.raises(ConfigError, match=r'aug.hflip, aug.mixup are classification settings.*hflip: use det.hflip'):
        smoke_cfg('aug.mixup=0.5', 'aug.hflip=0.0')
    with pytest.raises(ConfigError, match='det.min_size is a detection setting'):
        load_config([str(ROOT / 'configs/quickstart.yaml')], ['det.min_size=600'])
    with pytest.raises(ConfigError, match="'data.name' is 'digits'; choose one of digit_scenes, coco for task "):
        smoke_cfg('data.name=digits')
    with pytest.raises(ConfigError, match="'loss.method' is 'deit_hard'; choose one of none, kd, shake"):
        smoke_cfg('loss.method=deit_hard')
    with pytest.raises(ConfigError, match=r"'det.digit_sizes' is \[20, 200\]; it must be two sizes 4 <= lo <= hi"):
        smoke_cfg('det.digit_sizes=[20,200]')
    with pytest.raises(ConfigError, match=r"'det.trainable_backbone_layers' is 7; it must be 0 to 5"):
        smoke_cfg('det.trainable_backbone_layers=7')
    with pytest.raises(ConfigError, match="'det.shadow_on' is 'both'"):
        smoke_cfg('det.shadow_on=both')
    with pytest.raises(ConfigError, match='not a detector here'):
        DetectionFamily().build_student(smoke_cfg('model.name=resnet18'), 11)
    with pytest.raises(ConfigError, match=r"teacher.kwargs has \['depth'\], which are not detector settings"):
        from shake_vit.detection.family import teacher_detector
        teacher_detector(smoke_cfg('teacher.kwargs.depth=2'), 11)


def test_the_coco_recipe_builds_its_detectors_transforms_and_schedule(coco):
    """configs/det_coco_r50fpnv2_r50fpn.yaml as written, on the COCO-layout fixture and without downloads: 800/1333 px,
    flips at 0.5, the v2 teacher fits the student, SGD at 0.02 per 16 images with x0.1 at epochs 16 and 22."""
    from accelerate import Accelerator

    from shake_vit.core.build import build_optimization
    from shake_vit.detection.family import teacher_detector
    cfg = load_config([str(ROOT / 'configs/det_coco_r50fpnv2_r50fpn.yaml')],
                      [f'data.root={coco}', 'det.backbone_weights=null', 'teacher.pretrained=false',
                       'data.num_workers=0'])
    family = DetectionFamily()
    splits = family.build_splits(cfg)
    student = family.build_student(cfg, len(splits.classes))
    transform = student.detector.transform
    assert (transform.min_size, transform.max_size) == ((800,), 1333)
    pipe = family.build_pipeline(cfg, Accelerator(cpu=True), splits, student)
    flip = pipe.train_loader.dataset.transform.transforms[0]
    assert type(flip).__name__ == 'RandomHorizontalFlip' and flip.p == 0.5
    teacher = teacher_detector(cfg, len(splits.classes))
    assert type(teacher.roi_heads.box_head).__name__ == 'FastRCNNConvFCHead'  # the v2 box head
    check_teacher(teacher, student, cfg.teacher.name)
    assert len(student.shadow_predictors) == 1 and len(student.shadow_box_heads) == 0
    optimizer, schedule, d = build_optimization(cfg, student, 8, 7330)
    assert d.global_batch == 16 and d.lr == pytest.approx(0.02) and d.total_updates == 24 * 7330
    assert type(optimizer).__name__ == 'SGD' and optimizer.defaults['momentum'] == 0.9
    assert {g['weight_decay'] for g in optimizer.param_groups} == {1e-4}

    def lr_at(epoch):
        schedule.step_update(num_updates=int(epoch * 7330))
        return optimizer.param_groups[0]['lr']
    assert lr_at(0) == pytest.approx(2e-5) and lr_at(1) == pytest.approx(0.02)
    assert lr_at(16.5) == pytest.approx(0.002) and lr_at(23) == pytest.approx(0.0002)
