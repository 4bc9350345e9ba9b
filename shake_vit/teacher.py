"""The frozen teacher of a run: loaded from a file, from timm's hub, or fitted first on the training split."""
import json
from pathlib import Path
from typing import Any, Dict, List

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

def teacher_configs(cfg: DictConfig) -> List[DictConfig]:
    """`teacher` then every `extra_teachers` entry; none for methods without a teacher."""
    return [cfg.teacher, *cfg.extra_teachers] if needs_teacher(cfg) else []


def fitted_path(cfg: DictConfig, index: int) -> Path:
    """Where teacher `index` is saved when the trainer fits it: teacher.safetensors, teacher_1.safetensors, ..."""
    return Path(cfg.train.output_dir) / (f'teacher_{index}' if index else 'teacher')


def teacher_record(cfg: DictConfig, t: DictConfig) -> Dict[str, Any]:
    """What a fitted teacher depends on; a saved teacher is reused only when this matches."""
    keep = {'teacher': {k: v for k, v in t.items() if k != 'checkpoint'}, 'aug': cfg.aug,
            'data': {k: v for k, v in cfg.data.items() if k not in ('num_workers', 'pin_memory')},
            'seed': cfg.train.seed, 'batch_size': cfg.train.batch_size}
    return OmegaConf.to_container(OmegaConf.create(keep), resolve=True)


def _hub_head_fits(t: DictConfig, num_classes: int) -> bool:
    """Whether timm's pretrained `t.name` already predicts the data's classes (e.g. ImageNet-1k)."""
    pretrained_cfg = get_pretrained_cfg(t.name)
    return pretrained_cfg is not None and pretrained_cfg.num_classes == num_classes


def fit_teacher(cfg: DictConfig, t: DictConfig, index: int, acc: Accelerator, pipe: Pipeline) -> DistillationTeacher:
    """Train `t.name` on the training split (from timm's pretrained weights when `t.pretrained`), save it as
    `teacher[_index].safetensors` in the run directory, and return it frozen.

    Users distilling on their own classes often have no teacher for them. A teacher fitted earlier in the same
    output directory with the same settings is reused.
    """
    stem = fitted_path(cfg, index)
    path, record_path = stem.with_suffix('.safetensors'), stem.with_suffix('.json')
    record = teacher_record(cfg, t)
    if path.is_file() and record_path.is_file() and json.loads(record_path.read_text()).get('record') == record:
        log(acc, f'reusing the teacher fitted earlier: {path}')
        return load_teacher(t, pipe.num_classes, str(path))
    f = t.fit
    start = "timm's pretrained weights, new head" if t.pretrained else 'scratch'
    log(acc, f'fitting the teacher {t.name} on the training split for {f.epochs} epochs (from {start})')
    with acc.main_process_first():
        model = build_teacher_model(t, pipe.num_classes, pretrained=t.pretrained, new_head=True)
    task = ClassificationTask(model, criterion=criterion(cfg), verbose=False)
    d = derive(cfg, acc.num_processes, len(pipe.train_loader))
    optimizer = build_optimizer(cfg.optim, model, lr=f.lr, weight_decay=f.weight_decay)
    schedule = build_schedule(cfg.optim, optimizer, f.epochs, d.updates_per_epoch, warmup_epochs=f.warmup_epochs,
                              sched='cosine')
    model, optimizer = acc.prepare(model, optimizer)
    task.trainable_module = model
    task.to(acc.device)
    trainer = Trainer(acc, task, optimizer, schedule, mixup=data.build_mixup(cfg, pipe.num_classes),
                      clip_grad=cfg.optim.clip_grad, log_interval=cfg.train.log_interval,
                      tag=f'teacher_fit_{index}' if index else 'teacher_fit')
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
    return freeze(model)


DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def teacher_options(cfg: DictConfig) -> Dict[str, Any]:
    """The DistillationTask arguments that set how the teacher runs."""
    t = cfg.teacher
    return {'inference_mode': t.inference_mode, 'teacher_dtype': DTYPES.get(t.precision),
            'channels_last': t.channels_last}


def speed_up(teacher: DistillationTeacher, t: DictConfig) -> DistillationTeacher:
    """Apply teacher config `t`'s fast path to a frozen teacher: precision, memory format, torch.compile."""
    if t.precision in DTYPES:
        teacher.model.to(DTYPES[t.precision])
    if t.channels_last:
        teacher.model.to(memory_format=torch.channels_last)
    if t.compile:
        teacher.compile()
    return teacher


def get_teachers(cfg: DictConfig, acc: Accelerator, pipe: Pipeline, fit: bool = True) -> List[DistillationTeacher]:
    """Every teacher the config asks for, each from, in this order: its `checkpoint`; timm's pretrained weights when
    their head fits the classes; a teacher fitted earlier in the run directory; a new fit (only when `fit`; without
    it a teacher that cannot be had is left out)."""
    teachers = []
    for index, t in enumerate(teacher_configs(cfg)):
        fitted = fitted_path(cfg, index).with_suffix('.safetensors')
        if t.checkpoint:
            teacher = load_teacher(t, pipe.num_classes, trusted=cfg.train.trust_pickled_files)
        elif t.pretrained and _hub_head_fits(t, pipe.num_classes):
            with acc.main_process_first():  # one hub download per machine
                teacher = load_teacher(t, pipe.num_classes)
        elif fit:
            teacher = fit_teacher(cfg, t, index, acc, pipe)
        elif fitted.is_file():
            teacher = load_teacher(t, pipe.num_classes, str(fitted))
        else:
            break
        teachers.append(speed_up(teacher.to(acc.device), t))
    return teachers
