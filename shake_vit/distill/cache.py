"""Pay for the teacher once: its outputs on the run's exact input stream, written once, read by every run of a sweep,
on any number of processes. This module is the shard store: the manifest and its identity, writing shards, and the
reader with its prefetch thread (the values' encoding: shake_vit/distill/cache_format.py; the writer, which drives
the training stream: shake_vit/classification/cache_writer.py).

`train.py --config X --cache-teacher DIR` runs the teachers, as the live run does (same normalisation, precision and
autocast), on every micro-batch of the global input stream of X (shake_vit/core/stream.py: the order, every sample's
augmentation, repeated augmentation and each micro-batch's mixup/cutmix are functions of the seed, the epoch and the
micro-batch alone), and writes their logits to DIR keyed by global micro-batch:

    DIR/manifest.json          identity (what the stream and the teachers depend on), teachers, format, sizes
    DIR/e0003_b0002/           epoch 3, block 2: micro-batches 2*S ... 3*S-1 (S: the manifest's `block`), written
                               whole into a temporary folder and then renamed
        meta.json              the first micro-batch and how many
        labels.npy             [n * b] each sample's class index before mixup (every read checks them)
        t0.values.npy ...      teacher 0's outputs in the manifest's format

Neither the writer's nor the reader's process count is part of it: blocks are shared out over the writer's
processes, so a cache half written by N processes is finished by M, and each reader process reads the micro-batches
it computes. What the stream depends on is: the micro-batch b and the global batch B are in the identity.

A run with `teacher.cache=DIR` builds no teacher: each micro-batch's logits are read (a background thread prefetches
them) and handed to the loss where the teacher's would be. It refuses a cache whose identity differs from its own,
naming the keys; the student, the method and its loss settings (lambda, T, ...) may differ freely. A teacher is
identified by its weights' content (sha256 of its state dict), whichever way the run names it; a timm hub teacher by
its name, and a teacher to be fitted, whose weights a reader does not have, by its fit settings.
"""
import hashlib
import json
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf

from ..core.schema import data_record
from ..core.stream import Stream
from . import methods
from .cache_format import CacheError, Format, _output_precision, decode

MANIFEST = 'manifest.json'
VERSION = 2  # 1: shards per (epoch, process), readable by the writer's process count alone
# the teacher settings that change its outputs beside its weights; the fast-path switches without numeric effect and
# where the weights come from (pretrained, checkpoint, fit: the `teachers` entry of the manifest) are left out
TEACHER_KEYS = ('name', 'mean', 'std', 'kwargs', 'cifar_stem', 'class_map', 'class_names')
AUG_TRAIN_ONLY = ('smoothing', 'crop_pct')  # aug settings that do not change a training input (targets, evaluation)
BLOCK_SAMPLES = 2 ** 16  # samples per shard (about 128 MB of bf16 ImageNet logits per teacher)


def in_use(cfg: DictConfig) -> bool:
    """Whether this run reads its teachers' outputs from `teacher.cache`."""
    return bool(cfg.teacher.cache) and methods.of(cfg).needs_teacher


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers, names and bytes in order (a torch.compile'd model: its original's,
    whose state dict keys carry no `_orig_mod.` prefix)."""
    model = getattr(model, '_orig_mod', model)
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identity(cfg: DictConfig, mean: Sequence[float], std: Sequence[float]) -> Dict[str, Any]:
    """What the input stream and the teachers' outputs depend on, flattened to 'section.key' entries.

    Left out: the student, the loss, the optimiser and schedule, the epoch count (a shorter run reads a prefix),
    the loader's workers, the process count. The teachers' weights are compared in the manifest's `teachers`."""
    teachers = [cfg.teacher, *cfg.extra_teachers] if methods.of(cfg).needs_teacher else []
    keep = {
        'data': data_record(cfg.data, ('num_workers', 'pin_memory', 'download')),
        'aug': {k: v for k, v in cfg.aug.items() if k not in AUG_TRAIN_ONLY}, 'seed': cfg.train.seed,
        'micro_batch': cfg.train.batch_size, 'global_batch': cfg.train.global_batch, 'input_mean': list(mean),
        'input_std': list(std), 'versions': _versions(cfg),
        'teachers': [{**{k: t[k] for k in TEACHER_KEYS}, 'output_precision': _output_precision(cfg, t)}
                     for t in teachers],
    }
    return _flat(OmegaConf.to_container(OmegaConf.create(keep), resolve=True))


