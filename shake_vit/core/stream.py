"""The training input stream, defined once in global terms, for any number of processes and machines.

A micro-batch is what one process computes in one forward: `train.batch_size` (b) samples. One optimizer update
consumes k = B / b micro-batches of the global batch B (`train.global_batch`; null: b x processes x
`train.grad_accum`, the DeiT meaning of those keys), spread over `world` processes x k / world accumulation steps.

Every epoch is a pure function of (seed, epoch):
- the order: a permutation of the training set (repeated augmentation: each image `repeats` times, the first
  `epoch_samples` of those positions, as DeiT's RASampler selects), cut to whole updates; within one update the
  positions are dealt to its k micro-batches by stride, as DeiT's sampler deals them to its GPUs, so that the copies
  of one image land in different micro-batches when k is at least the number of copies;
- micro-batch m: positions m*b ... m*b+b-1 of that order;
- every sample's augmentation seed: a function of (seed, epoch, position);
- mixup/cutmix and the student's own randomness (drop path, dropout, a detector's box sampling): seeded per
  global micro-batch (`mix_seed`, `student_seed`).

Process r at its accumulation step a of update u computes micro-batch u*k + a*world + r (`Layout.micro_batch`).
So any layout with the same b and B trains on the same micro-batches with the same draws, and differs only in the
order its gradients are summed: a run resumes on another process count (shake_vit/core/runner.py) and a teacher
cache written by any count serves any other (shake_vit/distill/cache.py). The trainer (shake_vit/core/engine.py) and
the cache writer both iterate this one definition.

timm's RepeatAugSampler and torch's DistributedSampler do not serve: both shard one process's share out of the
epoch by `num_replicas`, so the stream would depend on the process count.
"""
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Sampler

from .config import ConfigError

# keep the seed streams of one (seed, epoch) apart
ORDER_TAG, AUG_TAG, MIX_TAG, STUDENT_TAG = 0x6F7264, 0x617567, 0x6D6978, 0x737464
RA_ROUND = 256  # DeiT's RASampler keeps len(dataset) // 256 * 256 samples per epoch under repeated augmentation


def seed_of(*parts: int) -> int:
    """A 62-bit seed hashed from non-negative integers (numpy's SeedSequence: no overflow for large run seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 2)


def mix_seed(seed: int, epoch: int, micro_batch: int) -> int:
    """The seed of one global micro-batch's mixup/cutmix draws."""
    return seed_of(seed, epoch, micro_batch, MIX_TAG)


def student_seed(seed: int, epoch: int, micro_batch: int) -> int:
    """The seed of the student's own random draws (drop path, dropout, box sampling) in one global micro-batch."""
    return seed_of(seed, epoch, micro_batch, STUDENT_TAG)


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Layout:
    """How one process walks the stream: micro-batch size b, global batch B, process count and this process's rank."""

    micro_batch: int
    global_batch: int
    world: int = 1
    rank: int = 0

    @property
    def per_update(self) -> int:
        """k: micro-batches per optimizer update."""
        return self.global_batch // self.micro_batch

    @property
    def accum(self) -> int:
        """Accumulation steps of each process per update."""
        return self.per_update // self.world

    def micro_batch_of(self, step: int) -> int:
        """The global micro-batch this process computes at its `step`-th forward of an epoch."""
        update, a = divmod(step, self.accum)
        return update * self.per_update + a * self.world + self.rank


