"""Detection's loss terms by hand on small tensors: each term's value, where its gradients go (stop-gradients both
ways), background RoIs in the class KL and not in the box distance, the box distance and the anchored shadow against
torchvision's own losses, the balanced forms, the teacher-bounded box term and the ramps."""
import math

import numpy as np
import pytest
import torch

from shake_vit.detection import losses as losses
from shake_vit.detection.losses import DetWeights, RoIOutputs


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
REG = rng.normal(0, 0.3, (3, 4)).tolist()  # the ground truth's deltas per RoI (zeros for background in torchvision)
CE = 0.7  # stands in for the detector's own cross-entropy


def outputs(grad=False, **changes):
    """The three RoIs as RoIOutputs; with `grad`, the student's and shadow's outputs require gradients."""
    values = dict(s_cls=S_CLS, s_box=S_BOX, h_cls=H_CLS, h_box=H_BOX, t_cls=T_CLS, t_box=T_BOX)
    values.update(changes)
    t = {k: f64(v).requires_grad_(grad and not k.startswith('t_')) for k, v in values.items()}
    return RoIOutputs(t['s_cls'], t['s_box'], torch.tensor(LABELS), f64(REG), f64(CE), t['t_cls'], t['t_box'],
                      t['h_cls'], t['h_box'])


def kl_rows_by_hand(student_rows, target_rows, T):
    return [kl_by_hand([a], [b], T) for a, b in zip(student_rows, target_rows)]



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


OLD = dict(anchor=0.0, balance='none', box='distance')  # the first detection SHAKE: no anchor, no balance


def test_shake_terms_match_hand_computation_and_stop_gradients_both_ways():
    o = outputs(grad=True)
    T, to_student, to_shadow, w, beta = 2.0, 0.5, 0.25, 3.0, 1 / 9
    terms = losses.det_shake_loss(o, DetWeights(temperature=T, to_student=to_student, to_shadow=to_shadow, teacher=w,
                                                beta=beta, **OLD))
    expected = {
        'kl_shadow_teacher': w * kl_by_hand(H_CLS, T_CLS, T),
        'box_shadow_teacher': w * box_by_hand(H_BOX, T_BOX, LABELS, beta),
        'kl_shadow_cls': to_shadow * kl_by_hand(H_CLS, S_CLS, T),
        'box_shadow_cls': to_shadow * box_by_hand(H_BOX, S_BOX, LABELS, beta),
        'kl_cls_shadow': to_student * kl_by_hand(S_CLS, H_CLS, T),
        'box_cls_shadow': to_student * box_by_hand(S_BOX, H_BOX, LABELS, beta),
    }
    assert terms.keys() == expected.keys()
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-12), name
    inputs = (o.s_cls, o.s_box, o.h_cls, o.h_box)  # which of them each term moves
    moves = {'kl_shadow_teacher': [0, 0, 1, 0], 'box_shadow_teacher': [0, 0, 0, 1], 'kl_shadow_cls': [0, 0, 1, 0],
             'box_shadow_cls': [0, 0, 0, 1], 'kl_cls_shadow': [1, 0, 0, 0], 'box_cls_shadow': [0, 1, 0, 0]}
    for name, which in moves.items():
        assert grads(terms[name], inputs) == [bool(v) for v in which], name
        # the side a term is logged under is the side its gradients reach
        assert losses.side(name) == ('student' if which[0] or which[1] else 'shadow'), name
    # a zero weight leaves its direction out altogether
    assert not {'kl_shadow_cls', 'box_shadow_cls'} & set(losses.det_shake_loss(o, DetWeights(to_shadow=0.0, **OLD)))


def test_class_kl_counts_background_rois_and_box_terms_do_not():
    base = losses.det_shake_loss(outputs(), DetWeights(**OLD))
    s_cls, s_box = f64(S_CLS), f64(S_BOX)
    s_cls[0] += f64([1.0, -2.0, 0.0])  # the background RoI's scores and deltas
    s_box[0] += 3.0
    moved = losses.det_shake_loss(outputs(s_cls=s_cls.tolist(), s_box=s_box.tolist()), DetWeights(**OLD))
    assert moved['kl_cls_shadow'] != base['kl_cls_shadow']
    assert moved['box_cls_shadow'] == base['box_cls_shadow']


