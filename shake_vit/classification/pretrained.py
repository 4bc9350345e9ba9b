"""The student's weights from files of other tools: fine-tuning from timm / DeiT / safetensors weights
(`load_pretrained` fits ViT/DeiT weights of another image size, patch size, class count or token layout into the
student, and refuses weights of another width or depth with an error that names both architectures), and a saved
student's keys for `--eval` and `--export`.
"""
import re
from pathlib import Path
from typing import List, Tuple

import timm
import torch
import torch.nn as nn
from einops import repeat
from omegaconf import DictConfig
from timm.models import clean_state_dict

from ..core.config import ConfigError
from ..core.weights import StateDict, offline_unless_reachable, read_state_dict


def pretrained_state_dict(source: str, trusted: bool = False) -> StateDict:
    """Weights named by `model.pretrained`: a local file, or a timm model name with its tag (downloads once)."""
    if Path(source).is_file():
        state = read_state_dict(source, trusted)
        if any(k.startswith('model.') for k in state) and all(k.startswith(('model.', 'shadow_heads.')) for k in state):
            # this trainer's own student weights: the timm model under `model.`; extra shadow heads start fresh
            state = {k[len('model.'):]: v for k, v in state.items() if k.startswith('model.')}
        return state
    if timm.is_model(source) and '.' in source:
        offline_unless_reachable()
        try:
            return timm.create_model(source, pretrained=True).state_dict()
        except Exception as err:  # offline, unknown tag, HTTP errors
            raise ConfigError(f"Could not fetch timm's pretrained weights '{source}' ({type(err).__name__}). Offline, "
                              'download them elsewhere and set model.pretrained=/path/to/file.') from None
    raise ConfigError(f"model.pretrained='{source}' is neither a file nor a timm model name with a pretrained tag "
                      "(e.g. 'deit_small_distilled_patch16_224.fb_in1k').")


def _prefix_tokens(state: StateDict) -> int:
    """The tokens before the patches in ViT weights: cls, a distillation token, register tokens."""
    return 1 + ('dist_token' in state) + (state['reg_token'].shape[1] if 'reg_token' in state else 0)