def resolve(cfg: DictConfig, world: int, saved_global_batch: Optional[int] = None) -> DictConfig:
    """The config with `train.global_batch` and `train.grad_accum` (this launch's accumulation) filled in for `world`
    processes; a copy, the argument is left alone.

    `saved_global_batch`: the global batch of the checkpoint a run resumes (elastic resume keeps it and changes the
    accumulation). Raises ConfigError when the processes cannot split the global batch into whole micro-batches.
    """
    t = cfg.train
    b = t.batch_size
    if saved_global_batch is not None:
        if t.global_batch is not None and t.global_batch != saved_global_batch:
            raise ConfigError(f'train.global_batch={t.global_batch}, but the checkpoint this run resumes trained with '
                              f'a global batch of {saved_global_batch} (its lr schedule and data position depend on '
                              'it): drop train.global_batch or set it to that value.')
        global_batch = saved_global_batch
    elif t.global_batch is not None:
        global_batch = t.global_batch
    else:
        global_batch = b * world * t.grad_accum
    if global_batch % b:
        raise ConfigError(f'train.global_batch={global_batch} is not a whole number of micro-batches of '
                          f'train.batch_size={b}: make it a multiple of {b}.')
    k = global_batch // b
    if k % world:
        fits = ', '.join(map(str, divisors(k)))
        how = ('' if saved_global_batch is not None else ', or change train.batch_size (the micro-batch) or '
               'train.global_batch so that the process count divides the micro-batches of an update')
        raise ConfigError(f'{world} processes cannot share the global batch {global_batch} = {k} micro-batches of '
                          f'{b}: the process count must divide {k}. Launch {fits} processes{how}.')
    accum = k // world  # with train.global_batch set, train.grad_accum follows from it: a run's config.yaml records
    # both, and stays usable on another process count
    out = cfg.copy()
    out.train.global_batch, out.train.grad_accum = global_batch, accum
    return out


def for_evaluation(cfg: DictConfig, world: int) -> DictConfig:
    """A config for work that trains nothing (`--eval`): its training layout set to one micro-batch per process, so
    that any process count can evaluate any run."""
    out = cfg.copy()
    out.train.global_batch, out.train.grad_accum = cfg.train.batch_size * world, 1
    return out


def layout_of(cfg: DictConfig, world: int, rank: int) -> Layout:
    """This process's layout of a config (`resolve` first when its global batch is not yet filled in)."""
    if cfg.train.global_batch is None or cfg.train.grad_accum * world * cfg.train.batch_size != cfg.train.global_batch:
        cfg = resolve(cfg, world)
    return Layout(cfg.train.batch_size, cfg.train.global_batch, world, rank)


