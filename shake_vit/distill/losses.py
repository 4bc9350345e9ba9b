"""Distillation losses as pure functions on logits.

Every function takes logits shaped [B, K] (K classes) and returns a dict of *weighted* loss terms whose sum is the
training loss, so every term reaches TensorBoard under its own name and `sum(terms.values())` is what backpropagates.
Nothing here owns parameters, runs a model, or knows about the training loop.

Notation follows `docs/method.md`: `s` are the student's classification-head logits, `h` the shadow head's, `t` the
frozen teacher's, `y` the labels (class indices [B] or mixup soft targets [B, K]).
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Terms = Dict[str, torch.Tensor]

KL_REDUCTIONS = ('batchmean', 'numel')


def kl_t(student: torch.Tensor, target: torch.Tensor, temperature: float, reduction: str = 'batchmean') -> torch.Tensor:
    """`KL_T(student -> target) = T^2 * KL(softmax(target / T) || softmax(student / T))`, averaged over the batch.

    `reduction='batchmean'` (the default, timm's) sums over classes and averages over samples: the textbook KL.
    `reduction='numel'` is DeiT's soft loss, `sum / numel`: the batch mean divided by the class count
    (`tests/test_losses.py` pins the difference). Gradients flow into both arguments: callers detach the side that
    must not move.
    """
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_target = F.log_softmax(target / temperature, dim=-1)
    if reduction == 'numel':
        kl = F.kl_div(log_p_student, log_p_target, reduction='sum', log_target=True) / student.numel()
    else:
        kl = F.kl_div(log_p_student, log_p_target, reduction='batchmean', log_target=True)
    return kl * temperature ** 2


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The SHAKE authors' logit standardisation: `pi * (z - mean(z)) / std(z)` over the class dimension.

    Their code hard-codes 100 classes in a LayerNorm; this reads the class count from the tensor.
    """
    return math.pi * F.layer_norm(logits, logits.shape[-1:], eps=eps)


@dataclass(frozen=True)
class ShakeWeights:
    """Switches of the SHAKE loss; the defaults are the paper's Eq. 5 with lambda = 1, T = 4.

    Attributes:
        temperature: T of every KL term.
        mutual: lambda, the weight of both mutual terms (shadow <- cls and cls <- shadow).
        mutual_student: the cls <- shadow term's own weight (None: `mutual`).
        mutual_shadow: the shadow <- cls term's own weight (None: `mutual`).
        teacher: weight of the shadow head's pull toward the teacher.
        teacher_loss: 'kl' (paper) or 'mse' (authors' code) toward the teacher.
        standardize: standardise all logits before any term (authors' code).
        shadow_ce: weight of ground truth on the shadow head (authors' code 1, paper 0).
        direct_kd: weight of a direct student <- teacher KL (authors' code has it at 0).
    """

    temperature: float = 4.0
    mutual: float = 1.0
    mutual_student: Optional[float] = None
    mutual_shadow: Optional[float] = None
    teacher: float = 1.0
    teacher_loss: str = 'kl'
    standardize: bool = False
    shadow_ce: float = 0.0
    direct_kd: float = 0.0


def shake_loss(s: torch.Tensor, h, t, y: torch.Tensor, ce: Criterion, w: ShakeWeights = ShakeWeights()) -> Terms:
    """SHAKE: each shadow head follows its teacher while it and the classification head distill each other.

    Paper form (Eq. 5), one teacher:
        shadow:  KL_T(h -> t) + lambda * KL_T(h -> sg(s))
        student: CE(s, y)     + lambda * KL_T(s -> sg(h))
    With several teachers (Eq. 6), `h` and `t` are sequences: one shadow head per teacher, each in mutual
    distillation with the student, whose loss sums lambda * KL over all shadow heads (terms suffixed _0, _1, ...).
    The authors'-code form is the same loss with `standardize=True, teacher_loss='mse', shadow_ce=1`.
    """
    hs, ts = ([h], [t]) if isinstance(h, torch.Tensor) else (list(h), list(t))
    if w.standardize:
        s, hs, ts = standardize(s), [standardize(x) for x in hs], [standardize(x) for x in ts]
    T = w.temperature
    to_shadow = w.mutual if w.mutual_shadow is None else w.mutual_shadow
    to_student = w.mutual if w.mutual_student is None else w.mutual_student
    terms = {'ce_cls': ce(s, y)}
    for i, (hi, ti) in enumerate(zip(hs, ts)):
        k = '' if len(hs) == 1 else f'_{i}'
        if w.teacher_loss == 'mse':
            terms[f'mse_shadow_teacher{k}'] = w.teacher * F.mse_loss(hi, ti)
        else:
            terms[f'kl_shadow_teacher{k}'] = w.teacher * kl_t(hi, ti, T)
        # Reversed distillation: the shadow head (proxy teacher) learns from the student; sg(s) keeps it one-way.
        terms[f'kl_shadow_cls{k}'] = to_shadow * kl_t(hi, s.detach(), T)
        terms[f'kl_cls_shadow{k}'] = to_student * kl_t(s, hi.detach(), T)
        if w.shadow_ce:
            terms[f'ce_shadow{k}'] = w.shadow_ce * ce(hi, y)
        if w.direct_kd:
            terms[f'kl_cls_teacher{k}'] = w.direct_kd * kl_t(s, ti, T)
    return terms


def deit_hard_loss(s: torch.Tensor, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor, ce: Criterion,
                   alpha: float = 0.5) -> Terms:
    """DeiT hard distillation: `(1 - a) * CE(s, y) + a * CE(h, argmax t)`, no label smoothing on the teacher side."""
    return {
        'ce_cls': (1 - alpha) * ce(s, y),
        'ce_shadow_teacher': alpha * F.cross_entropy(h, t.argmax(dim=-1)),
    }


def deit_hard_cls_loss(s: torch.Tensor, h: Optional[torch.Tensor], t: torch.Tensor, y: torch.Tensor, ce: Criterion,
                       alpha: float = 0.5) -> Terms:
    """Hard distillation on the class token alone, no distillation token (DeiT's ablation row, the SHAKE paper's
    "hard 74.30"): `(1 - a) * CE(s, y) + a * CE(s, argmax t)`, no label smoothing on the teacher side."""
    return {
        'ce_cls': (1 - alpha) * ce(s, y),
        'ce_cls_teacher': alpha * F.cross_entropy(s, t.argmax(dim=-1)),
    }


def deit_soft_loss(s: torch.Tensor, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor, ce: Criterion,
                   alpha: float = 0.5, temperature: float = 1.0, reduction: str = 'batchmean') -> Terms:
    """DeiT soft distillation: `(1 - a) * CE(s, y) + a * KL_T(h -> t)`; the KL's `reduction` as in `kl_t` (DeiT's
    own code uses 'numel', which weighs the KL term K times less than the default 'batchmean')."""
    return {
        'ce_cls': (1 - alpha) * ce(s, y),
        'kl_shadow_teacher': alpha * kl_t(h, t, temperature, reduction),
    }


def kd_loss(s: torch.Tensor, h: Optional[torch.Tensor], t: torch.Tensor, y: torch.Tensor, ce: Criterion,
            alpha: float = 0.9, temperature: float = 4.0) -> Terms:
    """Hinton KD on the classification head: `(1 - a) * CE(s, y) + a * KL_T(s -> t)`; the shadow head is unused.

    The defaults are the CRD protocol's (`-r 0.1 -a 0.9`, T = 4) that the SHAKE paper's KD rows use.
    """
    return {
        'ce_cls': (1 - alpha) * ce(s, y),
        'kl_cls_teacher': alpha * kl_t(s, t, temperature),
    }


def label_loss(s: torch.Tensor, h: Optional[torch.Tensor], t: Optional[torch.Tensor], y: torch.Tensor,
               ce: Criterion) -> Terms:
    """No distillation: the classification head learns from the labels, as a plain DeiT or CNN is trained."""
    return {'ce_cls': ce(s, y)}


def both_heads_label_loss(s: torch.Tensor, h: torch.Tensor, t: Optional[torch.Tensor], y: torch.Tensor,
                          ce: Criterion) -> Terms:
    """No distillation, both heads on the labels: DeiT's distilled architecture trained without a teacher."""
    return {'ce_cls': ce(s, y), 'ce_shadow': ce(h, y)}


