"""The student (a timm DeiT whose distillation token feeds SHAKE's shadow head) and the frozen teacher."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import timm
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.models import load_state_dict
from timm.task import DistillationTeacher

from .config import ConfigError

HeadLogits = Tuple[torch.Tensor, torch.Tensor]  # (cls [B, K], shadow [B, K])


def _mlp_head(dim: int, hidden: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))


class Student(nn.Module):
    """A timm `VisionTransformerDistilled` seen as two heads: classification (cls token) and shadow (dist token).

    The shadow head *is* timm's `head_dist` (a linear layer, or an MLP when configured), so the state dict under
    `model.` stays a plain timm checkpoint. In training mode the forward returns both heads' logits; in eval mode
    it returns what `predict` names: the DeiT average of the two heads, or the cls head alone (SHAKE's deliverable).
    """

    def __init__(self, model: nn.Module, predict: str = 'avg'):
        super().__init__()
        if getattr(model, 'num_prefix_tokens', 1) < 2 or not hasattr(model, 'head_dist'):
            raise ConfigError(
                f'The student {type(model).__name__} has no distillation token, and SHAKE puts its shadow head on '
                "it: pick a distilled DeiT (model.name='deit_tiny_distilled_patch16_224', 'deit_small_distilled_"
                "patch16_224', ...).")
        self.model = model
        self.predict = predict

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def forward_heads(self, x: torch.Tensor) -> HeadLogits:
        tokens = self.model.forward_features(x)  # [B, 2 + N, D]: cls, dist, patches
        # Same as VisionTransformerDistilled.forward_head, but both heads in every mode.
        cls, dist = self.model.head_drop(tokens[:, 0]), self.model.head_drop(tokens[:, 1])
        return self.model.head(cls), self.model.head_dist(dist)

    def forward(self, x: torch.Tensor):
        s, h = self.forward_heads(x)
        if self.training:
            return s, h
        return s if self.predict == 'cls' else (s + h) / 2

    def set_shadow_trainable(self, trainable: bool) -> None:
        """Freeze the shadow head for methods that never train it (so DDP sees no unused parameters)."""
        self.model.head_dist.requires_grad_(trainable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {f'model.{name}' for name in self.model.no_weight_decay()}


def student_kwargs(cfg: DictConfig) -> Dict[str, Any]:
    """The timm keyword arguments of the student: `model.kwargs`, with `img_size` from the data by default."""
    kwargs: Dict[str, Any] = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    kwargs.setdefault('img_size', cfg.data.img_size)
    return kwargs


def build_student(cfg: DictConfig, num_classes: int) -> Student:
    m = cfg.model
    if not timm.is_model(m.name):
        raise ConfigError(_unknown_model(m.name, 'model.name'))
    model = timm.create_model(m.name, num_classes=num_classes, drop_path_rate=m.drop_path_rate, **student_kwargs(cfg))
    if m.shadow_head == 'mlp' and hasattr(model, 'head_dist'):
        model.head_dist = _mlp_head(model.embed_dim, m.shadow_hidden_dim or model.embed_dim, num_classes)
    return Student(model, predict=m.predict)


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
            notes.append(f'{head} re-initialised ({pretrained.shape[0]} pretrained outputs, {model.num_classes} '
                         'classes here)' if isinstance(current, nn.Linear) else f'{head} is an MLP here: it starts fresh')
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


def build_teacher_model(cfg: DictConfig, num_classes: int, pretrained: bool = False,
                        new_head: bool = False) -> nn.Module:
    """The teacher architecture; with `pretrained`, timm's hub weights for `teacher.name` (needs internet), with a
    fresh head for `num_classes` when `new_head` (to fit the teacher to new classes)."""
    t = cfg.teacher
    if not timm.is_model(t.name):
        raise ConfigError(_unknown_model(t.name, 'teacher.name'))
    kwargs = OmegaConf.to_container(t.kwargs, resolve=True)
    if not pretrained:
        return timm.create_model(t.name, num_classes=num_classes, **kwargs)
    try:
        model = timm.create_model(t.name, pretrained=True, **(dict(num_classes=num_classes) if new_head else {}),
                                  **kwargs)
    except Exception as err:  # hub errors come as many types: offline, unknown tag, HTTP
        raise ConfigError(f"Could not fetch timm's pretrained weights for teacher.name='{t.name}' ({type(err).__name__}: "
                          f'{str(err).splitlines()[0][:200]}). Offline, download them elsewhere and set '
                          'teacher.checkpoint=/path/to/weights instead of teacher.pretrained=true.') from None
    if model.num_classes != num_classes:
        raise ConfigError(f"The pretrained teacher '{t.name}' predicts {model.num_classes} classes but the data has "
                          f'{num_classes}: give a teacher trained on these classes (teacher.checkpoint) or let the '
                          'trainer fit one (teacher.pretrained=false, no checkpoint).')
    return model


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


def load_teacher(cfg: DictConfig, num_classes: int, path: Optional[str] = None) -> DistillationTeacher:
    """The configured teacher from a local file (`path`, else `teacher.checkpoint`) or timm's hub, frozen."""
    path = path or cfg.teacher.checkpoint
    if path is None:
        return freeze(build_teacher_model(cfg, num_classes, pretrained=True))
    model = build_teacher_model(cfg, num_classes)
    state = read_state_dict(path, cfg.train.trust_pickled_files)
    classifier = model.pretrained_cfg.get('classifier', 'head')  # timm names its head here: 'fc', 'head.fc', ...
    head = state.get(f'{classifier}.weight')
    if head is not None and head.shape[0] != num_classes:
        raise ConfigError(f"The teacher checkpoint '{path}' predicts {head.shape[0]} classes but the data has "
                          f'{num_classes}: give a teacher trained on these classes, or drop teacher.checkpoint to '
                          'let the trainer fit one on the training split.')
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"The teacher checkpoint '{path}' does not fit teacher.name='{cfg.teacher.name}' "
                          f"({str(err).splitlines()[0]} ...): check teacher.name and teacher.kwargs.") from None
    return freeze(model)
