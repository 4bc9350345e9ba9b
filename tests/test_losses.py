"""Exact checks of the loss math on tiny tensors, the KL reduction, and where gradients go."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy

from shake_vit.distill import losses


def f64(values):
    return torch.tensor(values, dtype=torch.float64)  # hand computations below compare at 1e-12


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl_by_hand(student_rows, target_rows, T):
    """T^2 * mean over rows of sum_k p_t log(p_t / p_s), written out with the math module."""
    total = 0.0
    for a, b in zip(student_rows, target_rows):
        ps, pt = softmax([v / T for v in a]), softmax([v / T for v in b])
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    return T * T * total / len(student_rows)


S = [[2.0, -1.0, 0.5], [0.1, 0.2, -0.3]]
H = [[0.3, 1.5, -2.0], [1.0, -1.0, 0.0]]
TT = [[3.0, 0.0, -1.0], [-0.5, 2.0, 0.5]]
Y = torch.tensor([0, 1])


def ce(z, y):
    return F.cross_entropy(z, y)


def test_kl_t_matches_hand_computation_and_scales_with_t_squared():
    s, t = f64(S), f64(TT)
    for T in (1.0, 4.0):
        assert losses.kl_t(s, t, T).item() == pytest.approx(kl_by_hand(S, TT, T), abs=1e-12)
    # T^2 scaling: same softened distributions, T^2 times the plain KL.
    plain = F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction='batchmean')
    assert losses.kl_t(s, t, 4.0).item() == pytest.approx(16 * plain.item(), abs=1e-12)


def test_kl_reduction_is_batchmean_which_is_deit_sum_over_numel_times_classes():
    s, t = f64(S), f64(TT)
    T = 2.0
    # facebookresearch/deit losses.py, distillation_type 'soft', written out:
    deit = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction='sum', log_target=True) \
        * T * T / s.numel()
    num_classes = s.shape[1]
    assert losses.kl_t(s, t, T).item() == pytest.approx(deit.item() * num_classes, abs=1e-12)
    assert losses.kl_t(s, t, T, reduction='numel').item() == pytest.approx(deit.item(), abs=1e-12)


def test_deit_soft_at_deits_own_scale_is_a_switch():
    from shake_vit.core.config import load_config
    from shake_vit.distill.methods import loss_fn
    s, h, t = f64(S), f64(H), f64(TT)
    default = loss_fn(load_config(None, ['loss.method=deit_soft']))(s, h, t, Y, ce)
    deit = loss_fn(load_config(None, ['loss.method=deit_soft', 'loss.deit_soft_reduction=numel']))(s, h, t, Y, ce)
    assert default['kl_shadow_teacher'].item() == pytest.approx(0.5 * kl_by_hand(H, TT, 1.0), abs=1e-12)
    assert deit['kl_shadow_teacher'].item() == pytest.approx(0.5 * kl_by_hand(H, TT, 1.0) / 3, abs=1e-12)
    assert deit['ce_cls'].item() == default['ce_cls'].item()


def test_standardize_is_pi_times_zscore_over_classes_for_any_class_count():
    for k in (3, 7, 100):
        z = torch.randn(4, k, dtype=torch.float64)
        mean = z.mean(-1, keepdim=True)
        std = ((z - mean) ** 2).mean(-1, keepdim=True).sqrt()  # biased, as LayerNorm
        assert torch.allclose(losses.standardize(z), math.pi * (z - mean) / std, atol=1e-6)


def test_shake_paper_terms_by_hand():
    s, h, t = f64(S), f64(H), f64(TT)
    w = losses.ShakeWeights(temperature=4.0, mutual=0.5)
    terms = losses.shake_loss(s, h, t, Y, ce, w)
    assert set(terms) == {'ce_cls', 'kl_shadow_teacher', 'kl_shadow_cls', 'kl_cls_shadow'}
    assert terms['ce_cls'].item() == pytest.approx(F.cross_entropy(s, Y).item())
    assert terms['kl_shadow_teacher'].item() == pytest.approx(kl_by_hand(H, TT, 4.0), abs=1e-12)
    assert terms['kl_shadow_cls'].item() == pytest.approx(0.5 * kl_by_hand(H, S, 4.0), abs=1e-12)
    assert terms['kl_cls_shadow'].item() == pytest.approx(0.5 * kl_by_hand(S, H, 4.0), abs=1e-12)


def test_shake_authors_code_form_is_switches_of_the_same_loss():
    s, h, t = f64(S), f64(H), f64(TT)
    w = losses.ShakeWeights(temperature=4.0, standardize=True, teacher_loss='mse', shadow_ce=1.0, direct_kd=0.25)
    terms = losses.shake_loss(s, h, t, Y, ce, w)
    ns, nh, nt = (losses.standardize(x) for x in (s, h, t))
    assert set(terms) == {'ce_cls', 'mse_shadow_teacher', 'kl_shadow_cls', 'kl_cls_shadow', 'ce_shadow',
                          'kl_cls_teacher'}
    assert terms['ce_cls'].item() == pytest.approx(F.cross_entropy(ns, Y).item())
    assert terms['mse_shadow_teacher'].item() == pytest.approx(((nh - nt) ** 2).mean().item())
    assert terms['ce_shadow'].item() == pytest.approx(F.cross_entropy(nh, Y).item())
    assert terms['kl_cls_teacher'].item() == pytest.approx(0.25 * losses.kl_t(ns, nt, 4.0).item())
    assert terms['kl_shadow_cls'].item() == pytest.approx(losses.kl_t(nh, ns, 4.0).item())


def _leaves():
    return [f64(v).requires_grad_() for v in (S, H, TT)]


@pytest.mark.parametrize('term, moves', [
    ('kl_shadow_cls', 'h'),  # reversed distillation: sg(s) -> only the shadow logits move
    ('kl_cls_shadow', 's'),  # sg(h) -> only the student logits move
    ('kl_shadow_teacher', 'h'),
    ('ce_cls', 's'),
])
def test_each_stop_gradient_holds(term, moves):
    s, h, t = _leaves()
    t_fixed = t.detach()  # the task computes teacher logits under no_grad
    terms = losses.shake_loss(s, h, t_fixed, Y, ce)
    terms[term].backward()
    grads = {'s': s.grad, 'h': h.grad}
    assert grads[moves] is not None and grads[moves].abs().sum() > 0
    other = 'h' if moves == 's' else 's'
    assert grads[other] is None


def test_deit_hard_uses_teacher_argmax_without_label_smoothing():
    s, h, t = f64(S), f64(H), f64(TT)
    smooth = LabelSmoothingCrossEntropy(0.1)
    terms = losses.deit_hard_loss(s, h, t, Y, smooth, alpha=0.5)
    assert terms['ce_cls'].item() == pytest.approx(0.5 * smooth(s, Y).item())
    assert terms['ce_shadow_teacher'].item() == pytest.approx(0.5 * F.cross_entropy(h, t.argmax(1)).item())


def test_deit_hard_cls_distils_the_teacher_argmax_into_the_class_token_by_hand():
    """DeiT's ablation row: 0.5 CE(s, y) + 0.5 CE(s, argmax t), both on the class token; teacher argmax [0, 1] here."""
    s = f64(S).requires_grad_()
    terms = losses.deit_hard_cls_loss(s, None, f64(TT), Y, ce, alpha=0.5)

    def ce_by_hand(rows, labels):
        return sum(math.log(sum(math.exp(v) for v in row)) - row[label] for row, label in zip(rows, labels)) / len(rows)
    assert terms['ce_cls'].item() == pytest.approx(0.5 * ce_by_hand(S, [0, 1]), abs=1e-12)
    assert terms['ce_cls_teacher'].item() == pytest.approx(0.5 * ce_by_hand(S, [0, 1]), abs=1e-12)
    other = losses.deit_hard_cls_loss(f64(S), None, f64([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]), Y, ce, alpha=0.25)
    assert other['ce_cls_teacher'].item() == pytest.approx(0.25 * ce_by_hand(S, [2, 0]), abs=1e-12)
    assert other['ce_cls'].item() == pytest.approx(0.75 * ce_by_hand(S, [0, 1]), abs=1e-12)
    assert set(terms) == {'ce_cls', 'ce_cls_teacher'}  # no shadow head, no distillation token
    torch.autograd.grad(sum(terms.values()), s)  # the class token's logits carry both terms
    from shake_vit.distill import methods
    m = methods.get('deit_hard_cls')
    assert m.needs_teacher and not m.trains_shadow and m.predict == 'cls' and m.argmax_only


