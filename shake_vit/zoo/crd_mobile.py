"""CRD's CIFAR MobileNetV2 (mobilenetv2.py `mobile_half`) and ShuffleNets (ShuffleNetv1.py, ShuffleNetv2.py), layer for
layer (shake_vit/zoo/crd.py registers them).
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .crd_base import CifarNet, _conv_init, _info, conv_bn_relu


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 projection (CRD expands even at ratio 1); residual at stride 1 and equal
    widths."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int):
        super().__init__()
        mid = inp * expand
        self.residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, oup, 1, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(CifarNet):
    """CRD's mobilenetv2.py: a stride-2 stem, seven stages (t, c, n, s) with the second at stride 1, a 1x1 conv to
    1,280 channels. CRD's `MobileNetV2` is `mobile_half`: expansion T = 6, width x0.5."""

    classifier_name = 'classifier.0'
    num_maps = 5
    SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
               (None, 160, 3, 2), (None, 320, 1, 1))  # None: the expansion T

    def __init__(self, expand: int = 6, width: float = 0.5, num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0):
        last = int(1280 * width) if width > 1.0 else 1280
        super().__init__(num_classes, last, drop_rate)
        in_ch = int(32 * width)
        self.conv1 = conv_bn_relu(in_chans, in_ch, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTING:
            out = int(c * width)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(in_ch, out, s if i == 0 else 1, t or expand))
                in_ch = out
            self.blocks.append(nn.Sequential(*stage))
        self.conv2 = conv_bn_relu(in_ch, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        chs = [int(32 * width), *(int(c * width) for c in (24, 32, 96, 320))]
        self.feature_info = _info(chs, (2, 2, 4, 8, 16), ('conv1', 'blocks.1', 'blocks.2', 'blocks.4', 'blocks.6'))
        _conv_init(self, linear_std=0.01)

    def _maps(self, x):
        f0 = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        return [f0, f1, f2, f3, f4], self.conv2(f4)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.classifier[0] = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, (g c), H, W] -> [B, (c g), H, W]: every group's channels interleaved."""
    return rearrange(x, 'b (g c) h w -> b (c g) h w', g=groups)


class ShuffleV1Block(nn.Module):
    """CRD's ShuffleNetv1 bottleneck: grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1; at stride 2 the
    3x3-average-pooled input is concatenated, else added."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        mid = out_planes // 4
        self.groups = 1 if in_planes == 24 else groups  # the first block after the 24-channel stem is ungrouped
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class CifarShuffleV1(CifarNet):
    """CRD's ShuffleV1: a 1x1 stem to 24 channels, stages 240/480/960 wide of 4/8/4 blocks, 3 groups."""

    classifier_name = 'linear'

    def __init__(self, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0,
                 out_planes: Sequence[int] = (240, 480, 960), num_blocks: Sequence[int] = (4, 8, 4), groups: int = 3):
        super().__init__(num_classes, out_planes[2], drop_rate)
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for i, (planes, n) in enumerate(zip(out_planes, num_blocks)):
            blocks = []
            for j in range(n):  # the first block of a stage concatenates its input: it computes the rest
                blocks.append(ShuffleV1Block(in_planes, planes - (in_planes if j == 0 else 0), 2 if j == 0 else 1,
                                             groups))
                in_planes = planes
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.feature_info = _info((24, *out_planes), (1, 2, 4, 8), ('bn1', 'layer1', 'layer2', 'layer3'))


class ShuffleV2Block(nn.Module):
    """CRD's ShuffleNetv2 basic unit: half the channels pass, the other half go 1x1-3x3dw-1x1; concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2))))))))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2Down(nn.Module):
    """CRD's ShuffleNetv2 down-sampling unit: two stride-2 branches of half the output width each; concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleV2(CifarNet):
    """CRD's ShuffleV2 (net size 1): a 1x1 stem to 24 channels, stages 116/232/464 wide (a down-sampling unit, then
    3/7/3 basic units), a 1x1 conv to 1,024 channels."""

    classifier_name = 'linear'

    def __init__(self, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0,
                 out_channels: Sequence[int] = (116, 232, 464, 1024), num_blocks: Sequence[int] = (3, 7, 3)):
        super().__init__(num_classes, out_channels[3], drop_rate)
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_ch = 24
        for i, (out, n) in enumerate(zip(out_channels[:3], num_blocks)):
            setattr(self, f'layer{i + 1}', nn.Sequential(ShuffleV2Down(in_ch, out), *(ShuffleV2Block(out)
                                                                                       for _ in range(n))))
            in_ch = out
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.feature_info = _info((24, *out_channels[:3]), (1, 2, 4, 8), ('bn1', 'layer1', 'layer2', 'layer3'))

    def _final(self, last):
        return F.relu(self.bn2(self.conv2(last)))