class Stream:
    """The global order and augmentation seeds of every epoch (see the module docstring).

    Args:
        num_samples: training set size.
        repeats: repeated augmentation's copies of each image per epoch (1: off).
        seed: the run seed.
        micro_batch, global_batch: b and B.
        max_updates: > 0 cuts every epoch to this many updates (a prefix of the full epoch: smoke runs, a cache
            written for full epochs serves them).
    """

    def __init__(self, num_samples: int, repeats: int, seed: int, micro_batch: int, global_batch: int,
                 max_updates: int = 0):
        self.num_samples, self.repeats, self.seed = num_samples, repeats, seed
        self.micro_batch, self.global_batch = micro_batch, global_batch
        if repeats > 1:  # DeiT's RASampler: about one epoch of samples, as `repeats` copies of a third of the images
            self.epoch_samples = num_samples // RA_ROUND * RA_ROUND if num_samples >= RA_ROUND else num_samples
        else:
            self.epoch_samples = num_samples
        self.full_updates = self.epoch_samples // global_batch
        self.max_updates = max_updates
        self._epoch: Optional[int] = None

    @property
    def updates_per_epoch(self) -> int:
        """Whole updates per epoch (a ConfigError when the data holds not even one: raised where a run needs the
        count, so that building the loaders for `--eval` of a small data set does not fail)."""
        if self.full_updates < 1:
            raise ConfigError(f'An epoch holds {self.epoch_samples} samples, fewer than one update of the global '
                              f'batch {self.global_batch} (train.batch_size x processes x train.grad_accum, or '
                              'train.global_batch): lower the batch size or use more data.')
        return min(self.full_updates, self.max_updates) if self.max_updates > 0 else self.full_updates

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.updates_per_epoch * (self.global_batch // self.micro_batch)

    def _draw(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        k, b, length = self.global_batch // self.micro_batch, self.micro_batch, self.full_updates * self.global_batch
        g = torch.Generator().manual_seed(seed_of(self.seed, epoch, ORDER_TAG))
        order = torch.randperm(self.num_samples, generator=g)
        if self.repeats > 1:
            order = torch.repeat_interleave(order, self.repeats)  # the copies of an image side by side
        order = order[:length].numpy()
        # deal each update's positions to its k micro-batches by stride: micro-batch j takes j, j + k, j + 2k, ...
        self._order = order.reshape(self.full_updates, b, k).transpose(0, 2, 1).reshape(-1)
        g = torch.Generator().manual_seed(seed_of(self.seed, epoch, AUG_TAG))
        self._seeds = torch.randint(0, 2 ** 62, (length,), generator=g).numpy()
        self._epoch = epoch

    def keys(self, epoch: int, micro_batch: int) -> List[Tuple[int, int]]:
        """Micro-batch `micro_batch` of `epoch` as (sample index, augmentation seed) pairs."""
        self._draw(epoch)
        lo = micro_batch * self.micro_batch
        return list(zip(self._order[lo:lo + self.micro_batch].tolist(), self._seeds[lo:lo + self.micro_batch].tolist()))


class MicroBatchSampler(Sampler):
    """The micro-batches one process loads, in order: a DataLoader `batch_sampler` yielding each micro-batch's
    (sample index, augmentation seed) pairs.

    `set_epoch(epoch, start)`: the micro-batches this process trains in `epoch` from its step `start` on (a resumed
    epoch starts at a whole update). `set_plan`: any list of (epoch, micro-batch), as the teacher-cache writer loads
    its shards."""

    def __init__(self, stream: Stream, layout: Layout):
        self.stream, self.layout = stream, layout
        self.plan: List[Tuple[int, int]] = []  # set_epoch or set_plan fills it

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.updates_per_epoch * self.layout.accum

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.set_plan((epoch, self.layout.micro_batch_of(step)) for step in range(start, self.steps_per_epoch))

    def set_plan(self, plan) -> None:
        self.plan = list(plan)

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for epoch, m in self.plan:
            yield self.stream.keys(epoch, m)


@dataclass(frozen=True)
class Derived:
    """Values that follow from the config, the process count and (the update counts) the data set size."""

    num_processes: int
    global_batch: int
    micro_batch: int
    lr: float
    updates_per_epoch: Optional[int] = None  # None: the data set size is not known
    total_updates: Optional[int] = None
    warmup_updates: Optional[int] = None

    def describe(self) -> str:
        counts = (f'{self.updates_per_epoch} updates/epoch, {self.total_updates} updates, {self.warmup_updates} warmup '
                  'updates' if self.updates_per_epoch else 'updates per epoch, total and warmup updates need the data')
        k = self.global_batch // self.micro_batch
        return (f'processes {self.num_processes}, global batch {self.global_batch} ({k} micro-batch'
                f"{'es' if k > 1 else ''} of {self.micro_batch}, {k // self.num_processes} per process per update), "
                f'lr {self.lr:.3g}, {counts}')


def derive(cfg: DictConfig, num_processes: int, updates_per_epoch: Optional[int] = None) -> Derived:
    """Global batch, the DeiT learning-rate rule and the update counts.

    Args:
        num_processes: data-parallel processes.
        updates_per_epoch: `Stream.updates_per_epoch`; None when the data is not at hand, which leaves the update
            counts out.
    """
    cfg = resolve(cfg, num_processes) if cfg.train.global_batch is None else cfg
    t, o = cfg.train, cfg.optim
    global_batch = t.global_batch
    lr = o.lr if o.lr is not None else o.base_lr * global_batch / o.lr_base_size
    if updates_per_epoch is None:
        return Derived(num_processes, global_batch, t.batch_size, lr)
    return Derived(num_processes, global_batch, t.batch_size, lr, updates_per_epoch, updates_per_epoch * t.epochs,
                   math.floor(o.warmup_epochs * updates_per_epoch))
