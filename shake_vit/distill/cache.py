"""Pay for the teacher once: its outputs on the run's exact input stream, written once, read by every run of a sweep.

`train.py --config X --cache-teacher DIR` replays what the training run of X would feed its teachers, epoch by epoch:
the sampler's order, every sample's augmentation (seeded per sample, shake_vit/data.py), repeated augmentation, each
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
import math
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import send_to_device
from omegaconf import DictConfig, OmegaConf

from ..core import data
from . import methods
from ..core.config import ConfigError, derive

MANIFEST = 'manifest.json'
VERSION = 1
# the teacher settings that change its outputs; the fast-path switches without numeric effect are left out
TEACHER_KEYS = ('name', 'pretrained', 'checkpoint', 'mean', 'std', 'kwargs', 'fit', 'channels_last', 'cifar_stem',
                'class_map', 'class_names')
AUG_TRAIN_ONLY = ('smoothing', 'crop_pct')  # aug settings that do not change a training input (targets, evaluation)


class CacheError(ConfigError):
    """A cache that cannot serve this run; the message names what differs and what to do."""


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


def _output_precision(cfg: DictConfig, t: Optional[DictConfig] = None) -> str:
    """The precision a live teacher's logits come out in: its own (`teacher.precision`), else the autocast's."""
    t = cfg.teacher if t is None else t
    if t.precision != 'auto':
        return t.precision
    return {'no': 'fp32'}.get(cfg.train.mixed_precision, cfg.train.mixed_precision)


@dataclass
class Format:
    store: str  # full | topk | argmax
    k: int  # logits kept per sample (topk), else 0
    precision: str  # how values are stored: fp32 | bf16 | fp16
    num_classes: int
    exact: bool = True  # the values are the teacher's own (checked on writing); False: rounded to fp16 on request

    def bytes_per_sample(self, teachers: int) -> int:
        width = 4 if self.precision == 'fp32' else 2
        index = 2 if self.num_classes <= 2 ** 15 else 4
        one = {'full': self.num_classes * width, 'topk': self.k * (width + index) + 4 * len(TAIL_TEMPERATURES),
               'argmax': index}[self.store]
        return 8 + teachers * one  # + the label

    def describe(self) -> str:
        kind = {'full': 'full logits', 'topk': f'top-{self.k} logits and a shared tail', 'argmax': 'the argmax'}
        return f'{kind[self.store]} ({self.precision}, {self.num_classes} classes)'


def choose_format(cfg: DictConfig, num_classes: int, samples: int, teachers: int) -> Format:
    """The format of `teacher_cache` for a schedule of `samples` samples (all epochs, all processes)."""
    c = cfg.teacher_cache
    precision = _output_precision(cfg) if c.precision == 'auto' else c.precision
    exact = c.precision != 'fp16' or _output_precision(cfg) == 'fp16'
    full = Format('full', 0, precision, num_classes, exact)
    store = c.store
    if store == 'auto':
        fits = samples * full.bytes_per_sample(teachers) <= c.max_gb * 2 ** 30
        store = 'full' if fits or c.topk >= num_classes else 'topk'
    if store == 'topk' and c.topk >= num_classes:
        store = 'full'  # k >= K keeps every logit
    return Format(store, c.topk if store == 'topk' else 0, precision, num_classes, exact)


TAIL_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)  # where a top-k cache keeps the tail's exact softmax mass
_NUMPY = {'fp32': np.float32, 'fp16': np.float16, 'bf16': np.uint16}  # bf16 kept as its raw 16 bits


def _to_numpy(values: torch.Tensor, precision: str, exact: bool = True) -> np.ndarray:
    """Values [B, n] float32 -> the stored dtype. Stored in 16 bits because the teacher computes in them (`exact`),
    they must round-trip exactly; fp16 asked for (`exact` False) rounds."""
    low = values.to({'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision, torch.float32))
    if exact and precision != 'fp32' and not torch.equal(low.float(), values):
        raise CacheError(f'The teacher produced logits that are not {precision} values although it runs in '
                         f'{precision}: store them in full precision (teacher_cache.precision=fp32).')
    if precision == 'bf16':
        return low.view(torch.int16).numpy().view(np.uint16)
    return low.numpy().astype(_NUMPY[precision])


def _from_numpy(array: np.ndarray, precision: str) -> torch.Tensor:
    if precision == 'bf16':
        return torch.from_numpy(np.array(array).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the shard is a read-only memory map


def encode(logits: torch.Tensor, fmt: Format) -> Dict[str, np.ndarray]:
    """One teacher's logits [B, K] (float32, CPU) as the arrays `fmt` stores."""
    index = np.int16 if fmt.num_classes <= 2 ** 15 else np.int32
    if fmt.store == 'full':
        return {'values': _to_numpy(logits, fmt.precision, fmt.exact)}
    if fmt.store == 'argmax':
        return {'indices': logits.argmax(dim=1).numpy().astype(index)}
    top, idx = logits.topk(fmt.k, dim=1)
    rest = logits.scatter(1, idx, float('-inf'))  # [B, K] with the top k masked out
    tail = torch.stack([torch.logsumexp(rest / T, dim=1) for T in TAIL_TEMPERATURES], dim=1) \
        - math.log(fmt.num_classes - fmt.k)  # [B, len(TAIL_TEMPERATURES)]: f(T), the tail's log-mean-exp at T
    return {'values': _to_numpy(top, fmt.precision, fmt.exact), 'indices': idx.numpy().astype(index),
            'tail': tail.numpy().astype(np.float32)}


