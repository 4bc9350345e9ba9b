"""`train.py --cache-teacher DIR`: the teachers' outputs on the exact input stream of the run a config describes,
written once for every epoch (the format and the reader: shake_vit/distill/cache.py).
"""
import json
import time
from itertools import islice
from pathlib import Path
from typing import Any, Dict

import torch
from accelerate.utils import send_to_device
from omegaconf import DictConfig

from ..core import data
from ..core.config import ConfigError, derive
from ..distill import methods
from ..distill.cache import (
    MANIFEST,
    VERSION,
    CacheError,
    ShardWriter,
    _differences,
    _flat,
    _manifest,
    identity,
    shard_name,
    weights_hash,
)
from ..distill.cache_format import choose_format, encode
from .health import ClassificationHealth
from .tasks import DistillationTask
from .teacher import teacher_options


def write(cfg: DictConfig, root: str, family) -> Dict[str, Any]:
    """`train.py --cache-teacher DIR`: the teachers' outputs for every epoch of the run `cfg` describes. Resumable:
    finished shards are kept, a half-written one is written again. `family`: classification's, whose data,
    teachers and pipeline the run would have. Returns the manifest."""
    from accelerate.utils import set_seed

    from ..core.build import log, make_accelerator
    from ..core.engine import evaluate, progress

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
    splits = family.build_splits(cfg)
    pipe = family.build_pipeline(cfg, acc, splits, family.build_student(cfg, len(splits.classes)))
    teachers = family.get_teachers(cfg, acc, pipe)
    task = DistillationTask(torch.nn.Identity(), teachers, None, None, pipe.mean, pipe.std,
                            **teacher_options(cfg)).to(acc.device)
    task.eval()
    # the teacher checks of a training run, before hours of writing: a broken teacher stops here (HealthError)
    health = ClassificationHealth(cfg, acc, splits.classes, 1, lambda m: log(acc, m))
    health.check_teachers(task, teachers, pipe.val_loader)
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
