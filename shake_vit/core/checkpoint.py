"""Checkpoints: Accelerate's `save_state` plus the EMA weights and a human-readable state file, written atomically.

A checkpoint is `OUTPUT/checkpoints/update_XXXXXXXX/` holding what `accelerator.save_state` writes (student,
optimizer, grad scaler, every process's RNG states) plus `ema.safetensors` and `trainer_state.json` (epoch, batches
done in it, update count, metrics, best metric). It is written under a temporary name and renamed when complete:
Accelerate writes in place, so a crash mid-save would otherwise leave a half checkpoint where the newest should be.
Everything is read back with `weights_only=True` or from `.safetensors`.
"""
import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3

STATE_FILE = 'trainer_state.json'
EMA_FILE = 'ema.safetensors'
PREFIX = 'update_'


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or used; earlier checkpoints are untouched."""


@dataclass
class Progress:
    """Where a run is: the next micro-batch to train is global micro-batch `micro_batches_done` of epoch `epoch`
    (a whole number of updates: shake_vit/core/stream.py)."""

    epoch: int = 0
    micro_batches_done: int = 0  # of the global stream, in the current epoch
    update: int = 0  # optimizer updates so far
    metrics: Dict[str, float] = field(default_factory=dict)  # the latest evaluation
    best: Optional[float] = None  # best value of the tracked metric so far
    best_of: str = ''  # the metrics entry `best` tracks (ckpt.metric, else what the student predicts with)
    best_epoch: int = 0  # the epoch (1-based) that scored `best`
    run: Dict[str, Any] = field(default_factory=dict)  # what must match on resume (architecture, classes, ...)


def fault_hook(point: str, update: int) -> None:
    """Fault injection for tests/test_reliability.py: SHAKE_VIT_KILL=point:update SIGKILLs this process there.

    'save:N' dies inside the save of update N, after every file is written and before the rename; 'update:N' dies
    right after update N. Only in a launcher's first attempt: workers that torchrun restarts (`--max_restarts`) run
    on. Unset (always, outside those tests) it does nothing.
    """
    first_attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'
    if first_attempt and os.environ.get('SHAKE_VIT_KILL') == f'{point}:{update}':
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_progress(path: Path) -> Progress:
    state = json.loads((Path(path) / STATE_FILE).read_text())
    if 'batches_done' in state:  # written before the global stream: per-process batches, each one micro-batch
        state['micro_batches_done'] = state.pop('batches_done') * state.get('run', {}).get('num_processes', 1)
    return Progress(**state)


def complete_checkpoints(root: Path) -> List[Path]:
    """Finished checkpoints under `root`, oldest first (temporary `.tmp-*` folders never count)."""
    if not root.is_dir():
        return []
    found = []
    for d in root.glob(f'{PREFIX}*'):
        try:
            found.append((read_progress(d).update, d))
        except (OSError, ValueError, TypeError):
            continue  # unreadable state file: not a usable checkpoint
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root`, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


class Checkpointer:
    """Saves and restores the training state of one run.

    Args:
        acc: the run's Accelerator (every process calls `save` and `load`).
        root: the checkpoint folder, `OUTPUT/checkpoints`.
        ema: the EMA of the student, saved beside it, or None.
        keep_last: how many of the newest checkpoints to keep (the best one is kept as well).
        metric: the `Progress.metrics` entry that defines the best checkpoint (higher is better).
    """

    def __init__(self, acc: Accelerator, root: Path, ema: Optional[ModelEmaV3], keep_last: int, metric: str):
        self.acc, self.root, self.ema, self.keep_last, self.metric = acc, Path(root), ema, keep_last, metric

    def save(self, progress: Progress) -> Path:
        acc = self.acc
        final = self.root / f'{PREFIX}{progress.update:08d}'
        tmp = self.root / f'.tmp-{final.name}'
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        error = None
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            acc.save_state(str(tmp), safe_serialization=True)
            if acc.is_main_process:
                if self.ema is not None:
                    save_file({k: v.contiguous() for k, v in self.ema.module.state_dict().items()}, str(tmp / EMA_FILE))
                state_path = tmp / STATE_FILE
                with open(state_path, 'w') as f:
                    json.dump(asdict(progress), f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as err:  # a full disk, a quota, a vanished mount
            error = err
        # Every process learns whether any failed, so none waits forever for a rename that will not come.
        failed = acc.reduce(torch.tensor([float(error is not None)], device=acc.device), 'sum').item() > 0
        if failed:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            acc.wait_for_everyone()
            newest = complete_checkpoints(self.root)
            raise CheckpointError(
                f'Saving the checkpoint of update {progress.update} failed ({error or "on another process"}); '
                f"the partial files were removed and the newest complete checkpoint is "
                f"{newest[-1] if newest else 'none'}. Free disk space in {self.root} (or point "
                'train.output_dir elsewhere) and resume with --resume auto.')
        fault_hook('save', progress.update)
        if acc.is_main_process:
            if final.exists():  # the same update saved again (e.g. after a resume): the new one replaces it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        checkpoints = complete_checkpoints(self.root)
        keep = set(checkpoints[-self.keep_last:]) if self.keep_last > 0 else set(checkpoints)
        scored = [(read_progress(d).metrics.get(self.metric), d) for d in checkpoints]
        scored = [(v, d) for v, d in scored if v is not None]
        if scored:
            keep.add(max(scored, key=lambda item: item[0])[1])
        for d in checkpoints:
            if d not in keep:
                shutil.rmtree(d, ignore_errors=True)
        for stale in self.root.glob('.tmp-*'):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.root)

    def load(self, path: Path) -> Progress:
        """Restore student, optimizer, scaler, RNG states and EMA; returns where to continue."""
        path = Path(path)
        progress = read_progress(path)
        # Every random draw of training is seeded from the stream (shake_vit/core/stream.py), so the RNG states
        # Accelerate restores do not decide what comes next: a run resumed on more processes than wrote the
        # checkpoint finds no RNG file for the new ones, and Accelerate leaves their RNGs as they are.
        self.acc.load_state(str(path))
        # Accelerate restores its count of accumulated micro-batches, which is the writing layout's; a checkpoint is
        # at an update boundary, so this layout's accumulation starts afresh.
        self.acc.step = 0
        if self.ema is not None:
            if not (path / EMA_FILE).exists():
                raise CheckpointError(f'{path} holds no EMA weights but train.ema is on; resume with train.ema=false.')
            self.ema.module.load_state_dict(load_file(str(path / EMA_FILE)))  # copied onto the EMA's device
        return progress
