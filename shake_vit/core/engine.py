"""The training and evaluation loops on Accelerate. Method-agnostic: a step is whatever the TrainingTask returns."""
import contextlib
import os
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import send_to_device
from einops import rearrange
from timm.data import Mixup
from timm.scheduler.scheduler import Scheduler
from timm.task import TrainingTask
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import data, stream
from .optim import current_lr


def progress(iterable=None, **kwargs) -> tqdm:
    """A progress bar that redraws at most every 30 s when stderr is a log file rather than a terminal."""
    return tqdm(iterable, leave=False, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30, **kwargs)


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the message names the term and the update."""


class Trainer:
    """Runs optimizer updates of a `TrainingTask`: each is `accum` micro-batches on every process (Accelerate's
    gradient accumulation), the global stream's k micro-batches of one update.

    Loss terms are summed on the device between log points, so no step waits on the host; every `log_interval`
    updates the sums are averaged over processes and logged under their names with the lr and images/s.

    Args:
        accelerator: the run's Accelerator.
        task: the step; `task.trainable_module` is the prepared (DDP) model.
        optimizer: the prepared optimizer.
        schedule: timm scheduler stepped with the update index, or None for a constant lr.
        mixup: timm Mixup applied to every batch before the step (the teacher sees the mixed batch too).
        ema: an EMA of the unwrapped trainable module, updated after every update.
        clip_grad: max gradient norm, or None.
        log_interval: updates between log points.
        tag: prefix of the logged names ('train', 'teacher_fit').
        seed: the run seed; each micro-batch's mixup and the student's own draws are seeded by (seed, epoch,
            global micro-batch), shake_vit/core/stream.py.
    """

    def __init__(self, accelerator: Accelerator, task: TrainingTask, optimizer: torch.optim.Optimizer,
                 schedule: Optional[Scheduler], *, mixup: Optional[Mixup] = None, ema: Optional[ModelEmaV3] = None,
                 clip_grad: Optional[float] = None, log_interval: int = 50, tag: str = 'train', seed: int = 0):
        self.accelerator, self.task, self.optimizer, self.schedule = accelerator, task, optimizer, schedule
        self.seed = seed
        self.mixup, self.ema, self.clip_grad, self.log_interval, self.tag = mixup, ema, clip_grad, log_interval, tag
        self.update = 0  # optimizer updates done; the lr is a function of it
        self.after_update: Callable[[], bool] = lambda: False  # checkpointing hook; True stops the epoch
        self.on_log: Callable[[Dict[str, float], int], None] = lambda values, update: None  # health checks
        self._reset_sums()

    def _reset_sums(self) -> None:
        # Device scalars: the batches seen and the first batch whose loss was not finite (-1: none), kept without
        # a host synchronisation so that a NaN can be reported with its update at the next log point.
        self._batches = torch.zeros((), dtype=torch.int64, device=self.accelerator.device)
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.accelerator.device)
        self._sums: Dict[str, torch.Tensor] = {}
        self._steps = 0
        self._images = 0
        self._since = time.perf_counter()

    def _accumulate(self, out: Dict[str, torch.Tensor], batch: int) -> None:
        self._batches += 1
        bad = ~torch.isfinite(out['loss'].detach()) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, self._batches, self._first_bad)
        for name, value in out.items():
            if value.ndim == 0:  # scalars are loss terms; logits are left to evaluation
                value = value.detach().float()
                self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._steps += 1
        self._images += batch * self.accelerator.num_processes

    def flush(self) -> Dict[str, float]:
        """Average the summed terms over steps and processes, check them, log them, and start new sums."""
        if not self._steps:
            return {}
        names = sorted(self._sums)
        means = self.accelerator.reduce(torch.stack([self._sums[n] for n in names]), 'mean') / self._steps
        values = dict(zip(names, means.tolist()))  # the one host sync of the interval
        bad = [n for n in names if n not in ('loss', 'monitor_ce') and not torch.isfinite(torch.tensor(values[n]))]
        if bad or not torch.isfinite(torch.tensor(values['loss'])):
            first = int(self._first_bad.item())  # batches since the last log point
            accum = self.accelerator.gradient_accumulation_steps
            at = self.update - (self._steps - first) // accum if first > 0 else self.update
            raise NonFiniteLoss(
                f"Loss term(s) {', '.join(bad) or 'loss'} became NaN or infinite at update {at} ({self.tag}); the "
                f'run stopped at update {self.update}, and the checkpoints already written predate it (none is written '
                'from these weights). Lower the lr (optim.lr / optim.base_lr), set optim.clip_grad, or use '
                'train.mixed_precision=bf16 rather than fp16; then resume with --resume auto.')
        elapsed = time.perf_counter() - self._since
        values['lr'] = current_lr(self.optimizer)
        values['images_per_sec'] = self._images / max(elapsed, 1e-9)
        self.accelerator.log({f'{self.tag}/{k}': v for k, v in values.items()}, step=self.update)
        self._reset_sums()
        self.on_log(values, self.update)
        return values

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: Optional[int] = None,
             micro_batch: Optional[int] = None) -> bool:
        """One micro-batch on the device: mixup, forward, backward, and every `accum` micro-batches an update.

        Args:
            epoch, micro_batch: where the micro-batch is in the global stream (shake_vit/core/stream.py); its mixup
                and the student's own random draws are seeded from them. None draws from the global RNGs.

        Returns:
            whether an update happened (then the lr, the EMA and the update count have moved).
        """
        acc, task = self.accelerator, self.task
        if micro_batch is not None:
            x, y = data.mixed(self.mixup, x, y, self.seed, epoch, micro_batch)
            torch.manual_seed(stream.student_seed(self.seed, epoch, micro_batch))  # every device's generator
        elif self.mixup is not None:
            x, y = self.mixup(x, y)
        task.update = self.update  # for terms whose weight follows the schedule (detection's ramps)
        with acc.accumulate(task.trainable_module):
            with acc.autocast():
                out = task(x, y)
            acc.backward(out['loss'])
            if acc.sync_gradients and self.clip_grad:
                acc.clip_grad_norm_(task.trainable_module.parameters(), self.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._accumulate(out, len(x))  # images: a batch tensor [B, C, H, W], or a list of them (detection)
        if not acc.sync_gradients:
            return False
        self.update += 1
        if self.schedule is not None:
            self.schedule.step_update(num_updates=self.update)
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(task.trainable_module), step=self.update)
        return True

    def train_epoch(self, loader: DataLoader, epoch: int, num_updates: int, skip_updates: int = 0) -> Dict[str, float]:
        """Run updates `skip_updates` ... `num_updates - 1` of one epoch (the first ones were done before a resume).

        `loader`: this process's train loader, whose `batch_sampler` is a `stream.MicroBatchSampler`.

        Returns:
            the last log point's values, or {} when `after_update` stopped the epoch early.
        """
        acc, task = self.accelerator, self.task
        task.train()
        sampler: stream.MicroBatchSampler = loader.batch_sampler
        layout = sampler.layout
        if layout.accum != acc.gradient_accumulation_steps:  # the runner resolves both from one config
            raise RuntimeError(f'The loader accumulates {layout.accum} micro-batches per update and the Accelerator '
                               f'{acc.gradient_accumulation_steps}.')
        if skip_updates > num_updates:
            from .checkpoint import CheckpointError
            raise CheckpointError(f'The checkpoint is at update {skip_updates} of epoch {epoch}, which has '
                                  f'{num_updates} updates here: resume with the epoch length it was written with '
                                  '(train.max_updates_per_epoch and the data).')
        first, steps = skip_updates * layout.accum, num_updates * layout.accum  # whole updates: the lr stays exact
        # the global micro-batches this process trains, in order: what the loader loads and the cache reads
        plan = [(epoch, layout.micro_batch_of(step)) for step in range(first, steps)]
        sampler.set_plan(plan)
        cache = getattr(task, 'cache', None)  # a teacher-output cache reads this epoch's micro-batches from here on
        if cache is not None:
            cache.start_epoch(epoch, [m for _, m in plan])
        last: Dict[str, float] = {}
        # The bar is cleared however the epoch ends, an error included, so the error is not printed onto its line;
        # the cache's reading thread is stopped likewise.
        with progress(total=steps, initial=first, desc=f'{self.tag} epoch {epoch}',
                      disable=not acc.is_local_main_process) as bar, contextlib.ExitStack() as stack:
            if cache is not None:
                stack.callback(cache.close)
            for (x, y), (_, m) in zip(loader, plan):
                trace_hook(epoch, m, self.update)
                if cache is not None:
                    cache.next_batch(y)  # checks the micro-batch's labels against the cache's
                updated = self.step(send_to_device(x, acc.device, non_blocking=True),
                                    send_to_device(y, acc.device, non_blocking=True), epoch, m)
                bar.update()
                if not updated:
                    continue
                if self.update % self.log_interval == 0:
                    last = self.flush()
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                if self.after_update():
                    return {}
        return self.flush() or last


def trace_hook(epoch: int, micro_batch: int, update: int) -> None:
    """For tests/test_stream.py: SHAKE_VIT_TRACE=PATH appends 'epoch micro_batch update' of every micro-batch this
    process trains to PATH.RANK (which samples a run saw, across a resume). Unset (always, outside those tests) it
    does nothing."""
    path = os.environ.get('SHAKE_VIT_TRACE')
    if path:
        with open(f"{path}.{os.environ.get('RANK', '0')}", 'a') as f:
            f.write(f'{epoch} {micro_batch} {update}\n')


# Pairs of heads whose top-1 agreement is reported.
AGREEMENT = (('cls', 'shadow'), ('cls', 'teacher'), ('shadow', 'teacher'))


def _metric_name(head: str, metric: str) -> str:
    return f'teacher_{metric}' if head == 'teacher' else f'{metric}_{head}'


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], Dict[str, torch.Tensor]], loader: DataLoader,
             accelerator: Accelerator, desc: str = 'eval') -> Dict[str, float]:
    """Top-1/top-5 and loss of every head `predict` returns, plus the heads' top-1 agreement.

    Each process scores its shard per sample; `gather_for_metrics` collects the per-sample scores and drops the
    padding of the last shard, so the counts are exact with any number of processes.

    Args:
        predict: images [B, C, H, W] -> {head name: logits [B, K]} (heads: cls, shadow, avg, teacher, ...).
        loader: a prepared, sequential eval loader yielding (images, class indices).
    """
    names, total, count = None, None, 0
    start = time.perf_counter()
    with progress(loader, desc=desc, disable=not accelerator.is_local_main_process) as batches:
        for x, y in batches:
            with accelerator.autocast():
                logits = {k: v.float() for k, v in predict(x).items()}
            columns, batch_names = [], []
            for head, z in logits.items():
                hits = z.topk(min(5, z.shape[-1]), dim=-1).indices.eq(rearrange(y, 'b -> b 1'))  # [B, 5]
                columns += [hits[:, 0], hits.any(dim=-1), F.cross_entropy(z, y, reduction='none')]
                batch_names += [_metric_name(head, m) for m in ('top1', 'top5', 'loss')]
            top1 = {head: z.argmax(dim=-1) for head, z in logits.items()}
            for a, b in AGREEMENT:
                if a in top1 and b in top1:
                    columns.append(top1[a].eq(top1[b]))
                    batch_names.append(f'agree_{a}_{b}')
            per_sample = accelerator.gather_for_metrics(rearrange([c.float() for c in columns], 'm b -> b m'))
            total = per_sample.sum(dim=0) if total is None else total + per_sample.sum(dim=0)
            count += per_sample.shape[0]
            names = batch_names
    means = (total / max(count, 1)).tolist()
    result = {n: (v if 'loss' in n else 100 * v) for n, v in zip(names, means)}  # accuracies in percent
    result['num_samples'] = count
    result['images_per_sec'] = count / max(time.perf_counter() - start, 1e-9)
    return result
