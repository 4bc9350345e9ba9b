"""Builders shared by training, evaluation and export: the Accelerator and its trackers, the log, the data pipeline's
shape, the optimiser."""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Tuple

import torch
import torch.nn as nn
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import data
from .config import ConfigError, flat_hparams, save_config
from .optim import build_optimizer, build_schedule
from .stream import derive


def _cpu_group() -> bool:
    """`accelerate launch --multi_gpu` on a machine without GPUs starts the processes, but Accelerate joins them into
    one (gloo) group only when told to use the CPU; otherwise each process would silently train alone."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.cuda.is_available()


def process_state() -> PartialState:
    """The launched processes joined as `make_accelerator` joins them, for what a run does before its Accelerator
    (the output folder's check, a backbone pretraining)."""
    return PartialState(cpu=_cpu_group())


def make_accelerator(cfg: DictConfig, trackers: bool = True) -> Accelerator:
    """The run's Accelerator; with `trackers`, also the output directory, `config.yaml` and TensorBoard."""
    out = Path(cfg.train.output_dir)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    cpu = _cpu_group()
    log_with = tracker_list(cfg.train.log_with, out) if trackers else None
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision,
                      gradient_accumulation_steps=cfg.train.grad_accum, dynamo_backend='inductor' if
                      cfg.train.compile else 'no', log_with=log_with or None, project_dir=str(out))
    if cfg.train.cpu_threads >= 0 and acc.device.type == 'cpu':
        # `accelerate launch` sets OMP_NUM_THREADS=1 on machines without GPUs unless told otherwise.
        local = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, (os.cpu_count() or 1) // local))
    if acc.num_processes != world_size:
        raise RuntimeError(f'The launcher started {world_size} processes but Accelerate joined {acc.num_processes}; '
                           'check the accelerate config (`accelerate env`).')
    if trackers:
        if acc.is_main_process:
            try:
                out.mkdir(parents=True, exist_ok=True)
                save_config(cfg, out / 'config.yaml')
            except OSError as err:
                raise ConfigError(f"train.output_dir '{out}' is not writable ({err.strerror}): point it at a folder "
                                  'you can write to (train.output_dir=/path/to/runs/NAME).') from None
        if log_with:  # one project for every run; each run named by its folder
            acc.init_trackers('shake-vit', config=flat_hparams(cfg),
                              init_kwargs={'wandb': {'name': out.name}, 'mlflow': {'run_name': out.name}})
    return acc


# the package each Accelerate tracker needs (Accelerate itself skips a missing one without a word)
TRACKER_PACKAGES = {'tensorboard': 'tensorboard', 'wandb': 'wandb', 'comet_ml': 'comet-ml', 'aim': 'aim',
                    'mlflow': 'mlflow', 'clearml': 'clearml', 'dvclive': 'dvclive', 'swanlab': 'swanlab',
                    'trackio': 'trackio'}


def tracker_list(names, out: Path) -> list:
    """`train.log_with` as Accelerate's `log_with`: TensorBoard writes to OUTPUT/tensorboard; the others log to the
    project 'shake-vit', the run named by its folder. A tracker whose package is missing is an error naming it."""
    from accelerate.tracking import LoggerType, TensorBoardTracker, get_available_trackers
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if str(LoggerType(n)) not in available]
    if missing:
        raise ConfigError(f"train.log_with names {', '.join(missing)}, but "
                          f"{'its package is' if len(missing) == 1 else 'their packages are'} not installed: pip "
                          f"install {' '.join(TRACKER_PACKAGES.get(n, n) for n in missing)}, or drop "
                          f"{'it' if len(missing) == 1 else 'them'} from train.log_with (TensorBoard comes with "
                          'shake-vit).')
    return [TensorBoardTracker('tensorboard', str(out)) if n == 'tensorboard' else n for n in names]


def log(acc: Accelerator, message: str) -> None:
    """A line on the main process, written past any progress bar (tqdm clears the bar, writes, and redraws it): a
    health warning raised mid-epoch gets its own line."""
    if acc.is_main_process:
        tqdm.write(f'[shake-vit] {message}')


def finish(acc: Accelerator, keep_process_group: bool = False) -> None:
    """Close the trackers and the process group on every process at once: a process that tears its group down
    while a peer still writes the run's files can abort the peer's gloo connection.

    With `keep_process_group` (a run that another run in the same processes follows: a detector's backbone
    pretraining), the group stays and Accelerate's per-run state is cleared, so that the next run's Accelerator takes
    its own mixed precision, compilation and accumulation. Accelerate keeps that state in process-wide singletons and
    offers no public way to start over; its `_reset_state` is what its own tests use.
    """
    acc.wait_for_everyone()
    if not keep_process_group:
        acc.end_training()
        return
    for tracker in acc.trackers:
        tracker.finish()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


@contextmanager
def downloads_first(acc: Accelerator) -> Iterator[None]:
    """Run a block that may download (a data set, pretrained weights) on the main process first, then on each
    machine's local main process, then on the rest: one download per disk, whether the machines share a filesystem
    (the others find the files in place) or each has its own. Accelerate's two contexts, nested."""
    with acc.main_process_first(), acc.local_main_process_first():
        yield


@dataclass
class Pipeline:
    """Everything the data side gives the loops."""

    splits: data.Splits
    train_loader: DataLoader  # this process's micro-batches of the global stream, never prepared (data.train_loader)
    val_loader: DataLoader  # prepared: sharded over processes
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.splits.classes)

    @property
    def updates_per_epoch(self) -> int:
        return self.train_loader.batch_sampler.stream.updates_per_epoch


def build_optimization(cfg: DictConfig, student: nn.Module, num_processes: int, updates_per_epoch: int):
    """The optimizer and the per-update lr schedule of the student, with the derived update counts."""
    d = derive(cfg, num_processes, updates_per_epoch)
    optimizer = build_optimizer(cfg.optim, student, lr=d.lr)
    return optimizer, build_schedule(cfg.optim, optimizer, cfg.train.epochs, d.updates_per_epoch), d
