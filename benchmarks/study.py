"""The study runner every benchmark shares: one training run per job (its record cached, so a rerun continues a
study), pools of runs two at a time, shared teachers and teacher-output caches, the command line, paired
statistics, reading a run's TensorBoard scalars, and writing a report with its data.
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / 'configs' / 'quickstart.yaml')  # the recipe a job builds on unless it names its own


def job(name: str, overrides: List[str], out: Path, study: List[str], base: Union[str, List[str]] = BASE) -> dict:
    """One training run in this process (the `base` recipe (or recipes, merged in order), then `study`, then
    `overrides`); returns its record (cached in OUT/records/NAME.json)."""
    record_path = out / 'records' / f'{name}.json'
    if record_path.is_file():
        return json.loads(record_path.read_text())
    from accelerate.state import AcceleratorState, GradientState

    from shake_vit.core.engine import NonFiniteLoss
    from shake_vit.core.runner import train
    # a worker that ran another job before (`runs_pool(smoke=True)`) starts as a new interpreter would
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg = _config(overrides, out, study, base, name)
    start = time.perf_counter()
    try:
        results = train(cfg, resume='auto')  # a job an earlier call left unfinished continues where it stopped
    except NonFiniteLoss as err:  # a diverged run is a result: recorded, and the study goes on
        results = {'failed': str(err).split(';')[0]}
    if not results:  # stopped by a signal (the pool ending): no record, so the next call finishes it
        raise RuntimeError(f'study run {name} was stopped before it finished; rerun the study to continue it')
    record = {'name': name, 'overrides': overrides, 'wall_s': time.perf_counter() - start,
              **{k: v for k, v in results.items() if isinstance(v, (int, float, str))}}  # every head's metrics
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))
    return record


def _config(overrides: List[str], out: Path, study: List[str], base: Union[str, List[str]], name: str):
    from shake_vit.core.config import load_config
    return load_config([base] if isinstance(base, str) else base,
                       [*study, *overrides, f'train.output_dir={out / "runs" / name}'])


def stream_key(overrides: List[str], study: List[str], base: Union[str, List[str]] = BASE):
    """What a run's teacher outputs depend on (teacher_cache.identity), as a short hash: runs with the same key can
    share one teacher-output cache. None for a run that cannot read one (no teacher, a proxy-teacher head, a
    detection run)."""
    import hashlib

    from timm.data import resolve_model_data_config

    from shake_vit.classification import data
    from shake_vit.classification.models import build_student
    from shake_vit.core.config import ConfigError
    from shake_vit.core.stream import resolve
    from shake_vit.distill import cache as teacher_cache
    try:  # a run that cannot read a cache (a proxy-teacher head, detection) is refused here
        cfg = _config([*overrides, 'teacher.cache=/probe'], Path('/tmp'), study, base, 'probe')
    except ConfigError:
        return None
    if not teacher_cache.in_use(cfg):
        return None
    student = build_student(cfg, len(data.build_splits(cfg).classes))
    model_cfg = resolve_model_data_config(student.model)
    mean, std = cfg.data.mean or model_cfg['mean'], cfg.data.std or model_cfg['std']
    ident = teacher_cache.identity(resolve(cfg, 1), mean, std)  # studies run in one process
    # what is written: every epoch's batches for this schedule
    ident['epochs'], ident['max_updates'] = cfg.train.epochs, cfg.train.max_updates_per_epoch
    ident['grad_accum'] = cfg.train.grad_accum
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_job(key: str, overrides: List[str], out: Path, study: List[str], base: Union[str, List[str]] = BASE) -> str:
    """Write (or finish) the teacher-output cache OUT/caches/KEY for a run configured by `overrides`; returns it."""
    from shake_vit.core.family import family_of
    root = out / 'caches' / key
    # any method with a teacher writes the same cache; shake takes one teacher or several
    cfg = _config([*overrides, 'loss.method=shake'], out, study, base, f'cache_{key}')
    family_of(cfg).cache_teacher(cfg, str(root))
    return str(root)


def _cache(args) -> str:
    return cache_job(*args)


def with_teacher_caches(pool, jobs: List[tuple]) -> List[tuple]:
    """`--teacher-cache`: the study's jobs `(name, overrides, out, study[, base])`, each reading a teacher-output
    cache shared by every job with the same input stream and teacher (written first, in the pool; a rerun finds the
    caches complete). Jobs that cannot read a cache are returned unchanged."""
    keys = [stream_key(j[1], j[3], *j[4:]) for j in jobs]
    first = {}
    for job_args, key in zip(jobs, keys):
        if key is not None and key not in first:
            first[key] = (key, job_args[1], job_args[2], job_args[3], *job_args[4:])
    roots = dict(zip(first, pool.map(_cache, list(first.values()))))
    return [j if key is None else (j[0], [*j[1], f'teacher.cache={roots[key]}'], *j[2:]) for j, key in zip(jobs, keys)]


def add_elapsed(out: Path, seconds: float) -> float:
    """A study's wall time, summed over the invocations that ran it (a rerun reuses the records and adds little)."""
    ledger = out / 'elapsed_s.txt'
    total = (float(ledger.read_text()) if ledger.is_file() else 0.0) + seconds
    ledger.write_text(f'{total:.1f}')
    return total