def adapt_vit(state: StateDict, model: nn.Module) -> Tuple[StateDict, List[str]]:
    """Make ViT/DeiT weights fit a ViT student (distilled or not) of another image size, patch size, class count or
    token layout.

    Returns:
        the adapted state dict and one line per adaptation made.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    state, notes = dict(state), []
    distilled = hasattr(model, 'dist_token')
    embedded = 0 if model.no_embed_class else 1  # whether the prefix tokens have positions (timm's and DeiT's ViTs)
    if distilled and 'dist_token' not in state and 'reg_token' in state and state['reg_token'].shape[1] == 1:
        # this trainer's cls-head export: one register token where the distillation token was, [cls, reg, patches]
        state['dist_token'] = state.pop('reg_token')
        notes.append("the weights' register token becomes the distillation token (a shake-vit cls-head export)")
    if distilled and 'dist_token' not in state:
        # A plain ViT/DeiT: the distillation token, its position and the shadow head start from the cls token's.
        state['dist_token'] = state['cls_token'].clone()
        if embedded:
            pos = state['pos_embed']  # [1, 1 + N, D]: the cls position, then the grid
            state['pos_embed'] = torch.cat([repeat(pos[:, 0], '1 d -> 1 two d', two=2), pos[:, 1:]], dim=1)
        for name in ('weight', 'bias'):
            if f'head.{name}' in state:
                state[f'head_dist.{name}'] = state[f'head.{name}'].clone()
        notes.append('no distillation token in the weights: dist token, its position embedding and the shadow head '
                     'start as copies of the cls token, its position and the classification head')
    if not distilled and 'dist_token' in state:
        # A distilled DeiT into a plain ViT (e.g. the `none` baseline): the distillation token goes, with its
        # position ([cls, dist, patches] -> [cls, patches]) and its head.
        del state['dist_token']
        if embedded:
            pos = state['pos_embed']
            state['pos_embed'] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        state = {k: v for k, v in state.items() if not k.startswith('head_dist.')}
        notes.append("the weights' distillation token, its position embedding and its head are dropped: the student "
                     'has none')
    if _prefix_tokens(state) != model.num_prefix_tokens:
        raise ConfigError(f'The pretrained weights have {_prefix_tokens(state)} tokens before the patches and the '
                          f'student {model.num_prefix_tokens} (cls, distillation and register tokens); only a '
                          "distillation token is added or dropped. Pick weights with the student's token layout.")
    prefix = model.num_prefix_tokens * embedded  # rows of pos_embed before the grid
    weight = state.get('patch_embed.proj.weight')  # [D, C, p, p]
    if weight is not None and weight.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
        state['patch_embed.proj.weight'] = resample_patch_embed(weight, list(model.patch_embed.patch_size))
        notes.append(f'patch embedding resampled from {tuple(weight.shape[-2:])} to {model.patch_embed.patch_size}')
    pos = state['pos_embed']  # [1, prefix + H * W, D]
    if pos.shape[1] != model.pos_embed.shape[1]:
        old = int(round((pos.shape[1] - prefix) ** 0.5))
        state['pos_embed'] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                    old_size=[old, old], num_prefix_tokens=prefix)
        notes.append(f'position embedding resampled from a {old}x{old} to a {model.patch_embed.grid_size} grid, '
                     f'keeping the {prefix} prefix tokens')
    return state, notes


def _vit_shape(state: StateDict) -> str:
    """Width, depth, patch and prefix tokens of ViT weights (a state dict), as a user would name the architecture."""
    depth = len({m.group(1) for k in state if (m := re.match(r'blocks\.(\d+)\.', k))})
    patch = state['patch_embed.proj.weight'].shape[-1] if 'patch_embed.proj.weight' in state else '?'
    token = 'with' if 'dist_token' in state else 'without'
    return (f"{state['cls_token'].shape[-1]} wide, {depth} block{'s' * (depth != 1)}, {patch}-px patches, {token} a "
            'distillation token')


def load_pretrained(student: nn.Module, source: str, trusted: bool = False) -> List[str]:
    """Initialise the student (a `Student`) from `model.pretrained`; returns what had to be adapted.

    ViT/DeiT weights are adapted to the student (`adapt_vit`); for every family a classifier of another class count
    (or an MLP shadow head) starts fresh. Weights of another width or depth are refused, naming both.
    """
    model = student.model
    state = pretrained_state_dict(source, trusted)
    notes: List[str] = []
    vit = 'cls_token' in state and 'pos_embed' in state
    theirs = _vit_shape(state) if vit else ''  # before any adaptation
    if vit and hasattr(model, 'pos_embed'):
        state, notes = adapt_vit(state, model)
    current = model.state_dict()
    heads = [n for n in ('head', 'head_dist') if isinstance(getattr(model, n, None), nn.Module)] \
        if vit else [getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')]
    for head in heads:
        weight = state.get(f'{head}.weight')
        if weight is not None and (f'{head}.weight' not in current or weight.shape != current[f'{head}.weight'].shape):
            state = {k: v for k, v in state.items() if not k.startswith(f'{head}.')}
            notes.append(f'{head} re-initialised ({weight.shape[0]} pretrained outputs, {model.num_classes} here)'
                         if f'{head}.weight' in current else f'{head} is an MLP here: it starts fresh')
    fresh = tuple(f'{h}.' for h in heads)
    wrong = [k for k, v in state.items() if k in current and v.shape != current[k].shape]
    missing = [k for k in current if k not in state and not k.startswith(fresh)]
    unexpected = [k for k in state if k not in current]
    if wrong or missing or unexpected:
        if vit and hasattr(model, 'blocks'):
            what = (f"the weights are a ViT {theirs}; the student ({model.pretrained_cfg.get('architecture')}) "
                    f'is {_vit_shape(current)}. Image size, patch size, class count and a missing distillation '
                    'token are adapted; width, depth and extra tokens cannot be. Pick weights of the student\'s '
                    'architecture, or make the student match them (model.name of their architecture, or '
                    'model.kwargs.embed_dim / depth / num_heads)')
        else:
            what = ('they are not weights of this architecture. Check model.name and model.kwargs against the '
                    'checkpoint')
        detail = '; '.join(part for part in (
            f'shapes differ for {wrong[:3]}' if wrong else '', f'missing {missing[:3]}' if missing else '',
            f'unexpected {unexpected[:3]}' if unexpected else '') if part)
        raise ConfigError(f"The pretrained weights '{source}' do not fit the student: {what} ({detail}).")
    model.load_state_dict(state, strict=False)
    return notes


def student_keys(state: StateDict) -> StateDict:
    """Keys of a `Student` (`model.` + timm's) from our checkpoints, DDP saves, exports or plain timm weights."""
    state = clean_state_dict(state)  # strips DDP's `module.`
    if not any(k.startswith('model.') for k in state):
        state = {f'model.{k}': v for k, v in state.items()}
    if 'model.reg_token' in state:  # a single-head export: its register token is the distillation token
        state['model.dist_token'] = state.pop('model.reg_token')
    return state


def load_student(student: nn.Module, weights: StateDict, path: Path, cfg: DictConfig) -> bool:
    """Saved weights (from `read_weights`) into the student the config builds, for `--eval` and `--export`.

    Returns:
        whether the weights hold the shadow heads (a cls-head export has none, and is fine without them).
    """
    missing, unexpected = student.load_state_dict(weights, strict=False)
    shadow = ('model.head_dist', 'shadow_heads')
    if unexpected or [k for k in missing if not k.startswith(shadow)]:
        hint = ''
        if cfg.loss.method == 'none' and any(k.startswith(shadow) for k in unexpected):
            hint = (' A run trained with loss.method=none before 2026-11-27 trained both heads on the labels: that is '
                    'loss.method=none_both_heads now (add it to the command).')
        raise ConfigError(f"The weights in '{path}' do not fit the configured student {cfg.model.name} "
                          f'(missing {missing[:5]}, unexpected {unexpected[:5]}): pass the config it was trained '
                          f'with.{hint}')
    return not any(k.startswith(shadow) for k in missing)
