"""A whole run, built from the config: data, teacher (loaded or fitted), student, loop, evaluation, outputs."""
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from timm.data import resolve_model_data_config
from timm.loss import create_classification_loss
from timm.task import ClassificationTask, DistillationTeacher
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from . import data
from .config import derive, flat_hparams, mixup_active, save_config
from .engine import Trainer, evaluate
from .models import Student, build_student, build_teacher_model, freeze, load_teacher, read_state_dict
from .optim import build_optimizer, build_schedule
from .tasks import DistillationTask, loss_fn, needs_teacher, trains_shadow

Predict = Callable[[torch.Tensor], Dict[str, torch.Tensor]]


def make_accelerator(cfg: DictConfig) -> Accelerator:
    out = Path(cfg.train.output_dir)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    # `accelerate launch --multi_gpu` on a machine without GPUs starts the processes, but Accelerate joins them into
    # one (gloo) group only when told to use the CPU; otherwise each process would silently train alone.
    cpu = world_size > 1 and not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision,
                      gradient_accumulation_steps=cfg.train.grad_accum, log_with='tensorboard', project_dir=str(out))
    if acc.num_processes != world_size:
        raise RuntimeError(f'The launcher started {world_size} processes but Accelerate joined {acc.num_processes}; '
                           'check the accelerate config (`accelerate env`).')
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / 'config.yaml')
    acc.init_trackers('tensorboard', config=flat_hparams(cfg))
    return acc


def log(acc: Accelerator, message: str) -> None:
    acc.print(f'[shake-vit] {message}')


@dataclass
class Pipeline:
    """Everything the data side gives the loops."""

    splits: data.Splits
    train_loader: DataLoader
    val_loader: DataLoader  # prepared: sharded over processes
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.splits.classes)


def build_pipeline(cfg: DictConfig, acc: Accelerator, splits: data.Splits, student: nn.Module) -> Pipeline:
    model_cfg = resolve_model_data_config(student.model if isinstance(student, Student) else student)
    mean, std = tuple(model_cfg['mean']), tuple(model_cfg['std'])
    train_tf, val_tf = data.build_transforms(cfg, mean, std)
    train = data.train_loader(cfg, splits.train, train_tf, acc.num_processes, acc.process_index)
    val = acc.prepare(data.eval_loader(cfg, splits.val, val_tf))
    return Pipeline(splits, train, val, mean, std)


def build_optimization(cfg: DictConfig, student: nn.Module, num_processes: int, batches_per_epoch: int):
    """The optimizer and the per-update lr schedule of the student, with the derived update counts."""
    d = derive(cfg, num_processes, batches_per_epoch)
    optimizer = build_optimizer(cfg.optim, student, lr=d.lr)
    return optimizer, build_schedule(cfg.optim, optimizer, cfg.train.epochs, d.updates_per_epoch), d


def criterion(cfg: DictConfig) -> nn.Module:
    """Label loss: soft-target CE under mixup (which already smooths), else label-smoothing CE."""
    return create_classification_loss(smoothing=cfg.aug.smoothing, soft_targets=mixup_active(cfg))


def teacher_record(cfg: DictConfig) -> Dict[str, Any]:
    """What a fitted teacher depends on; a saved teacher is reused only when this matches."""
    keep = {'teacher': {k: v for k, v in cfg.teacher.items() if k != 'checkpoint'}, 'aug': cfg.aug,
            'data': {k: v for k, v in cfg.data.items() if k not in ('num_workers', 'pin_memory')},
            'seed': cfg.train.seed, 'batch_size': cfg.train.batch_size}
    return OmegaConf.to_container(OmegaConf.create(keep), resolve=True)


def fit_teacher(cfg: DictConfig, acc: Accelerator, pipe: Pipeline) -> DistillationTeacher:
    """Train `teacher.name` on the training split, save it as `teacher.safetensors`, and return it frozen.

    Users distilling on their own classes often have no teacher for them. A teacher fitted earlier in the same
    output directory with the same settings is reused.
    """
    out = Path(cfg.train.output_dir)
    path, record_path = out / 'teacher.safetensors', out / 'teacher.json'
    record = teacher_record(cfg)
    if path.is_file() and record_path.is_file() and json.loads(record_path.read_text()).get('record') == record:
        log(acc, f'reusing the teacher fitted earlier: {path}')
        return load_teacher(cfg, pipe.num_classes, str(path)).to(acc.device)
    f = cfg.teacher.fit
    log(acc, f'no teacher.checkpoint: fitting {cfg.teacher.name} on the training split for {f.epochs} epochs')
    model = build_teacher_model(cfg, pipe.num_classes)
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
    model.eval()
    metrics = evaluate(lambda x: {'teacher': model(x)}, pipe.val_loader, acc, desc='teacher eval')
    log(acc, f"fitted teacher: top-1 {metrics['teacher_top1']:.2f}% on {metrics['num_samples']} held-out images")
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        record_path.write_text(json.dumps({'record': record, 'metrics': metrics}, indent=2))
    acc.wait_for_everyone()
    acc.free_memory()  # drop Accelerate's references so the student's checkpoints hold the student alone
    return freeze(model).to(acc.device)