def tail_logit(tail: torch.Tensor, temperature: float) -> torch.Tensor:
    """The shared tail logit [B] for a run at `temperature`: T * f(T), f linear in 1/T between the stored points."""
    betas = [0.0, *sorted(1 / T for T in TAIL_TEMPERATURES)]  # 1/T ascending, with f = 0 at 1/T = 0
    values = torch.cat([torch.zeros(len(tail), 1), tail.flip(1)], dim=1)  # f at those points
    beta = 1 / temperature
    i = min(max(int(np.searchsorted(betas, beta)) - 1, 0), len(betas) - 2)  # the segment, extrapolating past 1/T=1
    w = (beta - betas[i]) / (betas[i + 1] - betas[i])
    return temperature * ((1 - w) * values[:, i] + w * values[:, i + 1])


def decode(arrays: Dict[str, np.ndarray], fmt: Format, temperature: float = 1.0) -> torch.Tensor:
    """The logits [B, K] float32 the stored arrays stand for: exact for `full` at the teacher's precision; for
    `topk`, the tail rebuilt for a run at `temperature` (see the module's docstring)."""
    if fmt.store == 'full':
        return _from_numpy(arrays['values'], fmt.precision)
    idx = torch.from_numpy(np.array(arrays['indices'], dtype=np.int64))
    if fmt.store == 'argmax':  # a one-hot row: its argmax is the teacher's class, all deit_hard reads
        return torch.zeros(len(idx), fmt.num_classes).scatter_(1, idx[:, None], 1.0)
    tail = tail_logit(torch.from_numpy(np.array(arrays['tail'], dtype=np.float32)), temperature)
    full = tail[:, None].expand(len(tail), fmt.num_classes).clone()
    return full.scatter_(1, idx, _from_numpy(arrays['values'], fmt.precision))


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


