"""Detection: each loss term by hand and where its gradients go, the digit scenes, the COCO-format loader, the
student/teacher wiring on the same RoIs, the config checks, and whole runs (one and two processes, resume after
SIGTERM, --eval, --export loaded by torchvision alone, fine-tuning)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, launch, main, results, scalar_tags
from safetensors.torch import load_file

from shake_vit import losses
from shake_vit.config import ConfigError, load_config
from shake_vit.detection import data as det_data
from shake_vit.detection.family import DetectionFamily, student_detector
from shake_vit.detection.models import DetectionStudent, check_teacher, teacher_on_rois
from shake_vit.detection.task import DetectionTask

SMOKE = ['--config', 'configs/det_quickstart.yaml', '--config', 'configs/smoke_det.yaml']


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- the losses

def smooth_l1(x, beta):
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


def kl_by_hand(student_rows, target_rows, T):
    def softmax(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]
    total = sum(sum(q * math.log(q / p) for p, q in zip(softmax(a), softmax(b)))
                for a, b in zip(student_rows, target_rows))
    return T * T * total / len(student_rows)


def box_by_hand(a_rows, b_rows, labels, beta):
    """Smooth-L1 over the 4 deltas of each foreground row's own class, summed, over the number of rows."""
    total = 0.0
    for a, b, y in zip(a_rows, b_rows, labels):
        if y > 0:
            total += sum(smooth_l1(a[4 * y + j] - b[4 * y + j], beta) for j in range(4))
    return total / len(labels)


# three RoIs (a background one first), two classes plus the background: scores [3, 3], deltas [3, 12]
LABELS = [0, 2, 1]
S_CLS = [[2.0, -1.0, 0.5], [0.1, 0.2, -0.3], [1.0, 0.0, -1.0]]
H_CLS = [[0.3, 1.5, -2.0], [1.0, -1.0, 0.0], [0.2, 0.4, 0.1]]
T_CLS = [[3.0, 0.0, -1.0], [-0.5, 2.0, 0.5], [0.0, 1.0, 0.0]]
rng = np.random.default_rng(0)
S_BOX, H_BOX, T_BOX = (rng.normal(0, 0.3, (3, 12)).tolist() for _ in range(3))


def test_box_distance_matches_hand_computation_on_foreground_rois_of_their_own_class():
    for beta in (1 / 9, 1.0):
        got = losses.box_distance(f64(S_BOX), f64(T_BOX), torch.tensor(LABELS), beta)
        assert got.item() == pytest.approx(box_by_hand(S_BOX, T_BOX, LABELS, beta), abs=1e-12)
    # a background RoI's deltas, and other classes' deltas of a foreground RoI, do not count
    moved = f64(S_BOX)
    moved[0] += 5.0
    moved[1, :8] += 5.0
    assert torch.equal(losses.box_distance(moved, f64(T_BOX), torch.tensor(LABELS)),
                       losses.box_distance(f64(S_BOX), f64(T_BOX), torch.tensor(LABELS)))
    assert losses.box_distance(f64(S_BOX), f64(T_BOX), torch.tensor([0, 0, 0])).item() == 0.0


def test_torchvision_fastrcnn_loss_normalises_boxes_as_box_distance_does():
    """D against regression targets is torchvision's own `loss_box_reg`."""
    from torchvision.models.detection.roi_heads import fastrcnn_loss
    targets = f64(T_BOX).reshape(3, 3, 4)[torch.arange(3), torch.tensor(LABELS)]
    _, box_reg = fastrcnn_loss(f64(S_CLS), f64(S_BOX), [torch.tensor(LABELS)], [targets])
    assert box_reg.item() == pytest.approx(losses.box_distance(f64(S_BOX), f64(T_BOX), torch.tensor(LABELS)).item(),
                                           abs=1e-12)


def grads(term, inputs):
    found = torch.autograd.grad(term, inputs, allow_unused=True, retain_graph=True)
    return [g is not None and bool(g.abs().sum() > 0) for g in found]


