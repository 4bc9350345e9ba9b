"""Classification (`task: classification`): a timm student with SHAKE's shadow heads, top-1 evaluation."""
from typing import Any, Dict, List, Optional

import torch.nn as nn
from accelerate import Accelerator, PartialState
from omegaconf import DictConfig

from ..core.family import Family, Metrics, register
from ..distill import cache as teacher_cache
from ..distill.methods import loss_fn
from . import cache_writer, data
from .evaluation import evaluate_student, format_table
from .export import classes_in, export
from .health import ClassificationHealth
from .models import Student, build_student, student_kwargs
from .pretrained import load_pretrained, load_student, student_keys
from .tasks import DistillationTask
from .teacher import cache_claims, get_teachers, teacher_options


class ClassificationFamily(Family):
    name = 'classification'
    data_names = ('imagefolder', 'digits', 'cifar10', 'cifar100', 'fake')

    def build_splits(self, cfg: DictConfig):
        return data.build_splits(cfg)

    def build_student(self, cfg: DictConfig, num_classes: int) -> Student:
        return build_student(cfg, num_classes)

    def check_architectures(self, cfg: DictConfig, num_classes: int) -> None:
        from .models import build_teacher_architecture
        from .teacher import teacher_configs
        build_student(cfg, num_classes)
        for t in teacher_configs(cfg):
            build_teacher_architecture(t, num_classes)

    def init_student(self, cfg: DictConfig, student: Student, log) -> None:
        if cfg.model.pretrained:
            notes = load_pretrained(student, cfg.model.pretrained, cfg.train.trust_pickled_files)
            log(f'fine-tuning from {cfg.model.pretrained}' + ''.join(f'\n    {note}' for note in notes))

    def run_identity(self, cfg: DictConfig, student: Student) -> Dict[str, Any]:
        return {'model': cfg.model.name, 'model_kwargs': student_kwargs(cfg), 'shadow_head': cfg.model.shadow_head,
                'shadow_on': student.placement, 'num_shadow': student.num_shadow, 'cifar_stem': cfg.model.cifar_stem,
                'num_classes': student.num_classes}

    def train_repeats(self, cfg: DictConfig) -> int:
        return cfg.aug.repeated_aug

    def build_pipeline(self, cfg: DictConfig, acc: Accelerator, splits, student: nn.Module):
        return data.build_pipeline(cfg, acc, splits, student, self.train_repeats(cfg))

    def get_teachers(self, cfg: DictConfig, acc: Accelerator, pipe, fit: bool = True) -> List[nn.Module]:
        if teacher_cache.in_use(cfg):  # the cache stands in for every teacher: none is built
            return []
        return get_teachers(cfg, acc, pipe, fit)

    def health(self, cfg: DictConfig, acc: Accelerator, classes, total_updates: int, log) -> ClassificationHealth:
        return ClassificationHealth(cfg, acc, classes, total_updates, log)

    def check_teachers(self, health, task, teachers: List[nn.Module], pipe) -> None:
        health.check_teachers(task, teachers, pipe.val_loader, getattr(task, 'cache', None))

    def make_task(self, cfg: DictConfig, student: nn.Module, teachers: List[nn.Module], pipe) -> DistillationTask:
        cache = teacher_cache.open_reader(cfg, pipe, cache_claims(cfg, pipe),
                                          log=lambda m: print(f'[shake-vit] {m}') if
                                          PartialState().is_main_process else None) \
            if teacher_cache.in_use(cfg) else None
        return DistillationTask(student, teachers, loss_fn(cfg), data.criterion(cfg.aug), pipe.mean, pipe.std,
                                **teacher_options(cfg), cache=cache)

    def mixup(self, cfg: DictConfig, pipe):
        return data.build_mixup(cfg.aug, pipe.num_classes)

    def evaluate(self, student: Student, ema, task, loader, acc: Accelerator, with_shadow: bool = True) -> Metrics:
        metrics = evaluate_student(student, ema, task, loader, acc, with_shadow)
        if getattr(task, 'cache', None) is not None:  # no teacher runs: its top-1 as the cache's writer measured it
            metrics.update(task.cache.metrics)
        return metrics

    def best_metric(self, student: Student) -> str:
        return f'top1_{student.predict}'  # the best checkpoint by what the student predicts with

    def headline(self, metrics: Metrics) -> str:
        return 'top-1 ' + ', '.join(f'{h} {metrics[f"top1_{h}"]:.2f}' for h in ('cls', 'shadow', 'avg')
                                    if f'top1_{h}' in metrics)

    def format_table(self, metrics: Metrics, student: Student) -> str:
        return format_table(metrics, student.predict)

    def student_keys(self, state):
        return student_keys(state)

    def load_weights(self, student: Student, weights, path, cfg: DictConfig) -> bool:
        return load_student(student, weights, path, cfg)

    def eval_teachers(self, cfg: DictConfig, acc: Accelerator, pipe) -> List[nn.Module]:
        return get_teachers(cfg, acc, pipe, fit=False)  # a run trained from a teacher cache: its live teacher too

    def eval_task(self, cfg: DictConfig, student: nn.Module, teachers: List[nn.Module], pipe) -> DistillationTask:
        return DistillationTask(student, teachers, None, None, pipe.mean, pipe.std, **teacher_options(cfg))

    def cache_teacher(self, cfg: DictConfig, root: str) -> Dict[str, Any]:
        return cache_writer.write(cfg, root, self)

    def classes_in(self, weights, cfg: DictConfig) -> int:
        return classes_in(weights, cfg)

    def export(self, student: Student, with_shadow: bool, where, cfg: DictConfig, head: Optional[str],
               out_dir: Optional[str], fmt: str = 'timm'):
        return export(student, with_shadow, where, cfg, head, out_dir, fmt)


register(ClassificationFamily())
