"""Export a trained student as a plain timm model: `model.safetensors` + `config.json`, loadable without this package.

Two forms:
    both: the distilled DeiT itself; in eval mode timm averages its two heads (DeiT's inference).
    cls:  SHAKE's deliverable, the classification head alone. The distillation token stays in the sequence (the
          cls token attended to it during training), so the model is a timm `VisionTransformer` with one register
          token in its place: `[cls, reg, patches]` with position embeddings on all of them, the head on cls. Its
          logits are exactly the student's cls-head logits.
"""
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.models import save_for_hf

from .config import ConfigError
from .evaluation import config_for, read_weights
from .models import Student, build_student, cifar_stem, student_kwargs


def plain_model(cfg: DictConfig, student: Student, head: str) -> nn.Module:
    """The timm model equal to `student` in eval mode (`both`) or to its cls head (`cls`)."""
    kwargs: Dict[str, Any] = dict(student_kwargs(cfg), num_classes=student.num_classes)
    state = student.model.state_dict()
    if student.placement == 'pooled' or student.num_shadow > 1:
        if head == 'both':
            raise ConfigError('--export-head both exports a distilled DeiT with one shadow head; this student has its '
                              'shadow heads outside timm\'s model. Export the classification head: --export-head cls.')
        if student.placement == 'pooled':  # the timm classifier itself is SHAKE's deliverable
            model = timm.create_model(cfg.model.name, **kwargs)
            if cfg.model.cifar_stem:
                cifar_stem(model)
            model.load_state_dict(state)
            return model.eval()
    if head == 'both':
        if not isinstance(student.model.head_dist, nn.Linear):
            raise ConfigError('The shadow head is an MLP (model.shadow_head=mlp), which plain timm cannot build: '
                              'export the classification head alone with --export-head cls.')
        name = cfg.model.name
    else:
        name = cfg.model.name.replace('_distilled', '')
        if not timm.is_model(name):
            raise ConfigError(f"No single-head timm counterpart of '{cfg.model.name}' (looked for '{name}').")
        kwargs['reg_tokens'] = 1
        state = {('reg_token' if k == 'dist_token' else k): v for k, v in state.items()
                 if not k.startswith('head_dist')}
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(state)
    return model.eval()


def export(path: str, configs=(), overrides=(), head: str = 'cls', out_dir: Optional[str] = None,
           use_ema: bool = False) -> Path:
    """`train.py --export PATH`: write the plain timm model and check it reproduces the student's logits."""
    cfg = config_for(path, configs, overrides)
    weights, ema_weights, where = read_weights(Path(path), cfg.train.trust_pickled_files)
    if use_ema:
        if ema_weights is None:
            raise ConfigError(f"--export-ema: '{path}' holds no EMA weights.")
        weights = ema_weights
    num_classes = weights['model.head.weight'].shape[0]
    student = build_student(cfg, num_classes)
    student.load_state_dict(weights)
    student.eval()
    model = plain_model(cfg, student, head)
    out = Path(out_dir or where / f'export_{head}')
    if out.exists():
        shutil.rmtree(out)
    data_config = {'interpolation': cfg.aug.interpolation, 'crop_pct': cfg.aug.crop_pct}
    save_for_hf(model, str(out), safe_serialization=True, data_config=data_config)
    (out / 'config.yaml').write_text(OmegaConf.to_yaml(cfg))  # the training config, for `train.py --eval`

    # The export must reproduce the trainer's eval model: reload it the way users will and compare.
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size)
    with torch.no_grad():
        s, hs = student.forward_heads(x)
        expected = torch.stack([s, *hs]).mean(0) if head == 'both' else s
        diff = (reloaded(x) - expected).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f'The exported model differs from the student by {diff:.2e}; please report this.')
    print(f'[shake-vit] exported the {"two-head DeiT" if head == "both" else "cls-head ViT"} to {out} (max logit '
          f'difference to the student {diff:.1e}). Load it with timm alone:\n'
          f"    timm.create_model('local-dir:{out}', pretrained=True)")
    return out