def get_teacher(cfg: DictConfig, acc: Accelerator, pipe: Pipeline) -> Optional[DistillationTeacher]:
    if not needs_teacher(cfg):
        return None
    if cfg.teacher.checkpoint or cfg.teacher.pretrained:
        with acc.main_process_first():  # one hub download per machine
            return load_teacher(cfg, pipe.num_classes).to(acc.device)
    return fit_teacher(cfg, acc, pipe)


def head_predictor(student: Student, task: DistillationTask) -> Predict:
    """Eval-mode logits of every head: cls, shadow, their DeiT average, and the teacher's when there is one."""
    def predict(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        s, h = student.forward_heads(x)
        heads = {'cls': s, 'shadow': h, 'avg': (s + h) / 2}
        t = task.teacher_logits(x)
        if t is not None:
            heads['teacher'] = t
        return heads
    return predict


def format_table(metrics: Dict[str, float]) -> str:
    rows = [('student cls head', 'cls'), ('shadow head', 'shadow'), ('average (DeiT)', 'avg')]
    lines = [f"{'head':<20}{'top-1':>8}{'top-5':>8}", '-' * 36]
    for label, head in rows:
        lines.append(f"{label:<20}{metrics[f'top1_{head}']:>8.2f}{metrics[f'top5_{head}']:>8.2f}")
        if f'ema_top1_{head}' in metrics:
            lines.append(f"{'  EMA ' + label:<20}{metrics[f'ema_top1_{head}']:>8.2f}{metrics[f'ema_top5_{head}']:>8.2f}")
    if 'teacher_top1' in metrics:
        lines.append(f"{'teacher':<20}{metrics['teacher_top1']:>8.2f}{metrics['teacher_top5']:>8.2f}")
    lines.append(f"{metrics['num_samples']} images; cls/shadow agreement {metrics['agree_cls_shadow']:.2f}%")
    return '\n'.join(lines)


def evaluate_student(student: Student, ema: Optional[ModelEmaV3], task: DistillationTask, loader: DataLoader,
                     acc: Accelerator) -> Dict[str, float]:
    student.eval()
    metrics = evaluate(head_predictor(student, task), loader, acc)
    if ema is not None:
        ema_metrics = evaluate(head_predictor(ema.module, task), loader, acc, desc='eval EMA')
        metrics.update({f'ema_{k}': v for k, v in ema_metrics.items() if 'teacher' not in k and k != 'num_samples'})
    return metrics


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Train the student as configured; returns the final evaluation written to `results.json`."""
    acc = make_accelerator(cfg)
    set_seed(cfg.train.seed, device_specific=True)
    out = Path(cfg.train.output_dir)
    splits = data.build_splits(cfg)
    student = build_student(cfg, len(splits.classes))
    student.set_shadow_trainable(trains_shadow(cfg))
    pipe = build_pipeline(cfg, acc, splits, student)
    teacher = get_teacher(cfg, acc, pipe)

    optimizer, schedule, d = build_optimization(cfg, student, acc.num_processes, len(pipe.train_loader))
    log(acc, f'{cfg.loss.method}: {cfg.model.name} student, {len(splits.train)} train / {len(splits.val)} val images, '
             f'{pipe.num_classes} classes; {d.describe()}')
    prepared, optimizer = acc.prepare(student, optimizer)
    ema = ModelEmaV3(student, decay=cfg.train.ema_decay) if cfg.train.ema else None
    task = DistillationTask(prepared, teacher, loss_fn(cfg), criterion(cfg), pipe.mean, pipe.std).to(acc.device)
    trainer = Trainer(acc, task, optimizer, schedule, mixup=data.build_mixup(cfg, pipe.num_classes), ema=ema,
                      clip_grad=cfg.optim.clip_grad, log_interval=cfg.train.log_interval)

    train_time, metrics = 0.0, {}
    for epoch in range(cfg.train.epochs):
        start = time.perf_counter()
        stats = trainer.train_epoch(pipe.train_loader, epoch, d.updates_per_epoch)
        train_time += time.perf_counter() - start
        if (epoch + 1) % cfg.eval.interval == 0 or epoch + 1 == cfg.train.epochs:
            metrics = evaluate_student(student, ema, task, pipe.val_loader, acc)
            acc.log({f'val/{k}': v for k, v in metrics.items()}, step=trainer.update)
            log(acc, f"epoch {epoch + 1}/{cfg.train.epochs}: loss {stats.get('loss', float('nan')):.4f}, top-1 cls "
                     f"{metrics['top1_cls']:.2f} shadow {metrics['top1_shadow']:.2f} avg {metrics['top1_avg']:.2f}")

    results = dict(metrics, epochs=cfg.train.epochs,
                   train_images_per_sec=trainer.update * d.global_batch / max(train_time, 1e-9))
    if acc.is_main_process:
        (out / 'results.json').write_text(json.dumps(results, indent=2))
        state = {k: v.contiguous() for k, v in acc.unwrap_model(prepared).state_dict().items()}
        save_file(state, str(out / 'student.safetensors'))
    log(acc, f'final evaluation ({out}/results.json):\n' + format_table(results))
    acc.end_training()
    return results
