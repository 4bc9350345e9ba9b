"""What CRD's CIFAR networks share (shake_vit/zoo/crd.py): timm's classifier interface over CRD's layers, CRD's
initialisation, and the conv-BN-ReLU block.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features import feature_take_indices


def _conv_init(module: nn.Module, linear_std: Optional[float] = None) -> None:
    """CRD's initialisations: He-normal (fan-out) convolutions, unit BatchNorm; VGG, WRN and MobileNetV2 also zero
    the linear bias (and VGG and MobileNetV2 draw its weight from N(0, `linear_std`))."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


class CifarNet(nn.Module):
    """timm's classifier interface over a network that computes CRD's feature maps (`_maps`) and a final map.

    Subclasses set `self.feature_info` (one entry per map of `_maps`, as timm's), build their classifier under
    `classifier_name` and define `_maps(x) -> (maps, final)`, where `final` is what `forward_features` returns.
    """

    classifier_name = 'fc'
    num_maps = 4  # CRD's `is_feat` feature maps (the pooled vector aside)
    proxy_feature_indices = (1, 2, 3)  # the SHAKE authors' proxy teacher fuses CRD's feature maps 1-3

    def __init__(self, num_classes: int, num_features: int, drop_rate: float = 0.0):
        super().__init__()
        self.num_classes, self.num_features, self.head_hidden_size = num_classes, num_features, num_features
        self.drop_rate = drop_rate
        self.feature_info: List[Dict[str, Union[int, str]]] = []

    def _maps(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """CRD's ResNets', ShuffleNets' and ResNet50's maps: f0 = ReLU(BN(conv1(x))), then f_i = layer_i(f_(i-1));
        the other families define their own."""
        maps = [F.relu(self.bn1(self.conv1(x)))]
        for i in range(1, self.num_maps):
            maps.append(getattr(self, f'layer{i}')(maps[-1]))
        return maps, self._final(maps[-1])

    def _final(self, last: torch.Tensor) -> torch.Tensor:
        """What `forward_features` returns from the last map (a final conv or norm where the family has one)."""
        return last

    def get_classifier(self) -> nn.Linear:
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        old = self.get_classifier()
        parent, _, name = self.classifier_name.rpartition('.')
        setattr(self.get_submodule(parent) if parent else self, name,
                nn.Linear(old.in_features, num_classes) if num_classes else nn.Identity())
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._maps(x)[1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))  # [B, C]; CRD's fixed-window pools are this at 32 px
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """timm's API over CRD's `is_feat=True` maps (`feature_info` lists them): `indices` an int takes the last n,
        a list those; returns the maps, or (the final map for `forward_head`, the maps)."""
        take, _ = feature_take_indices(len(self.feature_info), indices)
        maps, final = self._maps(x)
        chosen = [maps[i] for i in take]
        return chosen if intermediates_only else (final, chosen)


def _info(chs: Sequence[int], reductions: Sequence[int], modules: Sequence[str]) -> List[Dict]:
    return [dict(num_chs=c, reduction=r, module=m) for c, r, m in zip(chs, reductions, modules)]


def conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))
