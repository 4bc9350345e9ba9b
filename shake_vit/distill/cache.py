"""Pay for the teacher once: its outputs on the run's exact input stream, written once, read by every run of a sweep.

`train.py --config X --cache-teacher DIR` replays what the training run of X would feed its teachers, epoch by epoch:
the sampler's order, every sample's augmentation (seeded per sample, shake_vit/core/data.py), repeated augmentation,
each
batch's mixup/cutmix (seeded per batch, data.batch_seed), the process count and the batch size. It runs the
teachers alone, as the live run does (same normalisation, precision and autocast), and writes their logits to DIR:

    DIR/manifest.json          identity (what the stream and the teachers depend on), format, per-epoch batch counts
    DIR/e0003_r01/             epoch 3 of process 1, written whole into a temporary folder and then renamed:
        meta.json              the batch lengths
        labels.npy             [N] each sample's class index before mixup (every read checks them)
        t0.values.npy ...      teacher 0's outputs in the manifest's format (below)

A run with `teacher.cache=DIR` builds no teacher: each batch's logits are read (a background thread prefetches
them) and handed to the loss where the teacher's would be. It refuses a cache whose identity differs from its own,
naming the keys; the student, the method and its loss settings (lambda, T, ...) may differ freely.

Formats (`teacher_cache.store`):
- full: every logit, at the teacher's own output precision (exact; fp16 when asked: half the disk, not exact).
- topk: the k largest logits, their class indices, and for all other classes (the tail) its exact softmax mass at
  the temperatures T = 1, 2, 4, 8, as f(T) = log mean_j exp(z_j / T) over the tail. A run at temperature T rebuilds
  the tail as one shared logit T * f(T) (f interpolated linearly in 1/T between those points, and f = 0 at
  1/T = 0): at T = 1, 2, 4 and 8 the softmax of the rebuilt logits gives the k classes their exact probabilities and
  the tail its exact total mass, spread evenly over its classes. What is lost is the shape of the tail; the error
  this leaves in the loss terms is pinned by tests/test_teacher_cache.py and measured in docs/benchmarks.md.
- argmax: the teacher's class alone, which is all `deit_hard` and `deit_hard_cls` read.
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

from ..core.config import derive
from . import methods
from .cache_format import CacheError, Format, _output_precision, decode

MANIFEST = 'manifest.json'
VERSION = 1
# the teacher settings that change its outputs; the fast-path switches without numeric effect are left out
TEACHER_KEYS = ('name', 'pretrained', 'checkpoint', 'mean', 'std', 'kwargs', 'fit', 'channels_last', 'cifar_stem',
                'class_map', 'class_names')
AUG_TRAIN_ONLY = ('smoothing', 'crop_pct')  # aug settings that do not change a training input (targets, evaluation)


def in_use(cfg: DictConfig) -> bool:
    """Whether this run reads its teachers' outputs from `teacher.cache`."""
    return bool(cfg.teacher.cache) and methods.of(cfg).needs_teacher


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers, names and bytes in order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identity(cfg: DictConfig, mean: Sequence[float], std: Sequence[float], num_processes: int) -> Dict[str, Any]:
    """What the input stream and the teachers' outputs depend on, flattened to 'section.key' entries.

    Left out: the student, the loss, the optimiser and schedule, the epoch count (a shorter run reads a prefix),
    the loader's workers. The teachers' weights are compared by hash in the manifest's own entry."""
    teachers = [cfg.teacher, *cfg.extra_teachers] if methods.of(cfg).needs_teacher else []
    keep = {
        'data': {k: v for k, v in cfg.data.items() if k not in ('num_workers', 'pin_memory', 'download')},
        'aug': {k: v for k, v in cfg.aug.items() if k not in AUG_TRAIN_ONLY}, 'seed': cfg.train.seed,
        'batch_size': cfg.train.batch_size, 'num_processes': num_processes, 'input_mean': list(mean),
        'input_std': list(std), 'versions': _versions(),
        'teachers': [{**{k: t[k] for k in TEACHER_KEYS if not (k == 'fit' and (t.checkpoint or t.pretrained))},
                      'output_precision': _output_precision(cfg, t), 'file_sha256': _file_hash(t.checkpoint)}
                     for t in teachers],
    }
    return _flat(OmegaConf.to_container(OmegaConf.create(keep), resolve=True))