def test_kd_terms_go_from_the_teacher_straight_to_the_students_predictor():
    o = outputs(grad=True)
    terms = losses.det_kd_loss(o, DetWeights(temperature=1.0, teacher=2.0, **OLD))
    assert terms.keys() == {'kl_cls_teacher', 'box_cls_teacher'}
    assert terms['kl_cls_teacher'].item() == pytest.approx(2 * kl_by_hand(S_CLS, T_CLS, 1.0), abs=1e-12)
    assert terms['box_cls_teacher'].item() == pytest.approx(2 * box_by_hand(S_BOX, T_BOX, LABELS, 1 / 9), abs=1e-12)
    assert grads(terms['kl_cls_teacher'], (o.s_cls, o.s_box)) == [True, False]
    assert grads(terms['box_cls_teacher'], (o.s_cls, o.s_box)) == [False, True]


def test_chen_balance_makes_the_label_and_distillation_weights_sum_to_one():
    """Chen et al.: mu * CE(labels) + (1 - mu) * KL, for kd (toward the teacher) and SHAKE (toward the shadow)."""
    mu, T = 0.3, 2.0
    kd = losses.det_kd_loss(outputs(), DetWeights(balance='chen', label_weight=mu, temperature=T, box='none'))
    assert kd.keys() == {'loss_classifier', 'kl_cls_teacher'}  # the detector's own CE is replaced, rescaled
    assert kd['loss_classifier'].item() == pytest.approx(mu * CE, abs=1e-12)
    assert kd['kl_cls_teacher'].item() == pytest.approx((1 - mu) * kl_by_hand(S_CLS, T_CLS, T), abs=1e-12)
    shake = losses.det_shake_loss(outputs(), DetWeights(balance='chen', label_weight=mu, temperature=T, to_student=1.0))
    assert shake['loss_classifier'].item() == pytest.approx(mu * CE, abs=1e-12)
    assert shake['kl_cls_shadow'].item() == pytest.approx((1 - mu) * kl_by_hand(S_CLS, H_CLS, T), abs=1e-12)
    # the shadow's own terms are not rebalanced
    assert shake['kl_shadow_teacher'].item() == pytest.approx(kl_by_hand(H_CLS, T_CLS, T), abs=1e-12)


def test_defeat_balance_averages_foreground_and_background_rois_separately():
    T = 1.0
    rows = kl_rows_by_hand(S_CLS, T_CLS, T)  # RoI 0 is background, 1 and 2 foreground
    expected = 1.5 * (rows[0] / 1 + (rows[1] + rows[2]) / 2)
    terms = losses.det_kd_loss(outputs(), DetWeights(balance='defeat', teacher=1.5, temperature=T))
    assert terms['kl_cls_teacher'].item() == pytest.approx(expected, abs=1e-12)
    assert 'loss_classifier' not in terms  # the detector's CE stays at full weight
    # with no background RoI in the batch the empty group adds nothing
    only_fg = RoIOutputs(f64(S_CLS), f64(S_BOX), torch.tensor([1, 2, 1]), f64(REG), f64(CE), f64(T_CLS), f64(T_BOX))
    assert losses.det_kd_loss(only_fg, DetWeights(balance='defeat'))['kl_cls_teacher'].item() == pytest.approx(
        sum(kl_rows_by_hand(S_CLS, T_CLS, 1.0)) / 3, abs=1e-12)


def test_bounded_box_term_penalises_only_where_the_student_is_worse_than_its_bound():
    """Chen et al.: ||s - y||^2 where ||s - y||^2 + m > ||t - y||^2, else 0; y the ground truth's deltas."""
    y = torch.tensor(LABELS)

    def by_hand(margin):
        total = 0.0
        for r, label in enumerate(LABELS):
            if label == 0:
                continue
            err = sum((S_BOX[r][4 * label + j] - REG[r][j]) ** 2 for j in range(4))
            bound = sum((T_BOX[r][4 * label + j] - REG[r][j]) ** 2 for j in range(4))
            total += err if err + margin > bound else 0.0
        return total / len(LABELS)
    for margin in (0.0, 0.1, 10.0):
        got = losses.bounded_box(f64(S_BOX), f64(T_BOX), y, f64(REG), margin)
        assert got.item() == pytest.approx(by_hand(margin), abs=1e-12)
    # a student already better than its bound on every RoI gets nothing; its target is the ground truth, not t
    perfect = f64(S_BOX).reshape(3, 3, 4)
    perfect[torch.arange(3), y] = f64(REG)
    assert losses.bounded_box(perfect.reshape(3, 12), f64(T_BOX), y, f64(REG)).item() == 0.0
    o = outputs(grad=True)
    terms = losses.det_kd_loss(o, DetWeights(box='bounded', bound_margin=0.1, teacher=2.0))
    assert terms['box_cls_teacher'].item() == pytest.approx(2 * by_hand(0.1), abs=1e-12)
    assert grads(terms['box_cls_teacher'], (o.s_cls, o.s_box)) == [False, True]


