"""CRD's CIFAR ResNets (resnet.py, resnetv2.py ResNet50), wide ResNets (wrn.py) and VGGs (vgg.py), layer for layer
(shake_vit/zoo/crd.py registers them).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .crd_base import CifarNet, _conv_init, _info


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (projected) input, then ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(CifarNet):
    """CRD's resnet.py: a 3x3 stem, three stages of (depth - 2) / 6 basic blocks at 32, 16 and 8 px."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0):
        super().__init__(num_classes, widths[3], drop_rate)
        if (depth - 2) % 6:
            raise ValueError(f'A CIFAR ResNet has 6n + 2 layers, not {depth}.')
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        inplanes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            blocks = [BasicBlock(inplanes, planes, stride, downsample)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
            inplanes = planes
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_info = _info(widths, (1, 1, 2, 4), ('bn1', 'layer1', 'layer2', 'layer3'))
        _conv_init(self)


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the input (through a 1x1 convolution of its activation when the width
    or resolution changes, as CRD's)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.equal else self.convShortcut(act))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*(WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarNet):
    """CRD's wrn.py: WRN-depth-k, stages 16k, 32k, 64k wide; a final BN-ReLU before pooling."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0):
        chs = [16, 16 * widen, 32 * widen, 64 * widen]
        super().__init__(num_classes, chs[3], drop_rate)
        if (depth - 4) % 6:
            raise ValueError(f'A wide ResNet has 6n + 4 layers, not {depth}.')
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_chans, chs[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, chs[0], chs[1], 1)
        self.block2 = NetworkBlock(n, chs[1], chs[2], 2)
        self.block3 = NetworkBlock(n, chs[2], chs[3], 2)
        self.bn1 = nn.BatchNorm2d(chs[3])
        self.fc = nn.Linear(chs[3], num_classes)
        self.feature_info = _info(chs, (1, 1, 2, 4), ('conv1', 'block1', 'block2', 'block3'))
        _conv_init(self)
        nn.init.zeros_(self.fc.bias)

    def _maps(self, x):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)  # CRD's f3: before the final BN-ReLU
        return [f0, f1, f2, f3], F.relu(self.bn1(f3))


VGG_CFG = {8: [[64], [128], [256], [512], [512]], 11: [[64], [128], [256, 256], [512, 512], [512, 512]],
           13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
           16: [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
           19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]}


class CifarVGG(CifarNet):
    """CRD's vgg.py with BatchNorm: five blocks of 3x3 conv-BN-ReLU (each block's last ReLU applied outside it, so
    its pre-activation is CRD's `preact` feature), max-pools after blocks 0-2 and, only for 64-px inputs, after
    block 3; at 32 px the last block runs at 4x4. Global average pooling and one linear layer."""

    classifier_name = 'classifier'
    num_maps = 5

    def __init__(self, depth: int, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__(num_classes, 512, drop_rate)
        in_ch = in_chans
        for i, widths in enumerate(VGG_CFG[depth]):
            layers: List[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                in_ch = w
            setattr(self, f'block{i}', nn.Sequential(*layers[:-1]))
        self.pool = nn.MaxPool2d(2, 2)  # CRD's pool0-3 (no parameters)
        self.classifier = nn.Linear(512, num_classes)
        chs = [VGG_CFG[depth][i][-1] for i in range(5)]
        self.feature_info = _info(chs, (1, 2, 4, 8, 8), [f'block{i}' for i in range(5)])
        _conv_init(self, linear_std=0.01)

    def _maps(self, x):
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1 = F.relu(self.block1(self.pool(f0)))
        f2 = F.relu(self.block2(self.pool(f1)))
        f3 = F.relu(self.block3(self.pool(f2)))
        f4 = F.relu(self.block4(self.pool(f3) if h == 64 else f3))  # CRD: the 4th pool only for 64-px inputs
        return [f0, f1, f2, f3, f4], f4


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 (x4 expansion) plus the (projected) input, then ReLU; the projection is `shortcut`, as CRD's."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(4 * planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet50(CifarNet):
    """CRD's resnetv2.py ResNet50: a 3x3 stride-1 stem (no max-pool), bottleneck stages of 3/4/6/3 blocks."""

    classifier_name = 'linear'
    num_maps = 5

    def __init__(self, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0,
                 num_blocks: Sequence[int] = (3, 4, 6, 3)):
        super().__init__(num_classes, 2048, drop_rate)
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(in_planes, planes, stride if j == 0 else 1))
                in_planes = 4 * planes
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        self.linear = nn.Linear(2048, num_classes)
        self.feature_info = _info((64, 256, 512, 1024, 2048), (1, 1, 2, 4, 8),
                                  ('bn1', 'layer1', 'layer2', 'layer3', 'layer4'))
        _conv_init(self)
