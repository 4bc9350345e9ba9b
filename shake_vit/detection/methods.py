"""The detection methods (`task: detection`), each one entry of the method registry (shake_vit/distill/methods.py)
with its loss from shake_vit/detection/losses.py."""
from functools import partial

from omegaconf import DictConfig

from ..distill.methods import Method, register
from . import losses as detection_losses

# Detection (Faster R-CNN students): the detector's own four losses always train the student; these add to them.
# A loss takes the step's `RoIOutputs` and the share of the warm-up done (for the ramped weights).
# detection SHAKE's shadow <- student weight when loss.mutual_shadow is null: the shadow learns from the teacher and
# the labels alone. On the digit scenes (docs/results/detection.md, 5 seeds) 0 gave the student +7.69 AP over none
# and +1.24 over kd, where 0.1 gave +3.32 and -3.12, and 1 diverged without the anchor.
DET_MUTUAL_SHADOW = 0.0


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
