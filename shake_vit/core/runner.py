"""A training run, built from the config: data, teacher, student, the loop, checkpoints, evaluation, outputs."""
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from accelerate.utils import set_seed
from omegaconf import DictConfig
from safetensors.torch import save_file
from timm.utils import ModelEmaV3

from . import run_folder, stream
from .build import build_optimization, downloads_first, finish, log, make_accelerator, process_state
from .checkpoint import (
    STATE_FILE,
    Checkpointer,
    CheckpointError,
    Progress,
    fault_hook,
    latest_checkpoint,
    read_progress,
)
from .config import ConfigError
from .engine import Trainer
from .family import family_of
from .preemption import StopRequest
from .schema import DATA_ADDED
from .weights import read_weights


def check_resumable(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    """Refuse, before anything expensive (a teacher fit) starts, a checkpoint of another run: another student or
    config identity (run_folder.identity). The process count may differ (`resume_layout`)."""
    diffs = [f'{k}: checkpoint {saved.get(k)!r}, config {v!r}' for k, v in current.items()
             if k not in ('layout', 'config') and saved.get(k) != v]
    if diffs:
        raise CheckpointError(f'Checkpoint {path} does not match the configuration ({"; ".join(diffs)}). Resume with '
                              'the config the run was started with, or start a new run with model.pretrained='
                              f'{path / "model.safetensors"}.')
    if 'config' in saved:  # checkpoints written before the identity was recorded: their architecture alone
        config = run_folder.kept(saved['config'])
        # written before train.global_batch existed: its global batch is the one `resume_layout` took from it
        config.setdefault('train.global_batch', current['config'].get('train.global_batch'))
        for added, value in DATA_ADDED.items():  # written before these keys existed: the value they had then
            config.setdefault(f'data.{added}', value)
        run_folder.check_same_run(config, current['config'], path)


def saved_layout(run: Dict[str, Any], micro_batch: int) -> Dict[str, int]:
    """The layout a checkpoint was written with: its global batch, processes and accumulation. Checkpoints written
    before the global stream record their process count alone (and their config its accumulation)."""
    if 'layout' in run:
        return run['layout']
    processes = run.get('num_processes', 1)
    accum = run.get('config', {}).get('train.grad_accum', 1)
    return {'global_batch': micro_batch * processes * accum, 'processes': processes, 'accum': accum}


def resume_layout(cfg: DictConfig, start: Optional[Path], world: int) -> Tuple[DictConfig, Optional[str]]:
    """This launch's config with its global batch and accumulation filled in (shake_vit/core/stream.py); resuming,
    the checkpoint's global batch is kept whatever the process count (elastic resume), and the returned note says
    what changed (None when nothing did)."""
    if start is None:
        return stream.resolve(cfg, world), None
    saved = saved_layout(read_progress(start).run, cfg.train.batch_size)
    try:
        cfg = stream.resolve(cfg, world, saved['global_batch'])
    except ConfigError as err:
        raise CheckpointError(f'Cannot resume {start} here: {err}') from None
    if (saved['processes'], saved['accum']) == (world, cfg.train.grad_accum):
        return cfg, None
    return cfg, (f"elastic resume: the checkpoint was written by {saved['processes']} process"
                 f"{'es' if saved['processes'] > 1 else ''} x {saved['accum']} accumulation, this run has {world} x "
                 f'{cfg.train.grad_accum}; the global batch ({cfg.train.global_batch}), the lr schedule and the data '
                 'stream are unchanged')


def resolve_resume(resume: Optional[str], root: Path) -> Optional[Path]:
    """The checkpoint folder `--resume` names: 'auto' is the newest complete one under `root`, if any."""
    if resume is None:
        return None
    if resume == 'auto':
        return latest_checkpoint(root)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); use --resume auto "
                              f'or a folder under {root}.')
    return path


