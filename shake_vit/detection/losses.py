"""Detection's distillation terms: per-RoI losses on the box predictors of a Faster R-CNN.

Every term compares outputs for the same sampled RoIs [R] (`RoIOutputs`): class logits [R, K + 1] (background
included) and box deltas [R, 4 (K + 1)] of the student's predictor `s`, the shadow predictor `h` and the teacher `t`,
with the RoIs' ground-truth classes `labels` [R] (0: background) and box targets `regression_targets` [R, 4] (the
ground truth's deltas, torchvision's box coding). Like shake_vit/distill/losses.py, functions return *weighted* terms
whose sum is what backpropagates; nothing here runs a model.

Term names say who is pulled toward whom, `<kind>_<pulled>_<target>`: `kl_cls_shadow` pulls the student's ("cls")
predictor toward the shadow's. `side(name)` tells which parameters a term trains (stop-gradients make it exact).
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torchvision.models.detection.roi_heads import fastrcnn_loss

from ..distill.losses import Terms, kl_t

BALANCES = ('none', 'chen', 'defeat')
BOX_TERMS = ('distance', 'bounded', 'none')


@dataclass
class RoIOutputs:
    """One step's outputs on the student's sampled RoIs, row for row (a shadow or a teacher may be absent)."""

    s_cls: torch.Tensor
    s_box: torch.Tensor
    labels: torch.Tensor
    regression_targets: torch.Tensor
    loss_classifier: torch.Tensor  # the detector's own cross-entropy on `s_cls` (torchvision's fastrcnn_loss)
    t_cls: Optional[torch.Tensor] = None
    t_box: Optional[torch.Tensor] = None
    h_cls: Optional[torch.Tensor] = None
    h_box: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class DetWeights:
    """Switches of detection distillation (`loss.*`; docs/detection.md says which setting each default came from).

    Attributes:
        temperature: T of every class KL.
        teacher: weight of the pull toward the teacher (the shadow's in SHAKE, the student's in KD).
        to_student: SHAKE, student <- shadow weight (class and box).
        to_shadow: SHAKE, shadow <- student weight.
        ramp_student: ramp `to_student` in linearly over the lr warm-up.
        ramp_shadow: ramp `to_shadow` in likewise.
        anchor: weight of torchvision's RoI losses on the labels on the shadow's outputs (the authors' CNN code
            anchors its shadow with cross-entropy on the labels).
        balance: how the student's class distillation sits beside its cross-entropy: 'none' (added at full weight),
            'chen' (Chen et al. 2017: `label_weight * CE + (1 - label_weight) * KL`, weights summing to one) or
            'defeat' (DeFeat: KL averaged over foreground and background RoIs separately, then summed).
        label_weight: 'chen''s mu.
        agree: distil the student's classes only on RoIs whose target (teacher or shadow) puts its top class on the
            label (DeFeat's default): where it does not, its soft target would pull a foreground RoI toward another
            class or the background.
        box: the student's box distillation: 'distance' (smooth-L1 toward the target's deltas), 'bounded' (Chen et
            al.: an L2 penalty only on RoIs where the student's box error exceeds the target's by `bound_margin`; the
            target stays the ground truth) or 'none' (class logits only, as mdistiller's detection DKD).
        bound_margin: m of the bounded term.
        beta: smooth-L1 beta of the box distance (torchvision's 1/9).
    """

    temperature: float = 1.0
    teacher: float = 1.0
    to_student: float = 1.0
    to_shadow: float = 1.0
    ramp_student: bool = False
    ramp_shadow: bool = False
    anchor: float = 0.0
    balance: str = 'none'
    label_weight: float = 0.5
    agree: bool = False
    box: str = 'distance'
    bound_margin: float = 0.0
    beta: float = 1 / 9


def side(name: str) -> str:
    """'shadow' for a shadow-side term, else 'student'. With `det.shadow_on=teacher` (the default) the stop-gradients
    make the split exact: a shadow-side term trains the shadow alone. With `det.shadow_on=student` the shadow reads the
    student's box features, so its terms also reach the student's box head and backbone."""
    return 'shadow' if name.startswith(('kl_shadow', 'box_shadow', 'anchor_')) else 'student'


def _own_class(box: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The deltas [F, 4] of each foreground RoI's ground-truth class."""
    fg = torch.where(labels > 0)[0]
    return rearrange(box, 'r (k four) -> r k four', four=4)[fg, labels[fg]]


def box_distance(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, beta: float = 1 / 9) -> torch.Tensor:
    """`D(a -> b)`: smooth-L1 between the ground-truth class's deltas of the foreground RoIs, summed and divided by
    the number of RoIs, as torchvision's `fastrcnn_loss` normalises its box loss; `a` is pulled toward `b`."""
    return F.smooth_l1_loss(_own_class(a, labels), _own_class(b, labels), beta=beta,
                            reduction='sum') / max(labels.numel(), 1)


def bounded_box(a: torch.Tensor, bound: torch.Tensor, labels: torch.Tensor, regression_targets: torch.Tensor,
                margin: float = 0.0) -> torch.Tensor:
    """Chen et al.'s teacher-bounded regression: per foreground RoI, `||a - y||^2` where `||a - y||^2 + m >
    ||bound - y||^2` and 0 elsewhere (`y` the ground-truth deltas), summed and divided by the number of RoIs. The
    target is the ground truth; `bound` only says where `a` is still worse than it."""
    fg = labels > 0
    y = regression_targets[fg]  # [F, 4]
    err = (_own_class(a, labels) - y).pow(2).sum(-1)  # [F]
    bound_err = (_own_class(bound, labels) - y).pow(2).sum(-1)
    return torch.where(err + margin > bound_err, err, torch.zeros_like(err)).sum() / max(labels.numel(), 1)


def balanced_kl(s: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, w: DetWeights) -> torch.Tensor:
    """The student's class distillation toward `target` (one weight 1 term) under `w.balance`; with `w.agree`, only
    on the RoIs whose target's top class is the label (the others count as 0 but stay in the averages' counts)."""
    T = w.temperature
    rows = T ** 2 * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(target / T, -1), reduction='none',
                             log_target=True).sum(-1)  # [R]
    if w.agree:
        rows = rows * (target.argmax(-1) == labels)
    if w.balance == 'defeat':  # averaged within foreground and background RoIs separately
        fg = labels > 0
        return sum(rows[m].sum() / m.sum().clamp(min=1) for m in (fg, ~fg))
    scale = 1 - w.label_weight if w.balance == 'chen' else 1.0
    return scale * rows.sum() / max(rows.numel(), 1)  # kl_t's batch mean


def student_terms(o: RoIOutputs, cls: torch.Tensor, box: torch.Tensor, target: str, weight,
                  w: DetWeights, ramp: float = 1.0) -> Terms:
    """What pulls the student's predictor toward `cls` / `box` (the teacher's in KD, the shadow's in SHAKE) with
    `weight`; under 'chen' also the detector's own cross-entropy, rescaled to `label_weight`. `ramp` (the share of
    a ramped weight in force) moves the cross-entropy's share from 1 to `label_weight` with it, so the two weights
    sum to one throughout the warm-up."""
    terms = {}
    if w.balance == 'chen':
        terms['loss_classifier'] = (1 - (1 - w.label_weight) * ramp) * o.loss_classifier
    terms[f'kl_cls_{target}'] = weight * balanced_kl(o.s_cls, cls, o.labels, w)
    if w.box == 'distance':
        terms[f'box_cls_{target}'] = weight * box_distance(o.s_box, box, o.labels, w.beta)
    elif w.box == 'bounded':
        terms[f'box_cls_{target}'] = weight * bounded_box(o.s_box, box, o.labels, o.regression_targets,
                                                          w.bound_margin)
    return terms


def det_kd_loss(o: RoIOutputs, w: DetWeights = DetWeights(), ramp: float = 1.0) -> Terms:
    """Logit (and box) distillation from the teacher straight to the student's predictor on the same RoIs, beside
    the detector's own four losses: `teacher * [KL_T(s -> t) + D(s, t)]` in the `balance` / `box` form chosen."""
    return student_terms(o, o.t_cls, o.t_box, 'teacher', w.teacher, w)


def det_shake_loss(o: RoIOutputs, w: DetWeights = DetWeights(), ramp: float = 1.0) -> Terms:
    """SHAKE for Faster R-CNN: the shadow box predictor `h` follows the teacher `t` on the student's RoIs (and, with
    `anchor`, the labels), while it and the student's predictor `s` distill each other:

        shadow:  teacher * [KL_T(h -> t) + D(h, t)] + anchor * fastrcnn_loss(h; labels)
                 + to_shadow * [KL_T(h -> sg s) + D(h, sg s)]
        student: to_student * [KL_T(s -> sg h) + box(s, sg h)]   (in the `balance` / `box` form; beside its own losses)

    `ramp` (0..1, the share of the warm-up done) scales `to_student` / `to_shadow` where `ramp_*` is set.
    """
    h_cls, h_box, T = o.h_cls, o.h_box, w.temperature
    to_shadow = w.to_shadow * (ramp if w.ramp_shadow else 1.0)
    to_student = w.to_student * (ramp if w.ramp_student else 1.0)
    terms: Dict[str, torch.Tensor] = {'kl_shadow_teacher': w.teacher * kl_t(h_cls, o.t_cls, T),
                                      'box_shadow_teacher': w.teacher * box_distance(h_box, o.t_box, o.labels, w.beta)}
    if w.anchor:
        ce, reg = fastrcnn_loss(h_cls, h_box, [o.labels], [o.regression_targets])
        terms.update(anchor_classifier=w.anchor * ce, anchor_box_reg=w.anchor * reg)
    if w.to_shadow:  # reversed distillation: the shadow learns from the student; sg(s) keeps it one-way
        terms['kl_shadow_cls'] = to_shadow * kl_t(h_cls, o.s_cls.detach(), T)
        terms['box_shadow_cls'] = to_shadow * box_distance(h_box, o.s_box.detach(), o.labels, w.beta)
    if w.to_student:
        terms.update(student_terms(o, h_cls.detach(), h_box.detach(), 'shadow', to_student, w,
                                   ramp if w.ramp_student else 1.0))
    return terms


def monitors(o: RoIOutputs) -> Dict[str, torch.Tensor]:
    """What the health checks watch, unweighted and detached (not loss terms): the student's accuracy on the
    foreground RoIs, and the shadow's KL from the teacher (T = 1) where both exist."""
    fg = o.labels > 0
    acc = (o.s_cls.detach()[fg].argmax(-1) == o.labels[fg]).float().mean() if fg.any() else o.s_cls.new_zeros(())
    out = {'monitor_fg_acc': acc.float()}
    if o.h_cls is not None and o.t_cls is not None:
        out['monitor_shadow_kl'] = kl_t(o.h_cls.detach().float(), o.t_cls.float(), 1.0)
    return out
