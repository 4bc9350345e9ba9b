"""CRD's CIFAR networks (the SHAKE paper's CIFAR-100 students and teachers), registered in timm as `cifar_<name>`.

Written here from the architecture definitions of CRD's code (HobbitLong/RepDistiller `models/`, also the SHAKE
authors' `shake/models/`): same layers, same module names (so CRD's `{'model': state_dict}` teacher files load
unchanged), same initialisation, and the feature maps CRD's `is_feat=True` returns, as `forward_intermediates`:

    cifar_resnet{8,14,20,32,44,56,110}, cifar_resnet8x4, cifar_resnet32x4    resnet.py (3 stages at 32/16/8 px)
    cifar_wrn_{16,40}_{1,2}                                                  wrn.py (pre-activation blocks)
    cifar_vgg{8,11,13,16,19}                                                 vgg.py, with BatchNorm (CRD's vggN),
                                                                             the 4th max-pool only for 64-px inputs
    cifar_mobilenetv2                                                        mobilenetv2.py `mobile_half` (T 6, x0.5)
    cifar_shufflev1, cifar_shufflev2                                         ShuffleNetv1.py, ShuffleNetv2.py
    cifar_resnet50                                                           resnetv2.py ResNet50 (4 stages)

Differences, all invisible at CRD's 32 px: global average pooling where CRD pools with a fixed window sized for 32-px
inputs. Every network takes timm's classifier interface (`num_classes`, `reset_classifier`, `get_classifier`,
`forward_features`, `forward_head(pre_logits=...)`, `forward_intermediates`, `feature_info`) and builds through
`timm.create_model` once shake_vit is imported. `proxy_feature_indices` names the maps the SHAKE authors' proxy
teacher fuses (their `feat_t[1:-1]`, the first three of them; shake_vit.classification.models.ProxyTeacherHead).
"""

import timm
import torch.nn as nn
from timm.models import build_model_with_cfg

from ..core.config import ConfigError
from .crd_mobile import CifarMobileNetV2, CifarShuffleV1, CifarShuffleV2
from .crd_resnet import VGG_CFG, CifarResNet, CifarResNet50, CifarVGG, WideResNet

# CRD's CIFAR-100 normalisation (RepDistiller dataset/cifar100.py): what these networks' files were trained with.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


# --- resnet.py: CIFAR ResNets (BasicBlock, 6n + 2 layers) -------------------------------------------------------


# --- wrn.py: wide ResNets (pre-activation blocks, 6n + 4 layers) ------------------------------------------------


# --- vgg.py: VGG with BatchNorm, five blocks, CRD's head --------------------------------------------------------


# --- mobilenetv2.py: CRD's CIFAR MobileNetV2 (`mobile_half`) -----------------------------------------------------


# --- ShuffleNetv1.py / ShuffleNetv2.py --------------------------------------------------------------------------


# --- resnetv2.py: CRD's ResNet50 for CIFAR (the teacher of its cross-family pairs) ------------------------------


# --- registration -------------------------------------------------------------------------------------------------

def _register(name: str, cls, **arch) -> None:
    """`cifar_<crd name>` in timm's registry, with CRD's CIFAR-100 input and normalisation as its pretrained_cfg."""
    full = f'cifar_{name}'

    def build(pretrained: bool = False, **kwargs) -> nn.Module:
        cfg = dict(num_classes=100, input_size=(3, 32, 32), mean=CIFAR100_MEAN, std=CIFAR100_STD,
                   classifier=cls.classifier_name, crop_pct=1.0, interpolation='bilinear')
        cfg.update(kwargs.pop('pretrained_cfg', None) or {})
        sources = dict(cfg, **(kwargs.get('pretrained_cfg_overlay') or {}))
        if pretrained and not any(sources.get(k) for k in ('url', 'file', 'hf_hub_id', 'state_dict')):
            raise ConfigError(f'{full} has no published weights to download: CRD publishes its CIFAR-100 teachers as '
                              'files (scripts/fetch_pretrained_teachers.sh); give one with teacher.checkpoint=PATH, or '
                              'let the trainer fit the teacher (teacher.pretrained=false).')
        # `features_only=True` through timm's getter wrapper, which takes the maps from forward_intermediates
        feature_cfg = dict(feature_cls='getter', out_indices=tuple(range(cls.num_maps)))
        return build_model_with_cfg(cls, full, pretrained, pretrained_cfg=cfg, feature_cfg=feature_cfg, **arch,
                                    **kwargs)
    build.__name__ = full
    build.__doc__ = f"CRD's CIFAR `{name}` ({cls.__name__}, {arch or 'default'}); see shake_vit.zoo.crd."
    if not timm.is_model(full):
        timm.models.register_model(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f'resnet{_depth}', CifarResNet, depth=_depth, widths=(16, 16, 32, 64))
_register('resnet8x4', CifarResNet, depth=8, widths=(32, 64, 128, 256))
_register('resnet32x4', CifarResNet, depth=32, widths=(32, 64, 128, 256))
for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(f'wrn_{_depth}_{_widen}', WideResNet, depth=_depth, widen=_widen)
for _depth in VGG_CFG:
    _register(f'vgg{_depth}', CifarVGG, depth=_depth)
_register('mobilenetv2', CifarMobileNetV2)
_register('shufflev1', CifarShuffleV1)
_register('shufflev2', CifarShuffleV2)
_register('resnet50', CifarResNet50)

# CRD's own names (its model_dict, and its teacher folders save/models/<name>_vanilla/) -> the names registered here
CRD_NAMES = {'MobileNetV2': 'cifar_mobilenetv2', 'ShuffleV1': 'cifar_shufflev1', 'ShuffleV2': 'cifar_shufflev2',
             'ResNet50': 'cifar_resnet50', **{n: f'cifar_{n}' for n in (
                 'resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'resnet8x4',
                 'resnet32x4', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2', 'vgg8', 'vgg11', 'vgg13', 'vgg16',
                 'vgg19')}}
