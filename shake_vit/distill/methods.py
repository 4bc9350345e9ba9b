"""One registry entry per distillation method: everything the trainer needs to know about it, in one place.

An entry holds the method's loss (bound to the `loss` config section), its default temperature, whether it needs a
teacher, whether it trains the shadow head(s), whether it takes several teachers, and what the student outputs in
eval mode unless `model.predict` says otherwise. Nothing else in the package branches on a method's name: the config
reads its choices and defaults here, the student its heads, the task its loss. A new method is one
`register(Method(...))`; each task family (`task: classification | detection`) has its own entries, under the same
names where they mean the same method.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional

import torch
from omegaconf import DictConfig

from ..detection import losses as detection_losses
from . import losses

LossFn = Callable[..., Dict[str, torch.Tensor]]  # (s, h, t, y, ce) -> {term: weighted value}


@dataclass(frozen=True)
class Method:
    """A distillation method.

    Attributes:
        name: the `loss.method` value.
        build: `(loss config section, temperature) -> loss function` with its weights bound.
        summary: one line for docs and `--print-config`.
        temperature: the published default T (`loss.temperature: null` takes it); None for methods without one.
        needs_teacher: whether a teacher is built (and fitted, when no weights are given).
        trains_shadow: whether the student gets shadow heads and trains them; without, a pooled-feature student has
            none and a distilled DeiT's `head_dist` stays frozen and unreported.
        several_teachers: whether `extra_teachers` may be set (one shadow head per teacher).
        predict: the student's eval-mode output unless `model.predict` is set: 'cls' (the classification head, SHAKE's
            deliverable) or 'avg' (the average of all heads, DeiT's inference).
        family: the task family whose trainer runs it (the config's `task`).
        argmax_only: whether the loss reads the teacher's top class alone.
    """

    name: str
    build: Callable[[DictConfig, Optional[float]], LossFn]
    summary: str
    temperature: Optional[float] = None
    needs_teacher: bool = True
    trains_shadow: bool = True
    several_teachers: bool = False
    predict: str = 'cls'
    family: str = 'classification'
    argmax_only: bool = False  # reads only the teacher's top class (a teacher-output cache may hold just that)


METHODS: Dict[str, Dict[str, Method]] = {}  # family -> name -> method


def register(method: Method) -> Method:
    METHODS.setdefault(method.family, {})[method.name] = method
    return method


def get(name: str, family: str = 'classification') -> Method:
    return METHODS[family][name]


def of(cfg: DictConfig) -> Method:
    """The configured method (`loss.method` of the config's task family)."""
    return get(cfg.loss.method, cfg.task)


def _shake(c: DictConfig, T: float) -> LossFn:
    return partial(losses.shake_loss, w=losses.ShakeWeights(
        temperature=T, mutual=c.mutual, mutual_student=c.mutual_student, mutual_shadow=c.mutual_shadow,
        teacher=c.teacher_weight, teacher_loss=c.teacher_loss,
        standardize=c.standardize, shadow_ce=c.shadow_ce, direct_kd=c.direct_kd))


register(Method('shake', _shake, 'SHAKE (paper Eq. 5/6): shadow heads follow the teachers, mutual KL with the cls head',
                temperature=4.0, several_teachers=True, predict='cls'))
register(Method('deit_hard', lambda c, T: partial(losses.deit_hard_loss, alpha=c.deit_alpha),
                "DeiT hard distillation: the distillation head learns the teacher's argmax", predict='avg',
                argmax_only=True))
register(Method('deit_hard_cls', lambda c, T: partial(losses.deit_hard_cls_loss, alpha=c.deit_alpha),
                "hard distillation on the class token alone, no distillation token (DeiT's ablation)",
                trains_shadow=False, predict='cls', argmax_only=True))
register(Method('deit_soft', lambda c, T: partial(losses.deit_soft_loss, alpha=c.deit_alpha, temperature=T,
                                                  reduction=c.deit_soft_reduction),
                "DeiT soft distillation: the distillation head learns the teacher's softened output",
                temperature=1.0, predict='avg'))
register(Method('kd', lambda c, T: partial(losses.kd_loss, alpha=c.kd_alpha, temperature=T),
                'Hinton KD on the classification head', temperature=4.0, trains_shadow=False, predict='cls'))
register(Method('none', lambda c, T: losses.label_loss,
                'no distillation: the classification head on the labels (a plain DeiT / CNN)', needs_teacher=False,
                trains_shadow=False, predict='cls'))
register(Method('none_both_heads', lambda c, T: losses.both_heads_label_loss,
                "no distillation, both heads on the labels (DeiT's distilled architecture without a teacher)",
                needs_teacher=False, predict='avg'))


# Detection (Faster R-CNN students): the detector's own four losses always train the student; these add to them.
# A loss takes the step's `RoIOutputs` and the share of the warm-up done (for the ramped weights).
# detection SHAKE's shadow <- student weight when loss.mutual_shadow is null (docs/detection.md)
DET_MUTUAL_SHADOW = 0.1


def _det_weights(c: DictConfig, T: float, shake: bool = False) -> detection_losses.DetWeights:
    """`loss.*` as detection's weights; null mutual weights take loss.mutual (student side) and DET_MUTUAL_SHADOW."""
    return detection_losses.DetWeights(
        temperature=T, teacher=c.teacher_weight,
        to_student=c.mutual if c.mutual_student is None else c.mutual_student,
        to_shadow=DET_MUTUAL_SHADOW if c.mutual_shadow is None else c.mutual_shadow,
        ramp_student=c.ramp_student, ramp_shadow=c.ramp_shadow, anchor=c.shadow_anchor if shake else 0.0,
        balance=c.det_balance, label_weight=c.label_weight, agree=c.det_agree, box=c.det_box,
        bound_margin=c.bound_margin, beta=c.box_beta)


register(Method('none', lambda c, T: lambda outputs, ramp=1.0: {}, "no distillation: the detector's own losses",
                needs_teacher=False, trains_shadow=False, family='detection'))
register(Method('kd', lambda c, T: partial(detection_losses.det_kd_loss, w=_det_weights(c, T)),
                "the teacher's class and box outputs straight to the student's predictor, on its RoIs",
                temperature=1.0, trains_shadow=False, family='detection'))
register(Method('shake', lambda c, T: partial(detection_losses.det_shake_loss, w=_det_weights(c, T, shake=True)),
                'SHAKE: a shadow box predictor follows the teacher (anchored on the labels), mutual distillation '
                "with the student's",
                temperature=1.0, family='detection'))


def temperature(cfg: DictConfig) -> float:
    """The KD temperature in force: the configured one, else the method's published default (1 without one)."""
    if cfg.loss.temperature is not None:
        return float(cfg.loss.temperature)
    default = of(cfg).temperature
    return 1.0 if default is None else default


def loss_fn(cfg: DictConfig) -> LossFn:
    """The configured method's loss with its weights bound."""
    return of(cfg).build(cfg.loss, temperature(cfg))
