"""The student (a timm DeiT whose distillation token feeds SHAKE's shadow head) and the frozen teacher."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import timm
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.models import load_state_dict
from timm.task import DistillationTeacher

from . import zoo  # noqa: F401  (registers vgg8_bn and the ShuffleNetV2 adapter in timm)
from .config import ConfigError

HeadLogits = Tuple[torch.Tensor, List[torch.Tensor]]  # (cls [B, K], [shadow [B, K] per teacher])


def _head(dim: int, num_classes: int, kind: str, hidden: int) -> nn.Module:
    if kind == 'mlp':
        return nn.Sequential(nn.Linear(dim, hidden or dim), nn.GELU(), nn.Linear(hidden or dim, num_classes))
    return nn.Linear(dim, num_classes)


def has_distillation_token(model: nn.Module) -> bool:
    return getattr(model, 'num_prefix_tokens', 1) >= 2 and hasattr(model, 'head_dist')


class Student(nn.Module):
    """A timm classifier with SHAKE's shadow head(s) beside its classification head, one per teacher.

    Two placements, as the paper's two systems:
        token:  a distilled DeiT: the distillation token feeds the shadow head, which *is* timm's `head_dist`, so
                the state dict under `model.` stays a plain timm checkpoint; further teachers' shadow heads read the
                same token (`shadow_heads`).
        pooled: any timm classifier (ResNet, MobileNet, ConvNeXt, ...): the shadow heads read the pooled features
                that the classification head reads (the shared-backbone form).

    In training mode the forward returns (cls logits, shadow logits), the latter a tuple with several teachers; in
    eval mode it returns what `predict` names: the average of all heads (DeiT's inference), or the cls head alone
    (SHAKE's deliverable).
    """

    def __init__(self, model: nn.Module, placement: str = 'token', num_shadow: int = 1, head: str = 'linear',
                 hidden: int = 0, predict: str = 'avg'):
        super().__init__()
        if placement == 'token' and not has_distillation_token(model):
            raise ConfigError(
                f'The student {type(model).__name__} has no distillation token for the shadow head: pick a distilled '
                "DeiT (model.name='deit_tiny_distilled_patch16_224', ...), or put the shadow head on the pooled "
                'features with model.shadow_on=pooled (the default, auto, does so for students without the token).')
        self.model, self.placement, self.predict = model, placement, predict
        num_classes = model.num_classes
        if placement == 'token':
            dim = model.embed_dim
            if head == 'mlp':
                model.head_dist = _head(dim, num_classes, head, hidden)
            extra = num_shadow - 1  # head_dist is the first
        else:
            dim = getattr(model, 'head_hidden_size', None) or model.num_features  # what forward_head(pre_logits) gives
            extra = num_shadow
        self.shadow_heads = nn.ModuleList(_head(dim, num_classes, head, hidden) for _ in range(extra))

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_shadow(self) -> int:
        return len(self.shadow_heads) + (self.placement == 'token')

    def forward_heads(self, x: torch.Tensor) -> HeadLogits:
        m = self.model
        if self.placement == 'token':
            tokens = m.forward_features(x)  # [B, 2 + N, D]: cls, dist, patches
            # As VisionTransformerDistilled.forward_head, but every head in every mode.
            cls, dist = m.head_drop(tokens[:, 0]), m.head_drop(tokens[:, 1])
            return m.head(cls), [m.head_dist(dist), *(h(dist) for h in self.shadow_heads)]
        features = m.forward_features(x)  # [B, C, H, W] for CNNs, tokens for ViTs
        pooled = m.forward_head(features, pre_logits=True)  # [B, D]
        return m.forward_head(features), [h(pooled) for h in self.shadow_heads]

    def forward(self, x: torch.Tensor):
        s, hs = self.forward_heads(x)
        if self.training:
            return s, (hs[0] if len(hs) == 1 else tuple(hs))
        return s if self.predict == 'cls' else torch.stack([s, *hs]).mean(0)

    def shadow_parameters(self):
        yield from self.shadow_heads.parameters()
        if self.placement == 'token':
            yield from self.model.head_dist.parameters()

    def set_shadow_trainable(self, trainable: bool) -> None:
        """Freeze the shadow heads for methods that never train them (so DDP sees no unused parameters)."""
        for p in self.shadow_parameters():
            p.requires_grad_(trainable)

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
        raise ConfigError(_unknown_model(m.name, 'model.name'))
    kwargs = student_kwargs(cfg)
    if training and m.drop_path_rate:  # passed only when on, as timm's train.py does: VGG has no stochastic depth
        kwargs['drop_path_rate'] = m.drop_path_rate
    try:
        model = timm.create_model(m.name, num_classes=num_classes, **kwargs)
    except TypeError as err:  # an argument this architecture does not take
        raise ConfigError(f"timm's {m.name} does not take the arguments model.kwargs={student_kwargs(cfg)}, "
                          f'model.drop_path_rate={m.drop_path_rate} ({err}). Drop the one it names (for a model '
                          'without stochastic depth: model.drop_path_rate=0).') from None
    return cifar_stem(model) if m.cifar_stem else model


def build_student(cfg: DictConfig, num_classes: int) -> Student:
    m = cfg.model
    model = build_classifier(cfg, num_classes)
    placement = m.shadow_on if m.shadow_on != 'auto' else ('token' if has_distillation_token(model) else 'pooled')
    return Student(model, placement, num_shadow=1 + len(cfg.extra_teachers), head=m.shadow_head,
                   hidden=m.shadow_hidden_dim, predict=m.predict)


def pretrained_state_dict(source: str, trusted: bool = False) -> Dict[str, torch.Tensor]:
    """Weights named by `model.pretrained`: a local file, or a timm model name with its tag (downloads once)."""
    if Path(source).is_file():
        state = read_state_dict(source, trusted)
        if state and all(k.startswith('model.') for k in state):  # this trainer's own student weights
            state = {k[len('model.'):]: v for k, v in state.items()}
        return state
    if timm.is_model(source) and '.' in source:
        try:
            return timm.create_model(source, pretrained=True).state_dict()
        except Exception as err:  # offline, unknown tag, HTTP errors
            raise ConfigError(f"Could not fetch timm's pretrained weights '{source}' ({type(err).__name__}). Offline, "
                              'download them elsewhere and set model.pretrained=/path/to/file.') from None
    raise ConfigError(f"model.pretrained='{source}' is neither a file nor a timm model name with a pretrained tag "
                      "(e.g. 'deit_small_distilled_patch16_224.fb_in1k').")


def adapt_pretrained(state: Dict[str, torch.Tensor], model: nn.Module) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Make ViT/DeiT weights fit a distilled student of another size, class count or token layout.

    Returns:
        the adapted state dict and one line per adaptation made.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    state, notes = dict(state), []
    if 'cls_token' not in state or 'pos_embed' not in state:
        raise ConfigError('The pretrained weights are not a ViT/DeiT state dict (no cls_token/pos_embed).')
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens  # 2: cls, dist
    if 'dist_token' not in state:
        # A plain ViT/DeiT: the distillation token, its position and the shadow head start from the cls token's.
        state['dist_token'] = state['cls_token'].clone()
        if prefix:
            pos = state['pos_embed']  # [1, 1 + N, D]
            state['pos_embed'] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        for name in ('weight', 'bias'):
            if f'head.{name}' in state:
                state[f'head_dist.{name}'] = state[f'head.{name}'].clone()
        notes.append('no distillation token in the weights: dist token, its position embedding and the shadow head '
                     'start as copies of the cls token, its position and the classification head')
    weight = state.get('patch_embed.proj.weight')
    if weight is not None and weight.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
        state['patch_embed.proj.weight'] = resample_patch_embed(weight, list(model.patch_embed.patch_size))
        notes.append(f'patch embedding resampled from {tuple(weight.shape[-2:])} to {model.patch_embed.patch_size}')
    pos = state['pos_embed']
    if pos.shape != model.pos_embed.shape:
        old = int(round((pos.shape[1] - prefix) ** 0.5))
        state['pos_embed'] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                    old_size=[old, old], num_prefix_tokens=prefix)
        notes.append(f'position embedding resampled from a {old}x{old} to a {model.patch_embed.grid_size} grid, '
                     f'keeping the {prefix} prefix tokens')
    for head in ('head', 'head_dist'):
        current = getattr(model, head)
        if f'{head}.weight' in state and (not isinstance(current, nn.Linear)
                                          or state[f'{head}.weight'].shape != current.weight.shape):
            pretrained = state.pop(f'{head}.weight')
            state.pop(f'{head}.bias', None)
            fresh = f'{head} re-initialised ({pretrained.shape[0]} pretrained outputs, {model.num_classes} here)'
            notes.append(fresh if isinstance(current, nn.Linear) else f'{head} is an MLP here: it starts fresh')
    return state, notes


def load_pretrained(student: Student, source: str, trusted: bool = False) -> List[str]:
    """Initialise the student from `model.pretrained`; returns what had to be adapted."""
    state, notes = adapt_pretrained(pretrained_state_dict(source, trusted), student.model)
    missing, unexpected = student.model.load_state_dict(state, strict=False)
    fresh = {k for k in missing if k.split('.')[0] in ('head', 'head_dist')}
    if set(missing) - fresh or unexpected:
        raise ConfigError(f"The pretrained weights '{source}' do not fit {type(student.model).__name__} "
                          f'{student.model.embed_dim}-wide x {len(student.model.blocks)} blocks: missing '
                          f'{sorted(set(missing) - fresh)[:5]}, unexpected {sorted(unexpected)[:5]}. Check model.name '
                          'and model.kwargs against the checkpoint.')
    return notes


def _unknown_model(name: str, key: str) -> str:
    import difflib
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ' `timm.list_models()` lists them.'
    return f"'{key}' is '{name}', which timm does not know.{hint}"


def build_teacher_model(t: DictConfig, num_classes: int, pretrained: bool = False,
                        new_head: bool = False) -> nn.Module:
    """The architecture of teacher config `t` (`teacher` or an `extra_teachers` entry); with `pretrained`, timm's
    hub weights (needs internet), with a fresh head for `num_classes` when `new_head` (to fit it to new classes)."""
    if not timm.is_model(t.name):
        raise ConfigError(_unknown_model(t.name, 'teacher.name'))
    kwargs = OmegaConf.to_container(t.kwargs, resolve=True)
    if not pretrained:
        model = timm.create_model(t.name, num_classes=num_classes, **kwargs)
        return cifar_stem(model) if t.cifar_stem else model
    try:
        model = timm.create_model(t.name, pretrained=True, **(dict(num_classes=num_classes) if new_head else {}),
                                  **kwargs)
    except Exception as err:  # hub errors come as many types: offline, unknown tag, HTTP
        raise ConfigError(f"Could not fetch timm's pretrained weights for teacher.name='{t.name}' "
                          f'({type(err).__name__}: {str(err).splitlines()[0][:200]}). Offline, download them elsewhere '
                          'and set teacher.checkpoint=/path/to/weights instead of teacher.pretrained=true.') from None
    if model.num_classes != num_classes:
        raise ConfigError(f"The pretrained teacher '{t.name}' predicts {model.num_classes} classes but the data has "
                          f'{num_classes}: give a teacher trained on these classes (teacher.checkpoint) or let the '
                          'trainer fit one (teacher.pretrained=false, no checkpoint).')
    return cifar_stem(model) if t.cifar_stem else model


def read_state_dict(path: str, trusted: bool = False) -> Dict[str, torch.Tensor]:
    """A state dict from a local file: `.safetensors`, or a torch file read with `weights_only=True`.

    timm's `load_state_dict` unwraps `{'state_dict': ...}` and DeiT's `{'model': ...}` and strips `module.`;
    `use_ema=False` because timm otherwise silently prefers EMA weights when a checkpoint has both. A file that needs
    arbitrary unpickling (which can run code from the file) is refused unless `trusted`
    (`train.trust_pickled_files=true`).
    """
    if not Path(path).is_file():
        raise ConfigError(f"Checkpoint '{path}' does not exist.")
    try:
        return load_state_dict(path, use_ema=False, weights_only=not trusted)
    except Exception as err:  # torch, zip, pickle and safetensors each raise their own types for a bad file
        msg = str(err)
        if 'Unsupported globals' in msg:
            found = msg.split('Unsupported globals:', 1)[1].split('. No automatic')[0].strip()
            raise ConfigError(
                f"'{path}' stores Python objects besides tensors ({found}); unpickling them could run code from "
                'the file, so it was refused. If you trust its source, set train.trust_pickled_files=true, or '
                'convert it once to .safetensors.') from None
        raise ConfigError(f"'{path}' is not a readable checkpoint (a PyTorch or .safetensors state dict): "
                          f"{type(err).__name__}: {msg.splitlines()[0][:200]}. Is the file complete?") from None


def freeze(model: nn.Module) -> DistillationTeacher:
    """Wrap a trained classifier as a frozen teacher: eval mode, no gradients, input re-normalisation."""
    model.requires_grad_(False)
    return DistillationTeacher(model).eval()


def load_teacher(t: DictConfig, num_classes: int, path: Optional[str] = None,
                 trusted: bool = False) -> DistillationTeacher:
    """Teacher config `t` from a local file (`path`, else `t.checkpoint`) or timm's hub, frozen."""
    path = path or t.checkpoint
    if path is None:
        return freeze(build_teacher_model(t, num_classes, pretrained=True))
    model = build_teacher_model(t, num_classes)
    state = read_state_dict(path, trusted)
    classifier = model.pretrained_cfg.get('classifier', 'head')  # timm names its head here: 'fc', 'head.fc', ...
    head = state.get(f'{classifier}.weight')
    if head is not None and head.shape[0] != num_classes:
        raise ConfigError(f"The teacher checkpoint '{path}' predicts {head.shape[0]} classes but the data has "
                          f'{num_classes}: give a teacher trained on these classes, or drop teacher.checkpoint to '
                          'let the trainer fit one on the training split.')
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"The teacher checkpoint '{path}' does not fit teacher.name='{t.name}' "
                          f"({str(err).splitlines()[0]} ...): check teacher.name and teacher.kwargs.") from None
    return freeze(model)
