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
teacher fuses (their `feat_t[1:-1]`, the first three of them; shake_vit.models.ProxyTeacherHead).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices

from ..core.config import ConfigError

# CRD's CIFAR-100 normalisation (RepDistiller dataset/cifar100.py): what these networks' files were trained with.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


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


# --- resnet.py: CIFAR ResNets (BasicBlock, 6n + 2 layers) -------------------------------------------------------

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


# --- wrn.py: wide ResNets (pre-activation blocks, 6n + 4 layers) ------------------------------------------------

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


# --- vgg.py: VGG with BatchNorm, five blocks, CRD's head --------------------------------------------------------

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


# --- mobilenetv2.py: CRD's CIFAR MobileNetV2 (`mobile_half`) -----------------------------------------------------

def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


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
        self.conv1 = _conv_bn_relu(in_chans, in_ch, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTING:
            out = int(c * width)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(in_ch, out, s if i == 0 else 1, t or expand))
                in_ch = out
            self.blocks.append(nn.Sequential(*stage))
        self.conv2 = _conv_bn_relu(in_ch, last, 1, 1)
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


# --- ShuffleNetv1.py / ShuffleNetv2.py --------------------------------------------------------------------------

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


# --- resnetv2.py: CRD's ResNet50 for CIFAR (the teacher of its cross-family pairs) ------------------------------

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
    build.__doc__ = f"CRD's CIFAR `{name}` ({cls.__name__}, {arch or 'default'}); see shake_vit.crd."
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