def write(cfg: DictConfig, root: str) -> Dict[str, Any]:
    """`train.py --cache-teacher DIR`: the teachers' outputs for every epoch of the run `cfg` describes. Resumable:
    finished shards are kept, a half-written one is written again. Returns the manifest."""
    from accelerate.utils import set_seed

    from ..core.build import log, make_accelerator
    from ..core.engine import evaluate, progress
    from ..core.family import family_of
    from .health import Health
    from ..classification.tasks import DistillationTask
    from ..classification.teacher import teacher_options

    if cfg.task != 'classification':
        raise ConfigError(f"--cache-teacher serves classification; task {cfg.task}'s teacher scores the student's "
                          'own proposals, which no cache can hold.')
    if not methods.of(cfg).needs_teacher:
        raise ConfigError(f"loss.method={cfg.loss.method} uses no teacher, so there is nothing to cache: give the "
                          'config of a distillation run (loss.method=shake, deit_hard, kd, ...).')
    if cfg.teacher.cache:
        raise ConfigError(f'--cache-teacher writes a cache, and teacher.cache={cfg.teacher.cache} reads one: drop '
                          'teacher.cache.')
    out = Path(root)
    acc = make_accelerator(cfg, trackers=False)
    if acc.is_main_process:  # a teacher fitted first is saved in the run's folder, as a training run would
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    set_seed(cfg.train.seed, device_specific=True)
    family = family_of(cfg)
    splits = family.build_splits(cfg)
    pipe = family.build_pipeline(cfg, acc, splits, family.build_student(cfg, len(splits.classes)))
    teachers = family.get_teachers(cfg, acc, pipe)
    task = DistillationTask(torch.nn.Identity(), teachers, None, None, pipe.mean, pipe.std,
                            **teacher_options(cfg)).to(acc.device)
    task.eval()
    # the teacher checks of a training run, before hours of writing: a broken teacher stops here (HealthError)
    Health(cfg, acc, splits.classes, 1, lambda m: log(acc, m)).check_teachers(task, teachers, pipe.val_loader)
    d = derive(cfg, acc.num_processes, len(pipe.train_loader))
    num_batches = d.updates_per_epoch * cfg.train.grad_accum
    samples = cfg.train.epochs * num_batches * cfg.train.batch_size * acc.num_processes
    fmt = choose_format(cfg, pipe.num_classes, samples, len(teachers))
    manifest = {'version': VERSION, 'identity': identity(cfg, pipe.mean, pipe.std, acc.num_processes),
                'teacher_weights': [weights_hash(t.model) for t in teachers], 'classes': list(splits.classes),
                'format': fmt.__dict__, 'epochs': cfg.train.epochs, 'batches_per_epoch': num_batches,
                'teacher_recorded_top1': [getattr(t, 'recorded_top1', None) for t in teachers]}
    existing = _manifest(out)
    if existing is not None:
        same = {k: existing.get(k) for k in manifest if k != 'teacher_metrics'}
        diffs = _differences(_flat(same), _flat({k: manifest[k] for k in same}))
        if diffs:
            raise CacheError(f'{out} holds a cache of another run ({"; ".join(diffs[:8])}): write this one into '
                             'another folder, or delete that one.')
        manifest['teacher_metrics'] = existing.get('teacher_metrics')
    else:
        metrics = {}

        def heads(x):  # the teachers as the live run's evaluation sees them: through the task
            t, _ = task.teacher_outputs(x)
            return {('teacher' if i == 0 else f'teacher_{i}'): v
                    for i, v in enumerate(t if isinstance(t, tuple) else (t,))}
        m = evaluate(heads, pipe.val_loader, acc, desc='teacher eval')  # the teachers' own val metrics
        metrics.update({k: v for k, v in m.items() if 'teacher' in k})
        manifest['teacher_metrics'] = metrics
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    acc.wait_for_everyone()
    log(acc, f'teacher cache {out}: {fmt.describe()}, {cfg.train.epochs} epochs x {num_batches} batches x '
             f'{acc.num_processes} processes, about {samples * fmt.bytes_per_sample(len(teachers)) / 2 ** 30:.3f} GiB')
    mixup = family.mixup(cfg, pipe)
    rank, loader = acc.process_index, pipe.train_loader
    written, begin = 0, time.perf_counter()
    for epoch in range(cfg.train.epochs):
        if (out / shard_name(epoch, rank)).is_dir():
            continue  # written by an earlier, interrupted invocation
        writer = ShardWriter(out, epoch, rank, num_batches, cfg.train.batch_size)
        loader.sampler.set_epoch(epoch)
        with progress(total=num_batches, desc=f'cache epoch {epoch}', disable=not acc.is_local_main_process) as bar:
            for index, (x, y) in enumerate(islice(loader, num_batches)):
                x = send_to_device(x, acc.device, non_blocking=True)
                if mixup is not None:  # as Trainer.step mixes, with the same per-batch seed
                    with data.seeded_mixup(data.batch_seed(cfg.train.seed, epoch, rank, index)):
                        x, _ = mixup(x, send_to_device(y, acc.device))
                with acc.autocast():
                    logits, _ = task.teacher_outputs(x)
                logits = logits if isinstance(logits, tuple) else (logits,)
                writer.add(y.numpy(), [encode(t.float().cpu(), fmt) for t in logits])
                written += len(y)
                bar.update()
        writer.finish()
    seconds = time.perf_counter() - begin
    acc.wait_for_everyone()
    log(acc, f'teacher cache complete: {out} (read it with teacher.cache={out}); this process wrote {written} '
             f'samples in {seconds:.1f} s ({written / max(seconds, 1e-9):.1f} images/s)')
    acc.end_training()
    return dict(manifest, written={'samples': written, 'seconds': seconds})


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


def epoch_size(samples_per_epoch: int, fmt: Format, teachers: int = 1) -> int:
    """Bytes one epoch of `samples_per_epoch` samples takes in format `fmt` (the benchmarks' size table)."""
    return samples_per_epoch * fmt.bytes_per_sample(teachers)

