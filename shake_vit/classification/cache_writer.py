"""`train.py --cache-teacher DIR`: the teachers' outputs on the exact input stream of the run a config describes,
written once for every epoch (the store and the reader: shake_vit/distill/cache.py). It walks the training stream
(shake_vit/core/stream.py) through the run's own loader and mixup (`data.mixed`), shard by shard, the shards shared
out over however many processes run it.
"""
import json
import time
from pathlib import Path
from typing import Any, Dict

import torch
from accelerate.utils import send_to_device
from omegaconf import DictConfig

from ..core import data
from ..core.config import ConfigError
from ..core.stream import resolve
from ..distill import methods
from ..distill.cache import (
    MANIFEST,
    VERSION,
    CacheError,
    ShardWriter,
    _differences,
    _flat,
    _manifest,
    block_size,
    blocks,
    identity,
    shard_name,
)
from ..distill.cache_format import choose_format, encode
from .health import ClassificationHealth
from .tasks import DistillationTask
from .teacher import cache_claims, teacher_options


def write(cfg: DictConfig, root: str, family) -> Dict[str, Any]:
    """`train.py --cache-teacher DIR`: the teachers' outputs for every epoch of the run `cfg` describes. Resumable,
    by any process count: finished shards are kept, a half-written one is written again. `family`: classification's,
    whose data, teachers and pipeline the run would have. Returns the manifest."""
    from accelerate.utils import set_seed

    from ..core.build import downloads_first, log, make_accelerator, process_state
    from ..core.engine import evaluate, progress

    if not methods.of(cfg).needs_teacher:
        raise ConfigError(f"loss.method={cfg.loss.method} uses no teacher, so there is nothing to cache: give the "
                          'config of a distillation run (loss.method=shake, deit_hard, kd, ...).')
    if cfg.teacher.cache:
        raise ConfigError(f'--cache-teacher writes a cache, and teacher.cache={cfg.teacher.cache} reads one: drop '
                          'teacher.cache.')
    out = Path(root)
    cfg = resolve(cfg, process_state().num_processes)  # the global batch the run of this config has
    acc = make_accelerator(cfg, trackers=False)
    if acc.is_main_process:  # a teacher fitted first is saved in the run's folder, as a training run would
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    set_seed(cfg.train.seed, device_specific=True)
    with downloads_first(acc):
        splits = family.build_splits(cfg)
        student = family.build_student(cfg, len(splits.classes))
    pipe = family.build_pipeline(cfg, acc, splits, student)
    teachers = family.get_teachers(cfg, acc, pipe)
    task = DistillationTask(torch.nn.Identity(), teachers, None, None, pipe.mean, pipe.std,
                            **teacher_options(cfg)).to(acc.device)
    task.eval()
    # the teacher checks of a training run, before hours of writing: a broken teacher stops here (HealthError)
    health = ClassificationHealth(cfg, acc, splits.classes, 1, lambda m: log(acc, m))
    health.check_teachers(task, teachers, pipe.val_loader)
    sampler = pipe.train_loader.batch_sampler  # this process's loader; the writer gives it the micro-batches to load
    stream, b = sampler.stream, cfg.train.batch_size
    per_epoch = stream.micro_batches_per_epoch
    samples = cfg.train.epochs * per_epoch * b
    fmt = choose_format(cfg, pipe.num_classes, samples, len(teachers))
    manifest = {'version': VERSION, 'identity': identity(cfg, pipe.mean, pipe.std),
                'teachers': cache_claims(cfg, pipe, teachers), 'classes': list(splits.classes),
                'format': fmt.__dict__, 'epochs': cfg.train.epochs, 'micro_batches_per_epoch': per_epoch,
                'block': block_size(b, per_epoch),
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
    # every process lists the same missing shards (checked before any is written) and takes its share of them
    missing = [unit for unit in blocks(manifest) if not (out / shard_name(*unit[:2])).is_dir()]
    acc.wait_for_everyone()
    mine = missing[acc.process_index::acc.num_processes]
    log(acc, f'teacher cache {out}: {fmt.describe()}, {cfg.train.epochs} epochs x {per_epoch} micro-batches of {b}, '
             f'about {samples * fmt.bytes_per_sample(len(teachers)) / 2 ** 30:.3f} GiB; {len(missing)} of '
             f'{len(blocks(manifest))} shards to write, over {acc.num_processes} process'
             f"{'es' if acc.num_processes > 1 else ''}")
    mixup = family.mixup(cfg, pipe)
    sampler.set_plan([(epoch, m) for epoch, _, micro_batches in mine for m in micro_batches])
    batches = iter(pipe.train_loader)
    written, begin = 0, time.perf_counter()
    with progress(total=sum(len(r) for *_, r in mine), desc='cache', disable=not acc.is_local_main_process) as bar:
        for epoch, block, micro_batches in mine:
            writer = ShardWriter(out, epoch, block, micro_batches, b)
            for m in micro_batches:
                x, y = next(batches)
                x = send_to_device(x, acc.device, non_blocking=True)
                x, _ = data.mixed(mixup, x, send_to_device(y, acc.device), cfg.train.seed, epoch, m)  # as Trainer.step
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