def _teacher_differences(cached: List[Dict[str, Any]], claims: List[Dict[str, Any]]) -> List[str]:
    """Why the cache's teachers are not this run's: each claim (`sha256` of weights at hand, `hub` name, or `fit`
    settings, shake_vit/classification/teacher.py) must match what the writer recorded for that teacher."""
    if len(cached) != len(claims):
        return [f'teachers: cache {len(cached)}, this run {len(claims)}']
    out = []
    for i, (have, want) in enumerate(zip(cached, claims)):
        (kind, value), = want.items()
        if have.get(kind) != value:
            recorded = ', '.join(k for k in ('sha256', 'hub', 'fit') if have.get(k)) or 'nothing'
            what = {'sha256': "the weights' sha256", 'hub': 'the timm hub name', 'fit': 'the fit settings'}[kind]
            out.append(f'teacher {i}: {what} differ' + ('' if have.get(kind) else
                                                       f' (the cache records its {recorded} alone)'))
    return out


def _versions(cfg: DictConfig) -> Dict[str, str]:
    """The libraries whose augmentation and numerics the stream depends on; with data.loader=dali, DALI's version and
    where it decodes (its GPU decoder's pixels are not its CPU decoder's)."""
    import PIL
    import timm
    import torchvision
    versions = {'torch': str(torch.__version__), 'torchvision': str(torchvision.__version__),
                'timm': str(timm.__version__), 'pillow': str(PIL.__version__)}
    if cfg.data.loader == 'dali':
        import nvidia.dali
        versions['dali'] = f"{nvidia.dali.__version__} on the {'GPU' if torch.cuda.is_available() else 'CPU'}"
    return versions


def _flat(node: Any, prefix: str = '') -> Dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f'{prefix}{key}.').items()}
    if isinstance(node, list) and node and isinstance(node[0], dict):
        return {k: v for i, value in enumerate(node) for k, v in _flat(value, f'{prefix}{i}.').items()}
    return {prefix[:-1]: node}


def shard_name(epoch: int, block: int) -> str:
    return f'e{epoch:04d}_b{block:04d}'