def test_the_anchored_shadow_gets_torchvisions_roi_losses_on_the_labels():
    from torchvision.models.detection.roi_heads import fastrcnn_loss
    o = outputs(grad=True)
    terms = losses.det_shake_loss(o, DetWeights(anchor=0.5))
    ce, reg = fastrcnn_loss(f64(H_CLS), f64(H_BOX), [torch.tensor(LABELS)], [f64(REG)])
    assert terms['anchor_classifier'].item() == pytest.approx(0.5 * ce.item(), abs=1e-12)
    assert terms['anchor_box_reg'].item() == pytest.approx(0.5 * reg.item(), abs=1e-12)
    inputs = (o.s_cls, o.s_box, o.h_cls, o.h_box)
    assert grads(terms['anchor_classifier'], inputs) == [False, False, True, False]
    assert grads(terms['anchor_box_reg'], inputs) == [False, False, False, True]
    assert losses.side('anchor_classifier') == 'shadow'
    assert 'anchor_classifier' not in losses.det_shake_loss(o, DetWeights(anchor=0.0))


def test_ramps_scale_their_direction_by_the_share_of_the_warmup_done():
    w = DetWeights(to_student=0.8, to_shadow=0.4, ramp_student=True, **OLD)
    full = losses.det_shake_loss(outputs(), w, ramp=1.0)
    for r in (0.0, 0.25):
        part = losses.det_shake_loss(outputs(), w, ramp=r)
        assert part['kl_cls_shadow'].item() == pytest.approx(r * full['kl_cls_shadow'].item(), abs=1e-12)
        assert part['kl_shadow_cls'].item() == full['kl_shadow_cls'].item()  # not ramped
        assert part['kl_shadow_teacher'].item() == full['kl_shadow_teacher'].item()
    # under Chen's balance the cross-entropy's share follows the ramp: the weights sum to one throughout
    chen = DetWeights(balance='chen', label_weight=0.3, ramp_student=True, box='none', anchor=0.0)
    for r in (0.0, 0.5, 1.0):
        terms = losses.det_shake_loss(outputs(), chen, ramp=r)
        assert terms['loss_classifier'].item() == pytest.approx((1 - 0.7 * r) * CE, abs=1e-12)
        assert terms['kl_cls_shadow'].item() == pytest.approx(r * 0.7 * kl_by_hand(S_CLS, H_CLS, 1.0), abs=1e-12)
    w = DetWeights(to_shadow=0.4, ramp_shadow=True, **OLD)
    assert losses.det_shake_loss(outputs(), w, ramp=0.5)['kl_shadow_cls'].item() == pytest.approx(
        0.5 * losses.det_shake_loss(outputs(), w)['kl_shadow_cls'].item(), abs=1e-12)


def test_monitors_are_the_foreground_accuracy_and_the_shadows_kl_from_the_teacher():
    m = losses.monitors(outputs())
    # RoI 1 (label 2): argmax of [0.1, 0.2, -0.3] is 1, wrong; RoI 2 (label 1): argmax of [1, 0, -1] is 0, wrong
    assert m['monitor_fg_acc'].item() == 0.0
    s_cls = [row[:] for row in S_CLS]
    s_cls[1] = [0.0, 0.0, 3.0]
    assert losses.monitors(outputs(s_cls=s_cls))['monitor_fg_acc'].item() == 0.5
    assert m['monitor_shadow_kl'].item() == pytest.approx(kl_by_hand(H_CLS, T_CLS, 1.0), abs=1e-6)
