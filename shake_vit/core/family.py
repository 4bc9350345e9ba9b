"""What a task family (`task: classification | detection`) gives the one training loop, and the registry of families.

The runner (shake_vit/core/runner.py), `--eval`, `--export`, `--print-config`, `--check-data` and `--cache-teacher`
reach the data, the student, the teachers, the training step, the evaluation and the outputs through a `Family`;
nothing outside the family packages branches on the task. A family registers itself (`register`) when its package is
imported (shake_vit/__init__.py imports them all): classification is shake_vit/classification/family.py, detection
shake_vit/detection/family.py.
"""
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn
from accelerate import Accelerator
from omegaconf import DictConfig
from timm.task import TrainingTask

from .config import ConfigError, check_choice, register_check

Metrics = Dict[str, Any]


class Family:
    """The interface; each method says what the runner expects of it."""

    name = ''
    data_names: tuple = ()  # the `data.name` values it reads
    check_classes = 1000  # a class count for building its heads before the data is read (--print-config)

    def before_run(self, cfg: DictConfig, train: Callable[[DictConfig], Dict[str, Any]]) -> bool:
        """Runs a training run needs done first, trained with `train` (the runner's own; it returns {} when stopped
        by a signal), e.g. a detector's backbone pretrained on classification. Returns False when one was stopped."""
        return True

    def train_repeats(self, cfg: DictConfig) -> int:
        """Copies of each image per epoch in the train sampler (repeated augmentation; 1: none)."""
        return 1

    def build_splits(self, cfg: DictConfig):
        """The train and val data sets and the class names (`data.Splits`)."""
        raise NotImplementedError

    def build_student(self, cfg: DictConfig, num_classes: int) -> nn.Module:
        """The trainable module (the student and its shadow heads), fresh."""
        raise NotImplementedError

    def check_architectures(self, cfg: DictConfig, num_classes: int) -> None:
        """Build what a run builds from the config alone (the student, the teachers' architectures), with random
        weights and nothing downloaded, so that `--print-config` refuses what the run would (ConfigError)."""
        raise NotImplementedError

    def init_student(self, cfg: DictConfig, student: nn.Module, log) -> None:
        """Initialise a new run's student from pretrained weights, if the config names any."""

    def start_from_teachers(self, cfg: DictConfig, student: nn.Module, teachers: List[nn.Module]) -> None:
        """A new run's student parts that begin as a copy of the teacher's (not on resume, not for --eval)."""

    def run_identity(self, cfg: DictConfig, student: nn.Module) -> Dict[str, Any]:
        """What a checkpoint must share with the run resuming it, beside the config (the process count may differ)."""
        raise NotImplementedError

    def build_pipeline(self, cfg: DictConfig, acc: Accelerator, splits, student: nn.Module):
        """The loaders (`build.Pipeline`): this process's train share, never prepared, and the prepared val loader."""
        raise NotImplementedError

    def get_teachers(self, cfg: DictConfig, acc: Accelerator, pipe, fit: bool = True) -> List[nn.Module]:
        """The frozen teachers the method needs: loaded, downloaded or (with `fit`) fitted first."""
        raise NotImplementedError

    def health(self, cfg: DictConfig, acc: Accelerator, classes: List[str], total_updates: int, log):
        """The run's health checks (a `distill.health.Health`, with the family's own checks)."""
        raise NotImplementedError

    def check_teachers(self, health, task: TrainingTask, teachers: List[nn.Module], pipe) -> None:
        """The teacher health checks before the first update (from `health`); a failure raises HealthError."""

    def make_task(self, cfg: DictConfig, student: nn.Module, teachers: List[nn.Module], pipe) -> TrainingTask:
        """The training step: `task(inputs, targets) -> {'loss', named terms...}`; `student` may be DDP-wrapped."""
        raise NotImplementedError

    def mixup(self, cfg: DictConfig, pipe) -> Optional[Any]:
        """A batch transform the trainer applies before the step (timm's Mixup), or None."""
        return None

    def evaluate(self, student: nn.Module, ema, task: TrainingTask, loader, acc: Accelerator,
                 with_shadow: bool = True) -> Metrics:
        """One flat dict of metrics (every head, the EMA's, the teachers'), exact over processes."""
        raise NotImplementedError

    def best_metric(self, student: nn.Module) -> str:
        """The metrics entry that picks the best checkpoint unless `ckpt.metric` is set (higher is better)."""
        raise NotImplementedError

    def headline(self, metrics: Metrics) -> str:
        """A few numbers for the per-epoch log line."""
        raise NotImplementedError

    def format_table(self, metrics: Metrics, student: nn.Module) -> str:
        """The evaluation as the table the run and `--eval` print."""
        raise NotImplementedError

    def student_keys(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """A saved state dict (a checkpoint's, a DDP save's, an export's) with the keys of this family's student."""
        raise NotImplementedError

    def load_weights(self, student: nn.Module, weights: Dict[str, Any], path, cfg: DictConfig) -> bool:
        """Saved weights (`student_keys`) into the student the config builds, for `--eval` and `--export`; returns
        whether they hold the shadow heads (an export has none). Weights of another student: ConfigError."""
        raise NotImplementedError

    def eval_teachers(self, cfg: DictConfig, acc: Accelerator, pipe) -> List[nn.Module]:
        """The teachers `--eval` reports beside the student: those the config names, never fitted anew."""
        return self.get_teachers(cfg, acc, pipe, fit=False)

    def eval_task(self, cfg: DictConfig, student: nn.Module, teachers: List[nn.Module], pipe) -> TrainingTask:
        """The task `--eval` evaluates through: the live teachers, no loss."""
        return self.make_task(cfg, student, teachers, pipe)

    def cache_teacher(self, cfg: DictConfig, root: str) -> Dict[str, Any]:
        """`train.py --cache-teacher DIR`: the teachers' outputs on the run's input stream, written once."""
        raise ConfigError(f'--cache-teacher: task {cfg.task} has no teacher-output cache.')

    def classes_in(self, weights: Dict[str, Any], cfg: DictConfig) -> int:
        """The class count of a saved student (`student_keys`), read from its weights."""
        raise NotImplementedError

    def check_export(self, head: Optional[str], fmt: str) -> None:
        """Refuse, before any weights are read, an export this family cannot make (ConfigError)."""

    def export(self, student: nn.Module, with_shadow: bool, where, cfg: DictConfig, head: Optional[str],
               out_dir: Optional[str], fmt: str) -> Any:
        """`train.py --export`: the loaded student (eval mode) alone, loadable without this package, checked against
        the student; beside its weights (`where`) unless `out_dir` is given. Returns the export's folder."""
        raise NotImplementedError


FAMILIES: Dict[str, Family] = {}  # task -> family, filled as the family packages are imported


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(cfg: DictConfig) -> Family:
    """The family of `cfg.task` (the config refuses an unknown task before anyone asks)."""
    return FAMILIES[cfg.task]


@register_check
def check_task(cfg: DictConfig) -> None:
    """`task` names a registered family, and `data.name` one of its data sets (checked before any other)."""
    check_choice(cfg, 'task', tuple(FAMILIES))
    check_choice(cfg, 'data.name', FAMILIES[cfg.task].data_names, f' for task {cfg.task}')