def test_deit_soft_and_kd_weights():
    s, h, t = f64(S), f64(H), f64(TT)
    soft = losses.deit_soft_loss(s, h, t, Y, ce, alpha=0.3, temperature=1.0)
    assert soft['ce_cls'].item() == pytest.approx(0.7 * F.cross_entropy(s, Y).item())
    assert soft['kl_shadow_teacher'].item() == pytest.approx(0.3 * kl_by_hand(H, TT, 1.0), abs=1e-12)
    kd = losses.kd_loss(s, h, t, Y, ce, alpha=0.9, temperature=4.0)
    assert kd['ce_cls'].item() == pytest.approx(0.1 * F.cross_entropy(s, Y).item())
    assert kd['kl_cls_teacher'].item() == pytest.approx(0.9 * kl_by_hand(S, TT, 4.0), abs=1e-12)


def test_none_trains_the_cls_head_alone_and_none_both_heads_both():
    s, h, _ = _leaves()
    terms = losses.label_loss(s, None, None, Y, ce)
    assert set(terms) == {'ce_cls'} and terms['ce_cls'].item() == pytest.approx(F.cross_entropy(s, Y).item())
    terms = losses.both_heads_label_loss(s, h, None, Y, ce)
    sum(terms.values()).backward()
    assert s.grad is not None and h.grad is not None
    assert terms['ce_shadow'].item() == pytest.approx(F.cross_entropy(h.detach(), Y).item())


