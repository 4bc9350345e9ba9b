"""The student: a timm classifier with SHAKE's shadow head(s), on a DeiT's distillation token or on pooled features.

Reading weight files is shake_vit/core/weights.py, fine-tuning adaptation shake_vit/classification/pretrained.py,
the teacher shake_vit/classification/teacher.py.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import reduce
from omegaconf import DictConfig, OmegaConf
from timm.models._features import feature_take_indices

from ..core.config import ConfigError
from ..distill import methods
from ..zoo import crd  # (importing the zoo registers the architectures timm lacks in its registry)
from ..zoo.crd_base import conv_bn_relu

HeadLogits = Tuple[torch.Tensor, List[torch.Tensor]]  # (cls [B, K], [shadow [B, K] per teacher])
ProxyInput = Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]  # a teacher's 3 maps, its classifier weight, bias


def _head(dim: int, num_classes: int, kind: str, hidden: int) -> nn.Module:
    if kind == 'mlp':
        return nn.Sequential(nn.Linear(dim, hidden or dim), nn.GELU(), nn.Linear(hidden or dim, num_classes))
    return nn.Linear(dim, num_classes)


def has_distillation_token(model: nn.Module) -> bool:
    return getattr(model, 'num_prefix_tokens', 1) >= 2 and hasattr(model, 'head_dist')


def average_heads(s: torch.Tensor, hs: Sequence[torch.Tensor]) -> torch.Tensor:
    """DeiT's inference: the mean of the cls logits and every shadow head's, [B, K]."""
    return reduce([s, *hs], 'heads b k -> b k', 'mean')


@dataclass(frozen=True)
class ProxySpec:
    """What a proxy-teacher head needs to know of its teacher: which of its feature maps it fuses (indices into the
    teacher's `forward_intermediates`), their channels, the stride between them, and the classifier's input width."""

    indices: Tuple[int, ...]
    channels: Tuple[int, int, int]
    strides: Tuple[int, int]
    out_channels: int


class ProxyTeacherHead(nn.Module):
    """The SHAKE authors' CNN shadow head (lliai/SHAKE `shake/models/util.py`, class `Shake`): a proxy teacher built
    on the frozen teacher's feature maps `f1, f2, f3` and scored by the teacher's own classifier, detached.

        h = W_t . GAP(fuse5(fuse3(fuse1(f1) + fuse2(f2)) + fuse4(f3))) + b_t

    fuse1 and fuse3 are 3x3 conv-BN-ReLU that move to the next map's width and resolution (stride 2 where it halves),
    fuse2 and fuse4 1x1 conv-BN-ReLU, fuse5 a 3x3 conv-BN-ReLU to the classifier's input width (the authors' keeps
    f3's width, the same thing for every teacher they ran). Only the fusion layers train.
    """

    def __init__(self, spec: ProxySpec):
        super().__init__()
        (c1, c2, c3), (s1, s2) = spec.channels, spec.strides
        self.indices = spec.indices
        self.fuse1 = conv_bn_relu(c1, c2, 3, s1)
        self.fuse2 = conv_bn_relu(c2, c2, 1, 1)
        self.fuse3 = conv_bn_relu(c2, c3, 3, s2)
        self.fuse4 = conv_bn_relu(c3, c3, 1, 1)
        self.fuse5 = conv_bn_relu(c3, spec.out_channels, 3, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, maps: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        f1, f2, f3 = maps  # [B, C_i, H_i, W_i], the teacher's, no gradient
        x = self.fuse5(self.fuse3(self.fuse1(f1) + self.fuse2(f2)) + self.fuse4(f3))  # [B, C, H3, W3]
        return F.linear(reduce(x, 'b c h w -> b c', 'mean'), weight.detach(), bias.detach())  # [B, K]


class Student(nn.Module):
    """A timm classifier with SHAKE's shadow head(s) beside its classification head, one per teacher.

    Three placements:
        token:   a distilled DeiT: the distillation token feeds the shadow head, which *is* timm's `head_dist`, so
                 the state dict under `model.` stays a plain timm checkpoint; further teachers' shadow heads read the
                 same token (`shadow_heads`). The paper's ViT system.
        pooled:  any timm classifier (ResNet, MobileNet, ConvNeXt, ...): the shadow heads read the pooled features
                 that the classification head reads (the shared-backbone form).
        teacher: any timm classifier: each shadow head is a proxy teacher on its teacher's feature maps
                 (`ProxyTeacherHead`, from `proxy_specs`), fed through the forward's `proxy_inputs`. The authors'
                 CNN system.
    `num_shadow=0` (methods that train no shadow head: `none`, `kd`) builds none; a distilled DeiT's `head_dist`,
    part of timm's architecture, then stays frozen and out of every output.

    In training mode the forward returns (cls logits, shadow logits), the latter a tuple with several teachers and
    None without a shadow head; in eval mode it returns what `predict` names: the cls head alone (SHAKE's deliverable)
    or the average of all heads (DeiT's inference).
    """

    def __init__(self, model: nn.Module, placement: str = 'token', num_shadow: int = 1, head: str = 'linear',
                 hidden: int = 0, predict: str = 'cls', proxy_specs: Sequence[ProxySpec] = ()):
        super().__init__()
        if placement == 'token' and not has_distillation_token(model):
            raise ConfigError(
                f'The student {type(model).__name__} has no distillation token for the shadow head: pick a distilled '
                "DeiT (model.name='deit_tiny_distilled_patch16_224', ...), or put the shadow head on the pooled "
                'features with model.shadow_on=pooled (the default, auto, does so for students without the token).')
        self.model, self.placement, self.predict = model, placement, predict
        num_classes = model.num_classes
        self.token_head = placement == 'token' and num_shadow > 0  # timm's head_dist is the first shadow head
        if placement == 'token':
            dim = model.embed_dim
            if not self.token_head:
                model.head_dist.requires_grad_(False)  # part of timm's architecture, trained by no loss
            elif head == 'mlp':
                model.head_dist = _head(dim, num_classes, head, hidden)
        else:
            dim = getattr(model, 'head_hidden_size', None) or model.num_features  # what forward_head(pre_logits) gives
        extra = num_shadow - self.token_head
        if placement == 'teacher':
            self.shadow_heads = nn.ModuleList(ProxyTeacherHead(spec) for spec in proxy_specs[:num_shadow])
        else:
            self.shadow_heads = nn.ModuleList(_head(dim, num_classes, head, hidden) for _ in range(extra))

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_shadow(self) -> int:
        return len(self.shadow_heads) + self.token_head

    def forward_heads(self, x: torch.Tensor, proxy_inputs: Optional[Sequence[ProxyInput]] = None) -> HeadLogits:
        """Every head's logits. `proxy_inputs` (placement 'teacher'): per teacher, its maps and classifier; without
        them (no teacher at hand, e.g. `--eval` of an export) there are no shadow logits."""
        m = self.model
        if self.placement == 'teacher':
            s = m.forward_head(m.forward_features(x))
            return s, [h(*inputs) for h, inputs in zip(self.shadow_heads, proxy_inputs or ())]
        if self.placement == 'token':
            tokens = m.forward_features(x)  # [B, 2 + N, D]: cls, dist, patches
            # As VisionTransformerDistilled.forward_head, but every head in every mode.
            cls, dist = m.head_drop(tokens[:, 0]), m.head_drop(tokens[:, 1])  # [B, D] each
            first = [m.head_dist(dist)] if self.token_head else []
            return m.head(cls), [*first, *(h(dist) for h in self.shadow_heads)]
        features = m.forward_features(x)  # [B, C, H, W] for CNNs, tokens for ViTs
        s = m.forward_head(features)
        if not self.shadow_heads:
            return s, []
        pooled = m.forward_head(features, pre_logits=True)  # [B, D]
        return s, [h(pooled) for h in self.shadow_heads]

    def forward(self, x: torch.Tensor, proxy_inputs: Optional[Sequence[ProxyInput]] = None):
        s, hs = self.forward_heads(x, proxy_inputs)
        if self.training:
            return s, (None if not hs else hs[0] if len(hs) == 1 else tuple(hs))
        return s if self.predict == 'cls' else average_heads(s, hs)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        inner = self.model.no_weight_decay() if hasattr(self.model, 'no_weight_decay') else set()
        return {f'model.{name}' for name in inner}


def cifar_stem(model: nn.Module) -> nn.Module:
    """Adapt an ImageNet architecture to 32-px images as the CRD protocol's CIFAR models are built.

    timm has no CIFAR ResNets (the CRD protocol's resnet32x4, WRN-40-2, ...); this is the usual stand-in: the same
    family with a CIFAR stem, a stride-1 3x3 first convolution and no stem max-pool. Works for timm ResNets (`conv1`,
    `maxpool`) and EfficientNet/MobileNet (`conv_stem`). timm's VGG already has that stem; its CIFAR form differs in
    the head, which becomes CRD's: global average pooling of the last block (no fifth max-pool) and one linear layer,
    instead of the ImageNet 7x7-convolution MLP 4096 wide (102M of vgg13_bn's 129M parameters). vgg13_bn in this
    form is CRD's vgg13.
    """
    from timm.layers import ClassifierHead
    from timm.models.vgg import VGG
    if isinstance(model, VGG):
        if isinstance(model.features[-1], nn.MaxPool2d):
            model.features[-1] = nn.Identity()
        model.pre_logits = nn.Identity()
        model.head = ClassifierHead(model.num_features, model.num_classes, pool_type='avg', drop_rate=model.drop_rate)
        model.head_hidden_size = model.num_features
    elif hasattr(model, 'conv1') and hasattr(model, 'maxpool'):
        first = model.conv1 if isinstance(model.conv1, nn.Conv2d) else model.conv1[0]
        replacement = nn.Conv2d(first.in_channels, first.out_channels, 3, 1, 1, bias=first.bias is not None)
        if isinstance(model.conv1, nn.Conv2d):
            model.conv1 = replacement
        else:
            model.conv1[0] = replacement
        model.maxpool = nn.Identity()
    elif hasattr(model, 'conv_stem'):
        model.conv_stem.stride = (1, 1)
    else:
        raise ConfigError(f'model.cifar_stem / teacher.cifar_stem: no known stem on {type(model).__name__} '
                          '(timm ResNet, EfficientNet/MobileNet or VGG families only).')
    return model


def student_kwargs(cfg: DictConfig) -> Dict[str, Any]:
    """The timm keyword arguments of the student: `model.kwargs`, plus `img_size` from the data for ViTs."""
    kwargs: Dict[str, Any] = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    if is_vit(cfg.model.name):
        kwargs.setdefault('img_size', cfg.data.img_size)
    return kwargs


def is_vit(name: str) -> bool:
    """Whether timm builds `name` as a VisionTransformer (which takes `img_size`); CNNs take any input size."""
    from timm.models import get_arch_name, model_entrypoint
    entry = model_entrypoint(get_arch_name(name))
    return entry.__module__.endswith(('vision_transformer', 'deit'))


def build_classifier(cfg: DictConfig, num_classes: int, training: bool = True) -> nn.Module:
    """The student's timm model without SHAKE's extra heads: `model.kwargs`, stochastic depth when training (and
    on), the CIFAR form with `model.cifar_stem`. `training=False` is the inference model an export records."""
    m = cfg.model
    if not timm.is_model(m.name):
        raise ConfigError(unknown_model_error(m.name, 'model.name'))
    kwargs = student_kwargs(cfg)
    if training and m.drop_path_rate:  # passed only when on, as timm's train.py does: VGG has no stochastic depth
        kwargs['drop_path_rate'] = m.drop_path_rate
    try:
        model = timm.create_model(m.name, num_classes=num_classes, **kwargs)
    except TypeError as err:  # an argument this architecture does not take
        raise ConfigError(f"timm's {m.name} does not take the arguments model.kwargs={student_kwargs(cfg)}, "
                          f'model.drop_path_rate={m.drop_path_rate} ({err}). Drop the one it names (for a model '
                          'without stochastic depth: model.drop_path_rate=0).') from None
    check_patch_grid(model, 'model.kwargs.img_size' if 'img_size' in m.kwargs else 'data.img_size',
                     'model.kwargs.patch_size' if 'patch_size' in m.kwargs else f"{m.name}'s patch size")
    return cifar_stem(model) if m.cifar_stem else model


def check_patch_grid(model: nn.Module, size_key: str, patch_key: str) -> None:
    """A ViT whose image size its patch size does not divide would train on a grid that drops the border (timm
    floors the grid): refuse it, naming both numbers and the keys that set them."""
    pe = getattr(model, 'patch_embed', None)
    if pe is None or getattr(pe, 'img_size', None) is None or getattr(pe, 'dynamic_img_pad', False):
        return
    (h, w), (ph, pw) = pe.img_size, pe.patch_size
    if h % ph or w % pw:
        fits = ' or '.join(str(n) for n in sorted({max(ph, h // ph * ph), (h // ph + 1) * ph}))
        raise ConfigError(
            f'The image size {h}x{w} ({size_key}) is not a multiple of the patch size {ph}x{pw} ({patch_key}): the '
            f'{h // ph}x{w // pw} patch grid would leave out the last {h % ph} pixel rows and {w % pw} columns of '
            f'every image. Use an image size the patch divides ({fits}) or a patch size that divides {h}.')


def build_teacher_architecture(t: DictConfig, num_classes: int) -> nn.Module:
    """Teacher config `t`'s architecture (`teacher` or an `extra_teachers` entry) with fresh weights: its timm
    keyword arguments and, with `cifar_stem`, its CIFAR form."""
    if not timm.is_model(t.name):
        raise ConfigError(unknown_model_error(t.name, 'teacher.name'))
    model = timm.create_model(t.name, num_classes=num_classes, **OmegaConf.to_container(t.kwargs, resolve=True))
    check_patch_grid(model, 'teacher.kwargs.img_size', 'teacher.kwargs.patch_size')
    return cifar_stem(model) if t.cifar_stem else model


def linear_classifier(model: nn.Module) -> nn.Module:
    """A timm model's classifier, the cls head's for a distilled DeiT (timm returns both of its heads)."""
    classifier = model.get_classifier()
    return classifier[0] if isinstance(classifier, tuple) else classifier


def proxy_spec(t: DictConfig, num_classes: int, img_size: int,
               indices: Optional[Sequence[int]] = None) -> ProxySpec:
    """What a proxy-teacher head on teacher `t` fuses: `indices` into the teacher's feature maps (`feature_info`),
    else the teacher's own choice (`proxy_feature_indices`: CRD's networks name the maps the authors fused), else its
    last three. Their widths and the strides between them come from a dry forward at `img_size` on the meta device
    (no weights, no data; `feature_info` can miss a changed stem)."""
    with torch.device('meta'):
        teacher = build_teacher_architecture(t, num_classes).eval()
    info = list(getattr(teacher, 'feature_info', None) or [])
    if not info or not hasattr(teacher, 'forward_intermediates'):
        raise ConfigError(f"model.shadow_on=teacher fuses the teacher's feature maps, and timm's {t.name} exposes none "
                          '(no feature_info / forward_intermediates): put the shadow head on the student '
                          '(model.shadow_on=pooled), or pick another teacher.')
    chosen = list(indices or getattr(teacher, 'proxy_feature_indices', None) or (-3, -2, -1))
    if len(chosen) != 3 or not all(-len(info) <= i < len(info) for i in chosen):
        raise ConfigError(f'model.proxy_features is {chosen}: three indices into the {len(info)} feature maps of '
                          f"{t.name} ({', '.join(str(f['module']) for f in info)}) are needed.")
    take, _ = feature_take_indices(len(info), chosen)
    with torch.device('meta'):
        maps = teacher.forward_intermediates(torch.empty(1, 3, img_size, img_size), indices=take,
                                             intermediates_only=True)
    shapes = [tuple(f.shape[1:]) for f in maps]  # (C, H, W) of each chosen map
    strides = [max(1, round(a[1] / b[1])) for a, b in zip(shapes, shapes[1:])]
    if any(-(-a[d] // st) != b[d] for (a, b), st in zip(zip(shapes, shapes[1:]), strides) for d in (1, 2)):
        raise ConfigError(f'The feature maps {take} of {t.name} are {shapes} at {img_size} px: each must be the next '
                          "one's size or a whole multiple of it for the proxy teacher to fuse them; choose others with "
                          'model.proxy_features.')
    classifier = linear_classifier(teacher)
    if not isinstance(classifier, nn.Linear):
        raise ConfigError(f"The proxy teacher scores with the teacher's linear classifier, and {t.name}'s is a "
                          f'{type(classifier).__name__}: use model.shadow_on=pooled with this teacher.')
    return ProxySpec(tuple(take), tuple(c for c, _, _ in shapes), tuple(strides), classifier.in_features)


def build_student(cfg: DictConfig, num_classes: int) -> Student:
    """The student of the configured method: one shadow head per teacher when the method trains them, none
    otherwise; its eval-mode output is `model.predict`, else the method's."""
    m, method = cfg.model, methods.of(cfg)
    model = build_classifier(cfg, num_classes)
    placement = m.shadow_on if m.shadow_on != 'auto' else ('token' if has_distillation_token(model) else 'pooled')
    num_shadow = 1 + len(cfg.extra_teachers) if method.trains_shadow else 0
    if m.predict == 'avg' and not num_shadow:
        raise ConfigError(f"model.predict=avg averages the shadow heads with the cls head, but loss.method="
                          f"'{method.name}' trains no shadow head: drop model.predict (the cls head is the model).")
    specs = []
    if placement == 'teacher' and has_distillation_token(model):
        raise ConfigError(f"model.shadow_on=teacher is the authors' shadow head for CNN students; {m.name} has a "
                          'distillation token, the shadow head\'s place on a DeiT: use model.shadow_on=token (or a '
                          'student without the token).')
    if placement == 'teacher' and num_shadow:
        if not method.needs_teacher:
            raise ConfigError(f"model.shadow_on=teacher builds the shadow head on the teacher's features, but "
                              f"loss.method='{method.name}' has no teacher: use model.shadow_on=auto.")
        specs = [proxy_spec(t, num_classes, cfg.data.img_size, m.proxy_features)
                 for t in [cfg.teacher, *cfg.extra_teachers]]
    return Student(model, placement, num_shadow=num_shadow, head=m.shadow_head, hidden=m.shadow_hidden_dim,
                   predict=m.predict or method.predict, proxy_specs=specs)


def unknown_model_error(name: str, key: str) -> str:
    import difflib
    crd_name = {k.lower(): v for k, v in crd.CRD_NAMES.items()}.get(name.lower())
    if crd_name:  # CRD's own name for one of its CIFAR networks (resnet8x4, wrn_40_2, ShuffleV1, ...)
        return (f"'{key}' is '{name}', CRD's name for a CIFAR network; registered here it is {crd_name}: "
                f'{key}={crd_name}.')
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ' `timm.list_models()` lists them.'
    return f"'{key}' is '{name}', which timm does not know.{hint}"