def _versions() -> Dict[str, str]:
    """The libraries whose augmentation and numerics the stream depends on."""
    import PIL
    import timm
    import torchvision
    return {'torch': str(torch.__version__), 'torchvision': str(torchvision.__version__), 'timm': str(timm.__version__),
            'pillow': str(PIL.__version__)}


_HASHES: Dict[Tuple[str, int, int], str] = {}


def _file_hash(path: Optional[str]) -> Optional[str]:
    """sha256 of a teacher file (the same path may hold other weights later), memoised by size and time."""
    if not path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        with open(path, 'rb') as f:
            _HASHES[key] = hashlib.file_digest(f, 'sha256').hexdigest()
    return _HASHES[key]


def _flat(node: Any, prefix: str = '') -> Dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f'{prefix}{key}.').items()}
    if isinstance(node, list) and node and isinstance(node[0], dict):
        return {k: v for i, value in enumerate(node) for k, v in _flat(value, f'{prefix}{i}.').items()}
    return {prefix[:-1]: node}


def shard_name(epoch: int, rank: int) -> str:
    return f'e{epoch:04d}_r{rank:02d}'


class ShardWriter:
    """One (epoch, process) shard: arrays preallocated for `num_batches` full batches in a temporary folder, renamed
    into place by `finish` (a shard is whole or absent; a half-written one is removed and written again)."""

    def __init__(self, root: Path, epoch: int, rank: int, num_batches: int, batch_size: int):
        self.final = root / shard_name(epoch, rank)
        self.tmp = root / f'.tmp-{shard_name(epoch, rank)}'
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.capacity, self.offset, self.lengths = num_batches * batch_size, 0, []
        self.arrays: Dict[str, np.ndarray] = {}

    def add(self, labels: np.ndarray, per_teacher: List[Dict[str, np.ndarray]]) -> None:
        items = {'labels': labels.astype(np.int64)}
        for i, arrays in enumerate(per_teacher):
            items.update({f't{i}.{name}': a for name, a in arrays.items()})
        n = len(labels)
        for name, a in items.items():
            if name not in self.arrays:
                self.arrays[name] = np.lib.format.open_memmap(self.tmp / f'{name}.npy', mode='w+', dtype=a.dtype,
                                                              shape=(self.capacity, *a.shape[1:]))
            self.arrays[name][self.offset:self.offset + n] = a
        self.offset += n
        self.lengths.append(n)

    def finish(self) -> None:
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()
        (self.tmp / 'meta.json').write_text(json.dumps({'lengths': self.lengths}))
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
    """The cached teachers' logits of this process's batches, in the order the trainer consumes them.

    `start_epoch(epoch, batch)` positions it (a resumed epoch starts mid-shard); `next_batch(labels)` checks a batch's
    class indices against the cache's and stages its logits, which a thread has already read and decoded;
    `take(device)` hands them to the step once."""

    def __init__(self, root: str, cfg: DictConfig, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 batches_per_epoch: int, log=print):
        self.root = Path(root)
        state = PartialState()
        self.rank, self.num_processes = state.process_index, state.num_processes
        manifest = _manifest(self.root)
        if manifest is None:
            raise CacheError(f"teacher.cache={root}: no {MANIFEST} there. Write the cache first with "
                             f'`python train.py --config ... --cache-teacher {root}` (the same config).')
        if manifest.get('version') != VERSION:
            raise CacheError(f"teacher.cache={root} is format version {manifest.get('version')}; this code reads "
                             f'version {VERSION}: write it again with --cache-teacher.')
        diffs = _differences(manifest['identity'], identity(cfg, mean, std, self.num_processes))
        if diffs:
            raise CacheError(f'teacher.cache={root} was written for another input stream or teacher: '
                             + '; '.join(diffs[:8]) + ('; ...' if len(diffs) > 8 else '')
                             + '. Use the config the cache was written with for these keys (the student, the method '
                             'and its loss settings may differ), or write a cache for this one with --cache-teacher.')
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
        if cfg.train.epochs > manifest['epochs'] or batches_per_epoch > manifest['batches_per_epoch']:
            raise CacheError(f"teacher.cache={root} holds {manifest['epochs']} epochs of "
                             f"{manifest['batches_per_epoch']} batches; this run needs {cfg.train.epochs} of "
                             f'{batches_per_epoch}: write a cache for the longer schedule.')
        self.num_teachers = len(manifest['teacher_weights'])
        # a top-k cache rebuilds the tail for the temperature the loss softens with
        self.temperature = methods.temperature(cfg) if methods.of(cfg).temperature is not None or \
            cfg.loss.temperature is not None else 1.0
        self.metrics = manifest.get('teacher_metrics') or {}
        self.recorded_top1 = (manifest.get('teacher_recorded_top1') or [None])[0]  # what the teacher's file records
        log(f'teachers from the cache {root}: {self.fmt.describe()}; no teacher is built'
            + ''.join(f', {k} {v:.2f}' for k, v in self.metrics.items()))
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._queue: 'queue.Queue' = queue.Queue(maxsize=8)
        self._staged: Optional[Tuple[torch.Tensor, ...]] = None
        self._where = (0, 0)

    def _open(self, epoch: int) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        shard = self.root / shard_name(epoch, self.rank)
        if not (shard / 'meta.json').is_file():
            raise CacheError(f'teacher.cache={self.root}: shard {shard.name} (epoch {epoch}, process {self.rank}) is '
                             'missing: the writer was interrupted; run --cache-teacher again to finish it.')
        lengths = json.loads((shard / 'meta.json').read_text())['lengths']
        arrays = {p.name[:-4]: np.load(p, mmap_mode='r') for p in shard.glob('*.npy')}
        return arrays, np.concatenate([[0], np.cumsum(lengths)])

    def _produce(self, epoch: int, start: int, stop: threading.Event, out: 'queue.Queue') -> None:
        try:
            arrays, offsets = self._open(epoch)
            for b in range(start, len(offsets) - 1):
                lo, hi = offsets[b], offsets[b + 1]
                teachers = tuple(decode({k.split('.', 1)[1]: a[lo:hi] for k, a in arrays.items()
                                         if k.startswith(f't{i}.')}, self.fmt, self.temperature)
                                 for i in range(self.num_teachers))
                if torch.cuda.is_available():  # pinned, so that the copy to the GPU overlaps the step
                    teachers = tuple(t.pin_memory() for t in teachers)
                if not self._put(out, stop, (b, torch.from_numpy(np.array(arrays['labels'][lo:hi])), teachers)):
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

    def start_epoch(self, epoch: int, batch: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=8)
        self._where = (epoch, batch)
        self._thread = threading.Thread(target=self._produce, args=(epoch, batch, self._stop, self._queue),
                                        daemon=True, name='teacher-cache')
        self._thread.start()

    def next_batch(self, labels: torch.Tensor) -> None:
        epoch, batch = self._where
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise CacheError(f'teacher.cache={self.root}: epoch {epoch} of process {self.rank} has no batch {batch}.')
        _, cached_labels, teachers = item
        if not torch.equal(cached_labels, labels.cpu()):
            raise CacheError(f'teacher.cache={self.root}: batch {batch} of epoch {epoch} on process {self.rank} holds '
                             'other samples than the cache recorded: the data changed since the cache was written '
                             '(files added, removed or relabelled). Write the cache again with --cache-teacher.')
        self._staged = teachers
        self._where = (epoch, batch + 1)

    def take(self, device: torch.device):
        """The staged batch's logits on `device` (one teacher's [B, K], or a tuple with several), once; None when no
        batch is staged (evaluation, which has no cached teacher)."""
        if self._staged is None:
            return None
        out, self._staged = tuple(t.to(device, non_blocking=True) for t in self._staged), None
        return out[0] if len(out) == 1 else out


def open_reader(cfg: DictConfig, pipe, log=print) -> Reader:
    """The reader for `teacher.cache`, checked against this run (`pipe`: the run's build.Pipeline)."""
    state = PartialState()
    d = derive(cfg, state.num_processes, len(pipe.train_loader))
    return Reader(cfg.teacher.cache, cfg, pipe.mean, pipe.std, pipe.num_classes,
                  d.updates_per_epoch * cfg.train.grad_accum, log)