def test_shake_terms_match_hand_computation_and_stop_gradients_both_ways():
    s_cls, s_box, h_cls, h_box = (f64(v).requires_grad_() for v in (S_CLS, S_BOX, H_CLS, H_BOX))
    t_cls, t_box, y = f64(T_CLS), f64(T_BOX), torch.tensor(LABELS)
    T, lam, w, beta = 2.0, 0.5, 3.0, 1 / 9
    terms = losses.det_shake_loss(s_cls, s_box, h_cls, h_box, t_cls, t_box, y, temperature=T, mutual=lam,
                                  teacher=w, beta=beta)
    expected = {
        'kl_shadow_teacher': w * kl_by_hand(H_CLS, T_CLS, T),
        'box_shadow_teacher': w * box_by_hand(H_BOX, T_BOX, LABELS, beta),
        'kl_shadow_cls': lam * kl_by_hand(H_CLS, S_CLS, T),
        'box_shadow_cls': lam * box_by_hand(H_BOX, S_BOX, LABELS, beta),
        'kl_cls_shadow': lam * kl_by_hand(S_CLS, H_CLS, T),
        'box_cls_shadow': lam * box_by_hand(S_BOX, H_BOX, LABELS, beta),
    }
    assert terms.keys() == expected.keys()
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-12), name
    inputs = (s_cls, s_box, h_cls, h_box)  # which of them each term moves
    moves = {'kl_shadow_teacher': [0, 0, 1, 0], 'box_shadow_teacher': [0, 0, 0, 1], 'kl_shadow_cls': [0, 0, 1, 0],
             'box_shadow_cls': [0, 0, 0, 1], 'kl_cls_shadow': [1, 0, 0, 0], 'box_cls_shadow': [0, 1, 0, 0]}
    for name, which in moves.items():
        assert grads(terms[name], inputs) == [bool(v) for v in which], name


def test_class_kl_counts_background_rois_and_box_terms_do_not():
    y = torch.tensor(LABELS)
    base = losses.det_shake_loss(f64(S_CLS), f64(S_BOX), f64(H_CLS), f64(H_BOX), f64(T_CLS), f64(T_BOX), y)
    s_cls, s_box = f64(S_CLS), f64(S_BOX)
    s_cls[0] += f64([1.0, -2.0, 0.0])  # the background RoI's scores and deltas
    s_box[0] += 3.0
    moved = losses.det_shake_loss(s_cls, s_box, f64(H_CLS), f64(H_BOX), f64(T_CLS), f64(T_BOX), y)
    assert moved['kl_cls_shadow'] != base['kl_cls_shadow']
    assert moved['box_cls_shadow'] == base['box_cls_shadow']


def test_kd_terms_go_from_the_teacher_straight_to_the_students_predictor():
    s_cls, s_box = f64(S_CLS).requires_grad_(), f64(S_BOX).requires_grad_()
    terms = losses.det_kd_loss(s_cls, s_box, None, None, f64(T_CLS), f64(T_BOX), torch.tensor(LABELS),
                               temperature=1.0, teacher=2.0)
    assert terms['kl_cls_teacher'].item() == pytest.approx(2 * kl_by_hand(S_CLS, T_CLS, 1.0), abs=1e-12)
    assert terms['box_cls_teacher'].item() == pytest.approx(2 * box_by_hand(S_BOX, T_BOX, LABELS, 1 / 9), abs=1e-12)
    assert grads(terms['kl_cls_teacher'], (s_cls, s_box)) == [True, False]
    assert grads(terms['box_cls_teacher'], (s_cls, s_box)) == [False, True]


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


def write_coco(root, categories=({'id': 1, 'name': 'cat'}, {'id': 3, 'name': 'dog'}), bad_category=False):
    """COCO's layout: annotations/instances_{train,val}2017.json, train2017/, val2017/. Train image 0 has a normal
    box, a crowd box, a box running out of the image and one of zero width; image 1 has no annotations."""
    rng = np.random.default_rng(0)
    from PIL import Image
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


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp('coco'))


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
    with pytest.raises(Exception, match='002.png'):
        splits.train[2]


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

def tiny_batch(n=2, size=64):
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
    task = DetectionTask(student, teacher, lambda *o: losses.det_kd_loss(*o), [0.485, 0.456, 0.406],
                         [0.229, 0.224, 0.225]).eval()
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

    from shake_vit.build import build_optimization
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
    optimizer, schedule, d = build_optimization(cfg, student, num_processes=8, batches_per_epoch=7330)
    assert d.global_batch == 16 and d.lr == pytest.approx(0.02) and d.total_updates == 24 * 7330
    assert type(optimizer).__name__ == 'SGD' and optimizer.defaults['momentum'] == 0.9
    assert {g['weight_decay'] for g in optimizer.param_groups} == {1e-4}

    def lr_at(epoch):
        schedule.step_update(num_updates=int(epoch * 7330))
        return optimizer.param_groups[0]['lr']
    assert lr_at(0) == pytest.approx(2e-5) and lr_at(1) == pytest.approx(0.02)
    assert lr_at(16.5) == pytest.approx(0.002) and lr_at(23) == pytest.approx(0.0002)


# ------------------------------------------------------------------------------------------------- whole runs

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
