"""What fitting a teacher means for every family: where a fitted teacher is saved, the record that decides whether it
is reused, and the fit itself (the task family supplies the model and its training step).
"""
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from ..core.build import Pipeline, log
from ..core.engine import Trainer
from ..core.optim import build_optimizer, build_schedule
from ..core.schema import data_record
from ..core.stream import derive


def fitted_path(cfg: DictConfig, index: int) -> Path:
    """Where teacher `index` is saved when the trainer fits it: teacher.safetensors, teacher_1.safetensors, ..."""
    return Path(cfg.train.output_dir) / (f'teacher_{index}' if index else 'teacher')


def teacher_record(cfg: DictConfig, t: DictConfig, **family: Any) -> Dict[str, Any]:
    """What a fitted teacher depends on; a saved teacher is reused only when this matches. `teacher.mean/std` are
    left out: a fitted teacher cannot have them, and teachers fitted before they existed stay reusable. `family`: what
    else the family's teachers depend on (detection: its task and geometry; classification adds nothing, so the
    records written before families existed still match)."""
    keep = {'teacher': {k: v for k, v in t.items()
                        if k not in ('checkpoint', 'mean', 'std', 'cache', 'class_map', 'class_names')},
            'aug': cfg.aug,
            'data': data_record(cfg.data, ('num_workers', 'pin_memory')),
            'seed': cfg.train.seed, 'batch_size': cfg.train.batch_size}
    if cfg.train.global_batch not in (None, cfg.train.batch_size):  # (left out otherwise: older records still match)
        keep['global_batch'] = cfg.train.global_batch
    keep.update(family)
    return OmegaConf.to_container(OmegaConf.create(keep), resolve=True)


def train_teacher(cfg: DictConfig, t: DictConfig, index: int, acc: Accelerator, pipe: Pipeline, task,
                  mixup=None) -> nn.Module:
    """Train `task.trainable_module` (a teacher of either family) on the training split with teacher config `t`'s
    schedule (`t.fit`) and `cfg.optim`'s optimizer; returns it unwrapped, in eval mode, with process 0's weights on
    every process."""
    f = t.fit
    d = derive(cfg, acc.num_processes, pipe.updates_per_epoch)
    optimizer = build_optimizer(cfg.optim, task.trainable_module, lr=f.lr, weight_decay=f.weight_decay)
    schedule = build_schedule(cfg.optim, optimizer, f.epochs, d.updates_per_epoch, warmup_epochs=f.warmup_epochs,
                              sched=f.sched)
    model, optimizer = acc.prepare(task.trainable_module, optimizer)
    task.trainable_module = model
    task.to(acc.device)
    trainer = Trainer(acc, task, optimizer, schedule, mixup=mixup, clip_grad=cfg.optim.clip_grad,
                      log_interval=cfg.train.log_interval, tag=f'teacher_fit_{index}' if index else 'teacher_fit',
                      seed=cfg.train.seed + 7_919)  # mixup draws of its own, not the student's
    for epoch in range(f.epochs):
        trainer.train_epoch(pipe.train_loader, epoch, d.updates_per_epoch)
    model = acc.unwrap_model(model)
    # DDP syncs BatchNorm statistics from process 0 at the start of each forward, so after the last step every
    # process holds its own; all must distill from one teacher, the one saved: process 0's.
    model.load_state_dict(broadcast({k: v.contiguous() for k, v in model.state_dict().items()}, from_process=0))
    return model.eval()


def fitted_earlier(cfg: DictConfig, index: int, record: Dict[str, Any]) -> Optional[Path]:
    """Teacher `index`'s file fitted earlier in the run folder, when its record matches `record` (else None)."""
    stem = fitted_path(cfg, index)
    path, record_path = stem.with_suffix('.safetensors'), stem.with_suffix('.json')
    if path.is_file() and record_path.is_file() and json.loads(record_path.read_text()).get('record') == record:
        return path
    return None


def fit_or_reuse(cfg: DictConfig, t: DictConfig, index: int, acc: Accelerator, record: Dict[str, Any],
                 load: Callable[[Path], Any], fit: Callable[[], nn.Module], measure: Callable[[nn.Module], Dict],
                 describe: Callable[[Dict], str], metadata: Callable[[Dict], Dict[str, Any]] = lambda m: {}) -> Any:
    """A teacher fitted on the training split, saved as `teacher[_index].safetensors` in the run folder beside its
    record (`teacher_record`), or the one fitted there earlier when its record matches: every family's teachers go
    through here, with the family's pieces.

    Args:
        record: what the fitted teacher depends on (`teacher_record`).
        load: the saved teacher from its file (a reuse).
        fit: a new teacher, trained (with `train_teacher` and the family's task).
        measure: its metrics on the validation split; `describe` says them in a log line.
        metadata: what the file records beside the weights (JSON values), from the metrics.

    Returns:
        `load(path)` on a reuse, else the fitted module (its weights saved before it is measured, so an error there
        does not lose the fit; the record holds the metrics once they exist).
    """
    stem = fitted_path(cfg, index)
    path, record_path = stem.with_suffix('.safetensors'), stem.with_suffix('.json')
    if fitted_earlier(cfg, index, record):
        log(acc, f'reusing the teacher fitted earlier: {path}')
        return load(path)
    model = fit()

    def save(metrics: Dict) -> None:
        if acc.is_main_process:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                      metadata={k: json.dumps(v) for k, v in metadata(metrics).items()})
            record_path.write_text(json.dumps({'record': record, 'metrics': metrics}, indent=2))
    save({})
    metrics = measure(model)
    log(acc, f'fitted teacher: {describe(metrics)} on {metrics["num_samples"]} held-out images')
    save(metrics)
    acc.wait_for_everyone()
    acc.free_memory()  # drop Accelerate's references so the student's checkpoints hold the student alone
    return model