def train(cfg: DictConfig, resume: Optional[str] = None, before: bool = False) -> Dict[str, Any]:
    """Train the student as configured; returns the final evaluation written to `results.json`. What differs between
    tasks (data, student, teachers, step, evaluation) comes from the config's task family (shake_vit/core/family.py).

    Args:
        resume: 'auto' (the newest checkpoint in the output directory, if any) or a checkpoint folder.
        before: a run that another run follows in the same processes (`Family.before_run`): the process group stays.
    """
    family, out = family_of(cfg), Path(cfg.train.output_dir)
    process_state()  # joined before anything below synchronises the processes
    start = resolve_resume(resume, out / 'checkpoints')
    if start is None:
        run_folder.claim(cfg)  # one run per folder: refuses another run's folder, or clears it with train.overwrite
    else:
        at = read_progress(start).epoch
        if at > cfg.train.epochs:
            raise CheckpointError(f'Checkpoint {start} is at epoch {at}, past train.epochs={cfg.train.epochs}: resume '
                                  f'with the epoch count the run was started with (its config.yaml), or more.')
    # e.g. a detector's backbone pretrained on classification, by this same function (resumed if it was stopped)
    if not family.before_run(cfg, lambda run: train(run, resume='auto', before=True)):
        return {}
    cfg, elastic = resume_layout(cfg, start, process_state().num_processes)
    acc = make_accelerator(cfg)
    set_seed(cfg.train.seed, device_specific=True)
    with downloads_first(acc):  # a data set with data.download=true, a detector's torchvision weights
        splits = family.build_splits(cfg)
        student = family.build_student(cfg, len(splits.classes))
    layout = {'global_batch': cfg.train.global_batch, 'processes': acc.num_processes, 'accum': cfg.train.grad_accum}
    identity = {**family.run_identity(cfg, student), 'layout': layout, 'config': run_folder.identity(cfg)}
    if start is not None:
        check_resumable(read_progress(start).run, identity, start)
    else:  # a resumed run has its weights in the checkpoint
        with downloads_first(acc):  # model.pretrained may name hub weights
            family.init_student(cfg, student, lambda message: log(acc, message))
    pipe = family.build_pipeline(cfg, acc, splits, student)
    teachers = family.get_teachers(cfg, acc, pipe)
    if start is None:
        family.start_from_teachers(cfg, student, teachers)
    set_seed(cfg.train.seed + 1, device_specific=True)  # training draws the same numbers whether the teacher was
    # fitted in this invocation or loaded

    optimizer, schedule, d = build_optimization(cfg, student, acc.num_processes, pipe.updates_per_epoch)
    log(acc, f'{cfg.loss.method}: {cfg.model.name} student, {len(splits.train)} train / {len(splits.val)} val images, '
             f'{pipe.num_classes} classes; {d.describe()}')
    prepared, optimizer = acc.prepare(student, optimizer)
    ema = ModelEmaV3(student, decay=cfg.train.ema_decay) if cfg.train.ema else None
    task = family.make_task(cfg, prepared, teachers, pipe).to(acc.device)
    trainer = Trainer(acc, task, optimizer, schedule, mixup=family.mixup(cfg, pipe), ema=ema, seed=cfg.train.seed,
                      clip_grad=cfg.optim.clip_grad, log_interval=cfg.train.log_interval)
    health = family.health(cfg, acc, splits.classes, d.updates_per_epoch * cfg.train.epochs, lambda m: log(acc, m))
    family.check_teachers(health, task, teachers, pipe)  # before the first update: a broken teacher stops the run
    trainer.on_log = health.observe
    metric = cfg.ckpt.metric or family.best_metric(student)
    ckpt = Checkpointer(acc, out / 'checkpoints', ema, cfg.ckpt.keep_last, metric)

    progress = Progress(run=identity, best_of=metric)
    if start is not None:
        progress = ckpt.load(start)
        if progress.best_of != metric:  # another ckpt.metric than the run began with: its best starts again
            progress.best, progress.best_of, progress.best_epoch = None, metric, 0
        trainer.update = progress.update
        schedule.step_update(num_updates=progress.update)
        progress.run = identity  # this launch's layout from here on
        log(acc, f'resumed from {start}: epoch {progress.epoch}, update {progress.update} (micro-batch '
                 f'{progress.micro_batches_done} of the epoch)' + (f'; {elastic}' if elastic else ''))
    elif resume == 'auto':
        log(acc, f'--resume auto: no checkpoint in {ckpt.root} yet, starting from scratch')

    stop = StopRequest(acc, cfg.ckpt.stop_check_every)
    per_update = cfg.train.global_batch // cfg.train.batch_size  # micro-batches per update
    epoch_start_update = 0

    def after_update() -> bool:
        """Mid-epoch checkpoints, and the stop on SIGTERM/SIGINT (after saving)."""
        done = trainer.update - epoch_start_update
        fault_hook('update', trainer.update)
        stopping = stop.should_stop(trainer.update)
        interval = cfg.ckpt.interval_updates and trainer.update % cfg.ckpt.interval_updates == 0
        if (stopping or interval) and done < d.updates_per_epoch:  # an epoch's last update is saved after its eval
            progress.micro_batches_done, progress.update = done * per_update, trainer.update
            trainer.flush()  # raises on a NaN/inf loss term: a checkpoint is never written from broken weights
            ckpt.save(progress)
        return stopping

    trainer.after_update = after_update
    train_time, stopped, first_update = 0.0, False, trainer.update
    try:
        for epoch in range(progress.epoch, cfg.train.epochs):
            skip = progress.micro_batches_done // per_update if epoch == progress.epoch else 0  # updates done
            epoch_start_update = trainer.update - skip
            progress.epoch = epoch
            begin = time.perf_counter()
            stats = trainer.train_epoch(pipe.train_loader, epoch, d.updates_per_epoch, skip_updates=skip)
            train_time += time.perf_counter() - begin
            if trainer.update - epoch_start_update < d.updates_per_epoch:  # stopped by a signal, checkpoint written
                stopped = True
                break
            last = epoch + 1 == cfg.train.epochs
            if (epoch + 1) % cfg.eval.interval == 0 or last:
                progress.metrics = family.evaluate(student, ema, task, pipe.val_loader, acc)
                acc.log({f'val/{k}': v for k, v in progress.metrics.items()}, step=trainer.update)
                value = progress.metrics.get(metric)
                if value is not None and (progress.best is None or value > progress.best):
                    progress.best, progress.best_epoch = value, epoch + 1
                log(acc, f"epoch {epoch + 1}/{cfg.train.epochs}: loss {stats.get('loss', float('nan')):.4f}, "
                         f'{family.headline(progress.metrics)}')
            progress.epoch, progress.micro_batches_done, progress.update = epoch + 1, 0, trainer.update
            ckpt.save(progress)
            if stop.should_stop(0):  # a signal during the evaluation or the save
                stopped = epoch + 1 < cfg.train.epochs
                break
    finally:  # also on errors: the caller's SIGTERM/SIGINT handlers come back
        stop.restore()

    if stopped:
        log(acc, f'stopped by {stop.signal or "a peer process"} at epoch {progress.epoch}, update {trainer.update}; '
                 f'checkpoint {ckpt.latest()}. Continue with the same command plus --resume auto.')
        trainer.task = task = prepared = None  # the DDP module (and its reducer) goes before the process group
        acc.free_memory()
        finish(acc, keep_process_group=before)
        return {}
    if not progress.metrics:  # resumed from a finished run's last checkpoint: nothing left to train
        progress.metrics = family.evaluate(student, ema, task, pipe.val_loader, acc)
    trained = (trainer.update - first_update) * d.global_batch  # images this invocation trained on
    # The final evaluation, and the best one by `metric` over the run (CRD's logs report the best epoch's top-1).
    best = {f'best_{metric}': progress.best, 'best_epoch': progress.best_epoch} if progress.best is not None else {}
    results = dict(progress.metrics, epochs=cfg.train.epochs, train_images_per_sec=trained / max(train_time, 1e-9),
                   **best, health=health.summary())
    if acc.is_main_process:
        (out / 'results.json').write_text(json.dumps(results, indent=2))
        state = {k: v.contiguous() for k, v in acc.unwrap_model(prepared).state_dict().items()}
        save_file(state, str(out / 'student.safetensors'))
    log(acc, f'final evaluation ({out}/results.json):\n' + family.format_table(results, student))
    # The DDP module (and its reducer) goes before the process group: left to the interpreter's exit, a gloo group's
    # threads were once torn down after it ("terminate called without an active exception", 1 suite run in ~5).
    trainer.task = task = prepared = None
    acc.free_memory()
    finish(acc, keep_process_group=before)
    return results