def _run(args) -> dict:
    return job(*args)


def runs_pool(smoke: bool = False):
    """Two worker processes for a study's runs. A study starts a new process for every run, so that no run inherits
    another's state; a smoke run (the tests) reuses the two, which saves an interpreter start per run."""
    return mp.get_context('spawn').Pool(2, maxtasksperchild=None if smoke else 1)


def study_args(doc: str, seeds: int, out: str, teacher_cache: bool = False, groups: str = '',
               report_only: bool = False) -> argparse.Namespace:
    """The command line every seeded study takes: --seeds, --out, --docs, --smoke (and --teacher-cache, for a study
    whose runs can read one; --groups, for a study run in parts, all of `groups` by default; --report-only, for one
    whose records can be reported without running more)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, default=seeds)
    p.add_argument('--out', default=out)
    p.add_argument('--docs', default=str(ROOT / 'docs' / 'results'))
    p.add_argument('--smoke', action='store_true', help='one seed, a few updates, no report; for the tests')
    if report_only:
        p.add_argument('--report-only', action='store_true', help='report the finished runs in OUT; run nothing')
    if groups:
        p.add_argument('--groups', default=groups, help='the groups of rows to run, comma-separated (default: all)')
    if teacher_cache:
        p.add_argument('--teacher-cache', action='store_true', help='runs read shared teacher-output caches '
                       '(OUT/caches) where they can, so a rerun pays for its teachers once')
    return p.parse_args()


def write_report(docs: str, name: str, text: str, data: dict) -> None:
    """DOCS/NAME.md (the report) and DOCS/NAME.json (its data, with the command and the date)."""
    folder = Path(docs)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{name}.md').write_text(text)
    (folder / f'{name}.json').write_text(json.dumps({'command': data.pop('command'), 'date': date.today().isoformat(),
                                                     **data}, indent=2))
    print(text)


def teacher_then_methods(out: Path, study: List[str], base, teacher_epochs: int, methods: Dict[str, tuple],
                         seeds: int, teacher_cache: bool = False, smoke: bool = False) -> tuple:
    """A study's runs, two at a time with one thread each: a teacher fitted once (by a one-epoch kd run) and shared,
    then every method (`{name: (label, overrides)}`) on every seed (with `teacher_cache`, from shared teacher-output
    caches where a method can read one). Returns the teacher's record and the runs' records by name (also written to
    OUT/runs.json)."""
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
    with runs_pool(smoke) as pool:
        teacher = pool.apply(job, ('teacher', ['loss.method=kd', 'train.epochs=1', 'eval.interval=1',
                                               f'teacher.fit.epochs={teacher_epochs}'], out, study, base))
        checkpoint = f"teacher.checkpoint={out / 'runs' / 'teacher' / 'teacher.safetensors'}"
        jobs = [(f'{m}_s{s}', [*o, checkpoint, f'train.seed={s}'], out, study, base)
                for s in range(seeds) for m, (_, o) in methods.items()]
        if teacher_cache:
            jobs = with_teacher_caches(pool, jobs)
        records = {r['name']: r for r in pool.imap_unordered(_run, jobs)}
    (out / 'runs.json').write_text(json.dumps(records, indent=2))
    return teacher, records


def paired(a: List[float], b: List[float]) -> dict:
    """Mean of the run-by-run differences a - b with a 95% t-interval."""
    from scipy import stats
    d = [x - y for x, y in zip(a, b)]
    if any(math.isnan(x) for x in d):  # a head one of the two methods does not have
        return {'mean': float('nan'), 'ci95': [float('nan'), float('nan')], 'n': len(d), 'wins': 0, 'sd': float('nan')}
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {'mean': mean, 'ci95': [float('nan'), float('nan')], 'n': len(d), 'wins': int(d[0] > 0), 'sd': 0.0}
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return {'mean': mean, 'ci95': [mean - half, mean + half], 'n': len(d), 'wins': sum(x > 0 for x in d),
            'sd': statistics.stdev(d)}


def _mean(values: List[float]) -> float:
    """The mean, nan for a head a method does not have (statistics' functions fail on nan)."""
    return statistics.fmean(values) if not any(math.isnan(v) for v in values) else float('nan')


def _std(values: List[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 and not any(math.isnan(v) for v in values) else \
        (0.0 if len(values) <= 1 else float('nan'))


def logged(run_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar one run logged to TensorBoard, by tag, as (update, value) points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    series = {}
    for events in sorted(run_dir.glob('tensorboard/events.out.tfevents.*')):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()['scalars']:
            series[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return series


def train_series(run_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """Every training loss term of one run, as (update, value) points. A point is the mean over the updates since the
    last: every `train.log_interval` updates and at each epoch's end."""
    return {tag[len('train/'):]: points for tag, points in logged(run_dir).items()
            if tag.startswith('train/') and tag not in ('train/lr', 'train/images_per_sec', 'train/monitor_ce')}


def train_scalars(run_dir: Path) -> Dict[str, list]:
    """The values of `train_series`, point by point."""
    return {k: [v for _, v in points] for k, points in train_series(run_dir).items()}


def loss_terms(run_dir: Path) -> Dict[str, list]:
    """Each loss term of one run at the first, the middle and the last log point."""
    return {k: [v[0], v[len(v) // 2], v[-1]] for k, v in train_scalars(run_dir).items()}


STALL_UPDATES = 300


def stalled(run_dir: Path, updates: int = STALL_UPDATES) -> bool:
    """A stalled start: the cls head's cross-entropy has not fallen 5% below its first logged value by update
    `updates`, i.e. the student sat at chance level that long. (Until 2026-12-06 this read the first 6 log points,
    which the epoch-end points made fewer updates than the 300 it meant: see `stall_rule`.)"""
    ce = train_series(run_dir)['ce_cls']
    return min(v for step, v in ce if step <= max(updates, ce[0][0])) > 0.95 * ce[0][1]


def stall_rule(updates: Optional[int], per_epoch: int, epochs: int, interval: int = 50) -> str:
    """The report's sentence defining a stalled start. `updates` None: a count made by the old rule (the first 6 log
    points, at every `interval` updates and at each of the `per_epoch`-update epochs' ends)."""
    if updates:
        return (f'A stalled start: the cls cross-entropy had not fallen 5% below its first logged value after '
                f'{updates} updates ({updates / per_epoch:.0f} of {epochs} epochs), so the student sat at chance for '
                'that long.')
    sixth = sorted({k * interval for k in range(1, 7)} | {k * per_epoch for k in range(1, 7)})[5]
    return (f'A stalled start: the cls cross-entropy had not fallen 5% below its first logged value within the first '
            f'6 log points, which (a point every {interval} updates and at each epoch\'s end) is the first {sixth} '
            f'updates ({sixth / per_epoch:.1f} of {epochs} epochs), fewer than the 300 the rule meant. These runs\' '
            'curves were not kept, so the count was not redone: a run counted here may have left chance soon after.')


def _cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return 'unknown CPU'