def block_size(micro_batch: int, micro_batches_per_epoch: int) -> int:
    """Micro-batches per shard: about BLOCK_SAMPLES samples, at most an epoch."""
    return max(1, min(BLOCK_SAMPLES // micro_batch, micro_batches_per_epoch))


def blocks(manifest: Dict[str, Any]) -> List[Tuple[int, int, range]]:
    """(epoch, block, its micro-batches) of every shard of a cache, epoch by epoch."""
    n, s = manifest['micro_batches_per_epoch'], manifest['block']
    return [(e, j, range(j * s, min(n, (j + 1) * s))) for e in range(manifest['epochs']) for j in range(-(-n // s))]


class ShardWriter:
    """One (epoch, block) shard: arrays preallocated for its micro-batches in a temporary folder, renamed into place
    by `finish` (a shard is whole or absent; a half-written one is removed and written again)."""

    def __init__(self, root: Path, epoch: int, block: int, micro_batches: range, micro_batch: int):
        self.final = root / shard_name(epoch, block)
        self.tmp = root / f'.tmp-{shard_name(epoch, block)}'
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.micro_batches, self.micro_batch = micro_batches, micro_batch
        self.capacity, self.offset = len(micro_batches) * micro_batch, 0
        self.arrays: Dict[str, np.ndarray] = {}

    def add(self, labels: np.ndarray, per_teacher: List[Dict[str, np.ndarray]]) -> None:
        """The next micro-batch's labels and each teacher's encoded outputs."""
        items = {'labels': labels.astype(np.int64)}
        for i, arrays in enumerate(per_teacher):
            items.update({f't{i}.{name}': a for name, a in arrays.items()})
        n = len(labels)
        if n != self.micro_batch:
            raise CacheError(f'a micro-batch of {n} samples; the stream has {self.micro_batch}')
        for name, a in items.items():
            if name not in self.arrays:
                self.arrays[name] = np.lib.format.open_memmap(self.tmp / f'{name}.npy', mode='w+', dtype=a.dtype,
                                                              shape=(self.capacity, *a.shape[1:]))
            self.arrays[name][self.offset:self.offset + n] = a
        self.offset += n

    def finish(self) -> None:
        if self.offset != self.capacity:
            raise CacheError(f'{self.final.name}: {self.offset} of {self.capacity} samples written')
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()
        (self.tmp / 'meta.json').write_text(json.dumps({'first': self.micro_batches.start,
                                                        'count': len(self.micro_batches)}))
        os.replace(self.tmp, self.final)


def _manifest(root: Path) -> Optional[Dict[str, Any]]:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f'{path} is not a readable cache manifest ({err}); write the cache again with '
                         '--cache-teacher into an empty folder.') from None


def _differences(cached: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    keys = sorted(set(cached) | set(current))
    return [f'{k}: cache {cached.get(k, "(absent)")!r}, this run {current.get(k, "(absent)")!r}' for k in keys
            if cached.get(k, '(absent)') != current.get(k, '(absent)')]


class Reader:
    """The cached teachers' logits of this process's micro-batches, in the order the trainer consumes them.

    `start_epoch(epoch, micro_batches)` gives the global micro-batches this process computes next, in order (a
    resumed epoch starts mid-epoch); `next_batch(labels)` checks a micro-batch's class indices against the cache's and
    stages its logits, which a thread has already read and decoded; `take(device)` hands them to the step once.

    Args:
        claims: how this run identifies each teacher (`_teacher_differences`).
        stream: the run's input stream (its micro-batch, global batch and epoch length).
    """

    def __init__(self, root: str, cfg: DictConfig, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 stream: Stream, claims: List[Dict[str, Any]], log=print):
        self.root = Path(root)
        manifest = _manifest(self.root)
        if manifest is None:
            raise CacheError(f"teacher.cache={root}: no {MANIFEST} there. Write the cache first with "
                             f'`python train.py --config ... --cache-teacher {root}` (the same config).')
        if manifest.get('version') != VERSION:
            raise CacheError(f"teacher.cache={root} is format version {manifest.get('version')}; this code reads "
                             f'version {VERSION}: write it again with --cache-teacher.')
        diffs = _differences(manifest['identity'], identity(cfg, mean, std))
        diffs += _teacher_differences(manifest['teachers'], claims)
        if diffs:
            raise CacheError(f'teacher.cache={root} was written for another input stream or teacher: '
                             + '; '.join(diffs[:8]) + ('; ...' if len(diffs) > 8 else '')
                             + '. Use the config the cache was written with for these keys (the student, the method '
                             'and its loss settings may differ; the global batch is train.batch_size x processes x '
                             'train.grad_accum, or train.global_batch), or write a cache for this one with '
                             '--cache-teacher.')
        self.fmt = Format(**manifest['format'])
        if self.fmt.num_classes != num_classes:
            raise CacheError(f'teacher.cache={root} holds {self.fmt.num_classes} classes and the data has '
                             f'{num_classes}.')
        if self.fmt.store == 'argmax' and not methods.of(cfg).argmax_only:
            raise CacheError(f"teacher.cache={root} holds the teacher's argmax alone, which serves deit_hard and "
                             f'deit_hard_cls; loss.method={cfg.loss.method} needs its logits: write a cache with '
                             'teacher_cache.store=full or topk.')
        if self.fmt.store == 'topk' and (cfg.loss.standardize or cfg.loss.teacher_loss == 'mse'):
            raise CacheError(f'teacher.cache={root} holds top-{self.fmt.k} logits with a shared tail, which keeps the '
                             'softmax of the top classes; loss.standardize / loss.teacher_loss=mse (the authors\' '
                             'form) read the raw logits of every class: write a cache with teacher_cache.store=full.')
        per_epoch = manifest['micro_batches_per_epoch']
        if cfg.train.epochs > manifest['epochs'] or stream.micro_batches_per_epoch > per_epoch:
            raise CacheError(f"teacher.cache={root} holds {manifest['epochs']} epochs of "
                             f"{manifest['micro_batches_per_epoch']} micro-batches; this run needs {cfg.train.epochs} "
                             f'of {stream.micro_batches_per_epoch}: write a cache for the longer schedule.')
        self.block, self.micro_batch = manifest['block'], stream.micro_batch
        self.num_teachers = len(manifest['teachers'])
        # a top-k cache rebuilds the tail for the temperature the loss softens with
        self.temperature = methods.temperature(cfg) if methods.of(cfg).temperature is not None or \
            cfg.loss.temperature is not None else 1.0
        self.metrics = manifest.get('teacher_metrics') or {}
        self.recorded_top1 = (manifest.get('teacher_recorded_top1') or [None])[0]  # what the teacher's file records
        log(f'teachers from the cache {root}: {self.fmt.describe()}; no teacher is built'
            + ''.join(f', {k} {v:.2f}' for k, v in self.metrics.items()))
        self.rank = PartialState().process_index
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._queue: 'queue.Queue' = queue.Queue(maxsize=8)
        self._staged: Optional[Tuple[torch.Tensor, ...]] = None
        self._where = (0, 0)

    def _open(self, epoch: int, block: int) -> Dict[str, np.ndarray]:
        shard = self.root / shard_name(epoch, block)
        if not (shard / 'meta.json').is_file():
            raise CacheError(f'teacher.cache={self.root}: shard {shard.name} (epoch {epoch}, micro-batches from '
                             f'{block * self.block}) is missing: the writer was interrupted; run --cache-teacher again '
                             '(with any number of processes) to finish it.')
        return {p.name[:-4]: np.load(p, mmap_mode='r') for p in shard.glob('*.npy')}

    def _produce(self, epoch: int, micro_batches: List[int], stop: threading.Event, out: 'queue.Queue') -> None:
        try:
            opened: Dict[int, Dict[str, np.ndarray]] = {}
            for m in micro_batches:
                block = m // self.block
                if block not in opened:
                    opened = {block: self._open(epoch, block)}  # one shard open at a time
                arrays = opened[block]
                lo = (m - block * self.block) * self.micro_batch
                hi = lo + self.micro_batch
                teachers = tuple(decode({k.split('.', 1)[1]: a[lo:hi] for k, a in arrays.items()
                                         if k.startswith(f't{i}.')}, self.fmt, self.temperature)
                                 for i in range(self.num_teachers))
                if torch.cuda.is_available():  # pinned, so that the copy to the GPU overlaps the step
                    teachers = tuple(t.pin_memory() for t in teachers)
                if not self._put(out, stop, (m, torch.from_numpy(np.array(arrays['labels'][lo:hi])), teachers)):
                    return
            self._put(out, stop, None)
        except BaseException as err:  # handed to the training thread, which raises it
            self._put(out, stop, err)

    @staticmethod
    def _put(out: 'queue.Queue', stop: threading.Event, item) -> bool:
        """Queue `item` unless the reader is being closed; False when it is (never blocks a close)."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """Stop the reading thread (at the next epoch, at the end of training, on an error)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def start_epoch(self, epoch: int, micro_batches: List[int]) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=8)
        self._where = (epoch, 0)
        self._thread = threading.Thread(target=self._produce, args=(epoch, list(micro_batches), self._stop,
                                                                    self._queue), daemon=True, name='teacher-cache')
        self._thread.start()

    def next_batch(self, labels: torch.Tensor) -> None:
        epoch, _ = self._where
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise CacheError(f'teacher.cache={self.root}: the trainer asked for more micro-batches of epoch {epoch} '
                             'than it announced.')
        m, cached_labels, teachers = item
        if not torch.equal(cached_labels, labels.cpu()):
            raise CacheError(f'teacher.cache={self.root}: micro-batch {m} of epoch {epoch} (process {self.rank}) '
                             'holds other samples than the cache recorded: the data changed since the cache was '
                             'written (files added, removed or relabelled). Write the cache again with '
                             '--cache-teacher.')
        self._staged = teachers
        self._where = (epoch, m)

    def take(self, device: torch.device):
        """The staged batch's logits on `device` (one teacher's [B, K], or a tuple with several), once; None when no
        batch is staged (evaluation, which has no cached teacher)."""
        if self._staged is None:
            return None
        out, self._staged = tuple(t.to(device, non_blocking=True) for t in self._staged), None
        return out[0] if len(out) == 1 else out


def open_reader(cfg: DictConfig, pipe, claims: List[Dict[str, Any]], log=print) -> Reader:
    """The reader for `teacher.cache`, checked against this run (`pipe`: the run's build.Pipeline; `claims`: how it
    identifies its teachers)."""
    return Reader(cfg.teacher.cache, cfg, pipe.mean, pipe.std, pipe.num_classes, pipe.train_loader.batch_sampler.stream,
                  claims, log)