def evaluate_checkpoint(path: str, cfg: DictConfig) -> Dict[str, Any]:
    """`train.py --eval PATH` with its run's config (`weights.config_for`): the configured validation set, every head,
    the EMA and the teachers, through the family's hooks; a table and eval.json beside the weights."""
    family = family_of(cfg)
    cfg = stream.for_evaluation(cfg, process_state().num_processes)
    acc = make_accelerator(cfg, trackers=False)
    set_seed(cfg.train.seed)
    with downloads_first(acc):
        splits = family.build_splits(cfg)
        student = family.build_student(cfg, len(splits.classes))
    weights, ema_weights, where = read_weights(Path(path), cfg.train.trust_pickled_files, family.student_keys)
    with_shadow = family.load_weights(student, weights, path, cfg)
    ema = None
    if ema_weights is not None:
        ema = ModelEmaV3(student, device=acc.device)
        family.load_weights(ema.module, ema_weights, path, cfg)
    student.to(acc.device)
    pipe = family.build_pipeline(cfg, acc, splits, student)
    task = family.eval_task(cfg, student, family.eval_teachers(cfg, acc, pipe), pipe).to(acc.device)
    metrics = family.evaluate(student, ema, task, pipe.val_loader, acc, with_shadow=with_shadow)
    metrics['checkpoint'] = str(path)
    if (where / STATE_FILE).is_file():
        metrics['update'] = json.loads((where / STATE_FILE).read_text())['update']
    if acc.is_main_process:
        (where / 'eval.json').write_text(json.dumps(metrics, indent=2))
    log(acc, f'evaluation of {path} ({where}/eval.json):\n' + family.format_table(metrics, student))
    finish(acc)
    return metrics


def export(path: str, cfg: DictConfig, head: Optional[str], out_dir: Optional[str], use_ema: bool, fmt: str) -> Path:
    """`train.py --export PATH` with its run's config: the saved student (or its EMA weights) loaded through the
    family's hooks, then written by the family (`Family.export`)."""
    family = family_of(cfg)
    family.check_export(head, fmt)
    weights, ema_weights, where = read_weights(Path(path), cfg.train.trust_pickled_files, family.student_keys)
    if use_ema:
        if ema_weights is None:
            raise ConfigError(f"--export-ema: '{path}' holds no EMA weights.")
        weights = ema_weights
    student = family.build_student(cfg, family.classes_in(weights, cfg))
    with_shadow = family.load_weights(student, weights, Path(path), cfg)
    return family.export(student.eval(), with_shadow, where, cfg, head, out_dir, fmt)
