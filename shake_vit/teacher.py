"""The frozen teacher of a run: loaded from a file, from timm's hub, or fitted first on the training split."""
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg
from timm.task import ClassificationTask, DistillationTeacher

from . import data
from .build import Pipeline, criterion, log
from .config import derive
from .engine import Trainer, evaluate
from .models import build_teacher_model, freeze, load_teacher
from .optim import build_optimizer, build_schedule
from .tasks import needs_teacher

FITTED = 'teacher.safetensors'


def teacher_record(cfg: DictConfig) -> Dict[str, Any]:
    """What a fitted teacher depends on; a saved teacher is reused only when this matches."""
    keep = {'teacher': {k: v for k, v in cfg.teacher.items() if k != 'checkpoint'}, 'aug': cfg.aug,
            'data': {k: v for k, v in cfg.data.items() if k not in ('num_workers', 'pin_memory')},
            'seed': cfg.train.seed, 'batch_size': cfg.train.batch_size}
    return OmegaConf.to_container(OmegaConf.create(keep), resolve=True)


def _hub_head_fits(cfg: DictConfig, num_classes: int) -> bool:
    """Whether timm's pretrained `teacher.name` already predicts the data's classes (e.g. ImageNet-1k)."""
    pretrained_cfg = get_pretrained_cfg(cfg.teacher.name)
    return pretrained_cfg is not None and pretrained_cfg.num_classes == num_classes


def fit_teacher(cfg: DictConfig, acc: Accelerator, pipe: Pipeline) -> DistillationTeacher:
    """Train `teacher.name` on the training split (from timm's pretrained weights when `teacher.pretrained`), save it
    as `teacher.safetensors` in the run directory, and return it frozen.

    Users distilling on their own classes often have no teacher for them. A teacher fitted earlier in the same
    output directory with the same settings is reused.
    """
    out = Path(cfg.train.output_dir)
    path, record_path = out / FITTED, out / 'teacher.json'
    record = teacher_record(cfg)
    if path.is_file() and record_path.is_file() and json.loads(record_path.read_text()).get('record') == record:
        log(acc, f'reusing the teacher fitted earlier: {path}')
        return load_teacher(cfg, pipe.num_classes, str(path)).to(acc.device)
    f = cfg.teacher.fit
    start = "timm's pretrained weights, new head" if cfg.teacher.pretrained else 'scratch'
    log(acc, f'fitting the teacher {cfg.teacher.name} on the training split for {f.epochs} epochs (from {start})')
    with acc.main_process_first():
        model = build_teacher_model(cfg, pipe.num_classes, pretrained=cfg.teacher.pretrained, new_head=True)
    task = ClassificationTask(model, criterion=criterion(cfg), verbose=False)
    d = derive(cfg, acc.num_processes, len(pipe.train_loader))
    optimizer = build_optimizer(cfg.optim, model, lr=f.lr, weight_decay=f.weight_decay)
    schedule = build_schedule(cfg.optim, optimizer, f.epochs, d.updates_per_epoch, warmup_epochs=f.warmup_epochs)
    model, optimizer = acc.prepare(model, optimizer)
    task.trainable_module = model
    task.to(acc.device)
    trainer = Trainer(acc, task, optimizer, schedule, mixup=data.build_mixup(cfg, pipe.num_classes),
                      clip_grad=cfg.optim.clip_grad, log_interval=cfg.train.log_interval, tag='teacher_fit')
    for epoch in range(f.epochs):
        trainer.train_epoch(pipe.train_loader, epoch, d.updates_per_epoch)
    model = acc.unwrap_model(model)
    # DDP syncs BatchNorm statistics from process 0 at the start of each forward, so after the last step every
    # process holds its own; all must distill from one teacher, the one saved: process 0's.
    model.load_state_dict(broadcast({k: v.contiguous() for k, v in model.state_dict().items()}, from_process=0))
    model.eval()
    metrics = evaluate(lambda x: {'teacher': model(x)}, pipe.val_loader, acc, desc='teacher eval')
    log(acc, f"fitted teacher: top-1 {metrics['teacher_top1']:.2f}% on {metrics['num_samples']} held-out images")
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        record_path.write_text(json.dumps({'record': record, 'metrics': metrics}, indent=2))
    acc.wait_for_everyone()
    acc.free_memory()  # drop Accelerate's references so the student's checkpoints hold the student alone
    return freeze(model).to(acc.device)


DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def teacher_options(cfg: DictConfig) -> Dict[str, Any]:
    """The DistillationTask arguments that set how the teacher runs."""
    t = cfg.teacher
    return {'inference_mode': t.inference_mode, 'teacher_dtype': DTYPES.get(t.precision),
            'channels_last': t.channels_last}


def speed_up(teacher: Optional[DistillationTeacher], cfg: DictConfig) -> Optional[DistillationTeacher]:
    """Apply the configured fast path to a frozen teacher: precision, memory format, torch.compile."""
    if teacher is None:
        return None
    t = cfg.teacher
    if t.precision in DTYPES:
        teacher.model.to(DTYPES[t.precision])
    if t.channels_last:
        teacher.model.to(memory_format=torch.channels_last)
    if t.compile:
        teacher.compile()
    return teacher


def get_teacher(cfg: DictConfig, acc: Accelerator, pipe: Pipeline, fit: bool = True) -> Optional[DistillationTeacher]:
    """The teacher the config asks for, in this order: `teacher.checkpoint`; timm's pretrained weights when their
    head fits the classes; a teacher fitted earlier in the run directory; a new fit (only when `fit`)."""
    if not needs_teacher(cfg):
        return None
    t = cfg.teacher
    if t.checkpoint:
        return load_teacher(cfg, pipe.num_classes).to(acc.device)
    if t.pretrained and _hub_head_fits(cfg, pipe.num_classes):
        with acc.main_process_first():  # one hub download per machine
            return load_teacher(cfg, pipe.num_classes).to(acc.device)
    if fit:
        return fit_teacher(cfg, acc, pipe)
    fitted = Path(cfg.train.output_dir) / FITTED
    return load_teacher(cfg, pipe.num_classes, str(fitted)).to(acc.device) if fitted.is_file() else None
