"""Optimizer and learning-rate schedule through timm's factories; the lr is a pure function of the update index."""
from typing import Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler


def build_optimizer(o: DictConfig, model: nn.Module, lr: float,
                    weight_decay: Optional[float] = None) -> torch.optim.Optimizer:
    """timm's optimizer factory. With `optim.filter_bias_and_bn` (the default, timm's and DeiT's), it and the model's
    `no_weight_decay()` keep weight decay off biases, norm weights, the cls/dist tokens and the position embeddings;
    off, every parameter decays, as CRD's SGD does."""
    wd = o.weight_decay if weight_decay is None else weight_decay
    extra = {}
    if o.fused and torch.cuda.is_available() and o.opt.lower() in ('adamw', 'adam'):
        extra['fused'] = True  # one kernel per step instead of one per parameter tensor
    return create_optimizer_v2(model, opt=o.opt, lr=lr, weight_decay=wd, momentum=o.momentum,
                               filter_bias_and_bn=o.filter_bias_and_bn,
                               **extra)


def build_schedule(o: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int,
                   warmup_epochs: Optional[float] = None, sched: Optional[str] = None) -> Optional[Scheduler]:
    """Warmup from `warmup_lr`, then the configured decay, stepped once per optimizer update.

    The schedule is driven by `step_update(update_index)` from the loop, never through `accelerator.prepare`, which
    would step it once per process per update.
    """
    schedule, _ = create_scheduler_v2(
        optimizer, sched=sched or o.sched, num_epochs=epochs, min_lr=o.min_lr, warmup_lr=o.warmup_lr,
        decay_milestones=list(o.decay_milestones), decay_rate=o.decay_rate, decay_epochs=o.decay_epochs,
        warmup_epochs=o.warmup_epochs if warmup_epochs is None else warmup_epochs,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return schedule


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]['lr']
