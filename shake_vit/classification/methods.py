"""The classification methods (`task: classification`), each one entry of the method registry
(shake_vit/distill/methods.py) with its loss from shake_vit/distill/losses.py."""
from functools import partial

from omegaconf import DictConfig

from ..distill import losses
from ..distill.methods import LossFn, Method, register


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
