"""The student (a timm DeiT whose distillation token feeds SHAKE's shadow head) and the frozen teacher."""
from pathlib import Path
from typing import Any, Dict, Optional, Set, Tuple

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


def build_student(cfg: DictConfig, num_classes: int) -> Student:
    m = cfg.model
    kwargs: Dict[str, Any] = OmegaConf.to_container(m.kwargs, resolve=True)
    kwargs.setdefault('img_size', cfg.data.img_size)
    if not timm.is_model(m.name):
        raise ConfigError(_unknown_model(m.name, 'model.name'))
    model = timm.create_model(m.name, num_classes=num_classes, drop_path_rate=m.drop_path_rate, **kwargs)
    if m.shadow_head == 'mlp' and hasattr(model, 'head_dist'):
        model.head_dist = _mlp_head(model.embed_dim, m.shadow_hidden_dim or model.embed_dim, num_classes)
    return Student(model, predict=m.predict)


def _unknown_model(name: str, key: str) -> str:
    import difflib
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ' `timm.list_models()` lists them.'
    return f"'{key}' is '{name}', which timm does not know.{hint}"


def build_teacher_model(cfg: DictConfig, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The teacher architecture; with `pretrained`, timm's hub weights for `teacher.name` (needs internet)."""
    t = cfg.teacher
    if not timm.is_model(t.name):
        raise ConfigError(_unknown_model(t.name, 'teacher.name'))
    kwargs = OmegaConf.to_container(t.kwargs, resolve=True)
    if not pretrained:
        return timm.create_model(t.name, num_classes=num_classes, **kwargs)
    try:
        model = timm.create_model(t.name, pretrained=True, **kwargs)
    except Exception as err:  # hub errors come as many types: offline, unknown tag, HTTP
        raise ConfigError(f"Could not fetch timm's pretrained weights for teacher.name='{t.name}' ({type(err).__name__}: "
                          f'{str(err).splitlines()[0][:200]}). Offline, download them elsewhere and set '
                          'teacher.checkpoint=/path/to/weights instead of teacher.pretrained=true.') from None
    if model.num_classes != num_classes:
        raise ConfigError(f"The pretrained teacher '{t.name}' predicts {model.num_classes} classes but the data has "
                          f'{num_classes}: give a teacher trained on these classes (teacher.checkpoint) or let the '
                          'trainer fit one (teacher.pretrained=false, no checkpoint).')
    return model


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a local file: `.safetensors`, or a torch file read with `weights_only=True`.

    timm's `load_state_dict` unwraps `{'state_dict': ...}` and DeiT's `{'model': ...}` and strips `module.`;
    `use_ema=False` because timm otherwise silently prefers EMA weights when a checkpoint has both.
    """
    if not Path(path).is_file():
        raise ConfigError(f"Checkpoint '{path}' does not exist.")
    return load_state_dict(path, use_ema=False, weights_only=True)


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
    model.load_state_dict(read_state_dict(path))
    return freeze(model)