def test_soft_targets_from_mixup_work_with_every_method():
    from timm.loss import SoftTargetCrossEntropy
    s, h, t = f64(S), f64(H), f64(TT)
    soft_y = f64([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    for fn in (losses.shake_loss, losses.deit_hard_loss, losses.deit_soft_loss, losses.kd_loss, losses.label_loss,
               losses.both_heads_label_loss):
        terms = fn(s, h, t, soft_y, SoftTargetCrossEntropy())
        assert all(torch.isfinite(v) for v in terms.values())


def test_two_teachers_one_shadow_head_each_student_sums_the_mutual_terms():
    s, h, t = f64(S), f64(H), f64(TT)
    h2, t2 = f64(TT), f64(H)  # a second shadow head and teacher
    w = losses.ShakeWeights(temperature=4.0, mutual=0.5)
    terms = losses.shake_loss(s, (h, h2), (t, t2), Y, ce, w)
    assert set(terms) == {'ce_cls', 'kl_shadow_teacher_0', 'kl_shadow_cls_0', 'kl_cls_shadow_0',
                          'kl_shadow_teacher_1', 'kl_shadow_cls_1', 'kl_cls_shadow_1'}
    single = [losses.shake_loss(s, hi, ti, Y, ce, w) for hi, ti in ((h, t), (h2, t2))]
    for i, one in enumerate(single):
        for name in ('kl_shadow_teacher', 'kl_shadow_cls', 'kl_cls_shadow'):
            assert terms[f'{name}_{i}'].item() == pytest.approx(one[name].item(), abs=1e-12)
    assert terms['kl_cls_shadow_1'].item() == pytest.approx(0.5 * kl_by_hand(S, TT, 4.0), abs=1e-12)
