"""Detection's loss terms by hand on small tensors: each term's value, where its gradients go (stop-gradients both
ways), background RoIs in the class KL and not in the box distance, and the box distance against torchvision's."""
import math

import numpy as np
import pytest
import torch

from shake_vit import losses


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
