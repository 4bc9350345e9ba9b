"""Student and teacher architectures timm lacks, registered in timm's model registry so that every factory here
(students, teachers, export, `--eval`) builds them by name, as any timm model.

    vgg8_bn                  CRD's vgg8 layers in timm's own VGG family (with `cifar_stem`, its last stage at 2x2
                             where CRD's runs at 4x4: the exact one is cifar_vgg8, shake_vit/zoo/crd.py).
    shufflenet_v2_x{0_5,1_0,1_5,2_0}
                             torchvision's ShuffleNetV2 behind timm's classifier interface (a thin adapter: timm has
                             no ShuffleNet). `pretrained=True` loads torchvision's ImageNet weights (downloads).

Importing shake_vit.classification.models registers them; a name timm already has is left to timm.
"""
from typing import Optional

import timm
import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg

from ..core.config import ConfigError


def _build(cls, name: str, pretrained: bool, default_cfg: dict, kwargs: dict, **model_kwargs) -> nn.Module:
    """timm's `build_model_with_cfg`, with the pretrained config these names lack in timm's registry. timm's factory
    passes one of its own when it loads an export (`local-dir:`, a `file`); that one wins."""
    cfg = dict(default_cfg, **(kwargs.pop('pretrained_cfg', None) or {}))
    sources = dict(cfg, **(kwargs.get('pretrained_cfg_overlay') or {}))
    if pretrained and not any(sources.get(k) for k in ('url', 'file', 'hf_hub_id', 'state_dict')):
        # timm would warn and go on with random weights; a teacher must not
        raise ConfigError(f'{name} has no published pretrained weights (a CIFAR architecture, trained from scratch): '
                          'fit it (leave teacher.pretrained=false) or give teacher.checkpoint=/path/to/weights.')
    return build_model_with_cfg(cls, name, pretrained, pretrained_cfg=cfg, **model_kwargs, **kwargs)


def _vgg8_bn(pretrained: bool = False, **kwargs) -> nn.Module:
    """CRD's vgg8: one 3x3 convolution per stage, 64-128-256-512-512 wide, with BatchNorm. Built ImageNet-form like
    timm's other VGGs; `shake_vit.classification.models.cifar_stem` gives CRD's form."""
    from timm.models.vgg import VGG
    default = dict(num_classes=1000, input_size=(3, 32, 32), first_conv='features.0', classifier='head.fc')
    stages = [64, 'M', 128, 'M', 256, 'M', 512, 'M', 512, 'M']
    return _build(VGG, 'vgg8_bn', pretrained, default, kwargs, model_cfg=stages,
                  feature_cfg=dict(flatten_sequential=True), norm_layer=nn.BatchNorm2d)


class ShuffleNetV2(nn.Module):
    """torchvision's ShuffleNetV2 with timm's classifier interface: `forward_features` (the conv5 map),
    `forward_head(pre_logits=...)`, `num_features`, `get_classifier`, `reset_classifier`.

    The modules keep torchvision's names (conv1, maxpool, stage2-4, conv5), so its weights load unchanged but for the
    classifier, `fc` -> `head.fc`; `cifar_stem` finds the stem as on a timm ResNet.
    """

    def __init__(self, width: str = '1_0', num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 global_pool: str = 'avg'):
        super().__init__()
        import torchvision
        if in_chans != 3:
            raise ConfigError(f'shufflenet_v2 (torchvision) takes 3 input channels, not in_chans={in_chans}.')
        net = getattr(torchvision.models, f'shufflenet_v2_x{width}')()
        self.conv1, self.maxpool = net.conv1, net.maxpool
        self.stage2, self.stage3, self.stage4, self.conv5 = net.stage2, net.stage3, net.stage4, net.conv5
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.num_features = self.head_hidden_size = net.fc.in_features
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)


def _torchvision_names(state: dict, model: nn.Module) -> dict:
    """torchvision's ShuffleNetV2 weights for the adapter: its `fc` is the adapter's `head.fc`."""
    return {('head.' + k if k.startswith('fc.') else k): v for k, v in state.items()}


def _shufflenet(width: str):
    def build(pretrained: bool = False, **kwargs) -> nn.Module:
        """`pretrained=True`: torchvision's ImageNet-1k weights (downloads; timm keeps the classifier only at 1,000
        classes)."""
        import torchvision
        name = f'shufflenet_v2_x{width}'
        weights = getattr(torchvision.models, f'ShuffleNet_V2_X{width.upper()}_Weights').IMAGENET1K_V1
        default = dict(url=weights.url, num_classes=1000, input_size=(3, 224, 224), first_conv='conv1.0',
                       classifier='head.fc', interpolation='bilinear')
        return _build(ShuffleNetV2, name, pretrained, default, kwargs, width=width,
                      pretrained_filter_fn=_torchvision_names)
    build.__name__ = f'shufflenet_v2_x{width}'
    return build


def register() -> None:
    for fn in (_vgg8_bn, *(_shufflenet(w) for w in ('0_5', '1_0', '1_5', '2_0'))):
        name = fn.__name__.lstrip('_')
        if not timm.is_model(name):
            fn.__name__ = name
            timm.models.register_model(fn)


register()
