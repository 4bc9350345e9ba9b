"""Does SHAKE beat the baselines? A k-fold, multi-seed ablation on digits, with the paper's sensitivity grid.

    python -m benchmarks.ablation                 # the quick start's protocol, 4 folds x 3 seeds x 6 methods
    python -m benchmarks.ablation --protocol short --sens-seeds 1 --out runs/ablation   # 20 epochs, lambda x T (66 min)
    python -m benchmarks.ablation --protocol lowdata --seeds 6   # one fold of 5 trains, the rest test (~90 min)
    python -m benchmarks.ablation --protocol lowdata --pilot 0 1 --seeds 2   # its pilot: learning curves, paired sd
    python -m benchmarks.ablation --smoke         # one fold, one seed, 4 updates (tests/test_benchmarks.py runs it)
    python -m benchmarks.ablation --teacher-cache # the same runs, each fold and seed's teacher outputs written once

Protocol. Every run is `shake_vit.core.runner.train` with the quick-start recipe made smaller (configs/quickstart.yaml
plus STUDY below). The 1,797 images are split into stratified folds; each fold is the test set once. One teacher is
fitted per training split and shared by every method. Each (method, fold, seed) is one run; a method is compared with
`none` and `deit_hard` run by run on the same fold and seed (paired differences, 95% t-interval). The sensitivity grid
(lambda x T for `shake`) never sees the test folds: it trains on 80% of each training fold and is scored on the other
20% (`data.inner_val_fraction`), which is how a setting would be chosen. Wall time per method is the training time
relative to `kd`.

Writes OUT/runs.json (one record per run, reused when the study is rerun), and, unless --smoke, docs/results/
ablation.md, ablation.json and ablation.png.
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Dict, List

from benchmarks.ablation_figure import figure
from benchmarks.ablation_pilot import pilot_report
from benchmarks.study import (
    ROOT,
    STALL_UPDATES,
    _cpu_name,
    _mean,
    _run,
    _std,
    add_elapsed,
    job,
    loss_terms,
    paired,
    stall_rule,
    stalled,
    with_teacher_caches,
)

# The quick start, cheaper per run: a 64-wide student for 20 epochs at batch 32 and lr 3e-3, one CPU thread per run
# (two runs in parallel). Measured pilots on fold 0: at batch 64 / lr 1e-3 the runs stopped near 80% with a 4-point
# spread between seeds; at batch 32 / lr 1e-3 the training loss was still falling at the end (none: 86-88%); at lr
# 3e-3 `none` reaches 91-93%.
STUDY = ['model.kwargs.embed_dim=64', 'train.epochs=20', 'train.batch_size=32', 'optim.lr=3e-3', 'eval.interval=20',
         'train.log_interval=50', 'ckpt.keep_last=1', 'train.cpu_threads=1', 'data.num_workers=0']
METHODS = {
    'none': ['loss.method=none_both_heads'],  # what these records ran: both heads on the labels
    'deit_hard': ['loss.method=deit_hard'],
    'deit_soft': ['loss.method=deit_soft'],
    'kd': ['loss.method=kd'],
    'shake': ['loss.method=shake'],
    'shake_authors': ['loss.method=shake', 'loss.standardize=true', 'loss.teacher_loss=mse', 'loss.shadow_ce=1'],
}
NONE_NOTE = ('The `none` rows train both heads on the labels (`loss.method=none_both_heads`; `none` itself trains the '
             "classification head alone, DeiT's plain baseline).")
KD_NOTE = (' `kd` trains no shadow head: its shadow and average columns are not models it predicts with (nan in runs '
           'since 2026-11-27, an untrained head in earlier records).')
# The protocols (issue 18): the quick start's own recipe, only the fold, the seed and the method changing (what a user
# meets first), and the cheaper 20-epoch protocol above (`short`, the study's first protocol, kept for the contrast:
# which methods stall at a higher lr). Settings that change no weight: evaluation only at the end, 50-update log
# points (the stalled-start test reads them), one thread per run, one kept checkpoint.
QUICKSTART = ['eval.interval=40', 'train.log_interval=50', 'ckpt.keep_last=1', 'train.cpu_threads=1',
              'data.num_workers=0']
# `lowdata` (issue 28): the quick start's recipe trained on one fold of five (359-360 images) and tested on the other
# four, where the student ends well below its teacher; DeiT's case for distillation is data efficiency. The epoch
# count is the pilot's choice (docs/results/ablation_notes.md, "The low-data protocol: its pilot").
LOWDATA_EPOCHS = 150
PROTOCOLS = {
    'quickstart': {'study': QUICKSTART, 'epochs': 40, 'methods': {**METHODS, 'none': ['loss.method=none']},
                   'label': 'the quick start (configs/quickstart.yaml: 96-wide DeiT, 40 epochs, batch 64, lr 1e-3)'},
    'short': {'study': STUDY, 'epochs': 20, 'methods': METHODS,
              'label': 'short (64-wide DeiT, 20 epochs, batch 32, lr 3e-3)'},
    'lowdata': {'study': QUICKSTART, 'epochs': LOWDATA_EPOCHS, 'methods': {**METHODS, 'none': ['loss.method=none']},
                # the teacher's fit gets the quick start's number of updates (12 epochs x 23 there, 60 x 5 here): at
                # 12 epochs on one fold the pilot's teachers scored 90%, below their students
                'folds': 5, 'split': ['data.train_on_fold=true'], 'teacher_epochs': 60,
                'label': f'low data (the quick start trained on one fold of 5, 359-360 images, {LOWDATA_EPOCHS} '
                         'epochs; tested on the other 4)'},
}
ORDER = ('quickstart', 'lowdata', 'short')


def train_images(protocol: str, folds: int) -> float:
    """Training images per run: one fold (lowdata) or all but one of the 1,797."""
    return 1797 / folds if protocol == 'lowdata' else 1797 * (folds - 1) / folds
LAMBDAS = (0.5, 1.0, 2.0)
GRID = [(lam, T) for lam in LAMBDAS for T in (1.0, 4.0)]
HEADS = ('cls', 'shadow', 'avg')


SMOKE = ['train.epochs=1', 'eval.interval=1', 'model.kwargs.depth=1', 'train.max_updates_per_epoch=4']


def teacher_job(fold: int, num_folds: int, inner: bool, out: Path, epochs: int, study: List[str],
                extra_split: List[str] = ()) -> tuple:
    """Fit the fold's teacher: the teacher phase of a 1-epoch SHAKE run, which fits it and saves it."""
    name = f'teacher_f{fold}' + ('_inner' if inner else '')
    split = [f'data.num_folds={num_folds}', f'data.fold={fold}', *extra_split] + (
        ['data.inner_val_fraction=0.2'] if inner else [])
    job(name, [*split, 'loss.method=shake', 'train.epochs=1', 'eval.interval=1', f'teacher.fit.epochs={epochs}'], out,
        study)
    return name, out / 'runs' / name / 'teacher.safetensors'


def summarise(records: Dict[str, dict], folds: int, seeds: int, sens_seeds: int) -> dict:
    keys = [(f, s) for f in range(folds) for s in range(seeds)]
    main = {}
    def top1(r: dict, h: str) -> float:  # kd trains no shadow head: its runs report the cls head alone
        return r.get(f'top1_{h}', float('nan'))

    for m in METHODS:
        runs = [records[f'{m}_f{f}_s{s}'] for f, s in keys]
        main[m] = {h: {'mean': _mean([top1(r, h) for r in runs]), 'std': _std([top1(r, h) for r in runs]),
                       'runs': [top1(r, h) for r in runs]} for h in HEADS}
        main[m]['images_per_sec'] = statistics.median(r['train_images_per_sec'] for r in runs)
    for m in METHODS:
        for ref in ('none', 'deit_hard'):
            main[m][f'vs_{ref}'] = {h: paired(main[m][h]['runs'], main[ref][h]['runs']) for h in HEADS}
        main[m]['time_vs_kd'] = main['kd']['images_per_sec'] / main[m]['images_per_sec']
    grid = {}
    for lam, T in (GRID if sens_seeds else ()):
        runs = [records[f'grid_l{lam}_t{T}_f{f}_s{s}'] for f in range(folds) for s in range(sens_seeds)]
        grid[f'{lam},{T}'] = {h: statistics.fmean(r[f'top1_{h}'] for r in runs) for h in HEADS}
    teachers = [records[f'teacher_f{f}']['teacher_top1'] for f in range(folds)]
    return {'main': main, 'grid': grid, 'teacher_top1': teachers}


def report(summary: dict, args, command: str, elapsed: float, when: str = '') -> str:
    """One protocol's section of docs/results/ablation.md (`args`: its folds, seeds, sens_seeds, epochs and
    protocol)."""
    main, lines = summary['main'], []
    protocol = getattr(args, 'protocol', 'short')
    label = PROTOCOLS[protocol]['label']
    none_note = NONE_NOTE if protocol == 'short' else ('The `none` rows are `loss.method=none`: the classification '
                                                       'head alone on the labels, a plain DeiT.')
    ups = int(train_images(protocol, args.folds) // (32 if protocol == 'short' else 64))  # updates per epoch
    lines += [f'## Protocol: {label}', '',
              f'Command: `{command}`  ', f'Machine: {os.cpu_count()} CPU cores ({_cpu_name()}), '
              f'two runs in parallel, one thread each; {when or date.today().isoformat()}; {elapsed / 60:.0f} min in '
              'all.', '',
              f'{args.folds}-fold stratified cross-validation over all 1,797 images x {args.seeds} seeds '
              f'({args.folds * args.seeds} runs per method; ' + (
                  f'each fold trains once and the other {args.folds - 1} test, so every image is tested '
                  f'{args.folds - 1} times per seed' if protocol == 'lowdata' else 'every image is tested once per '
                  'seed') + f'). Student: {label}, '
              f'{args.epochs} epochs. Teacher: timm test_byobnet fitted '
              f"once per training split (test top-1 per fold: {', '.join(f'{t:.2f}' for t in summary['teacher_top1'])}"
              '). Numbers are test top-1 (%), mean +- std over runs. ' + none_note + KD_NOTE, '',
              '| method | cls head | shadow head | average | cls median [worst] | stalled starts | '
              'cls vs none (95% CI) | cls vs deit_hard (95% CI) | time vs kd |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    def ci(d):
        return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}], ahead {d['wins']}/{d['n']}"
    for m, r in main.items():
        lines.append(f"| {m} | {r['cls']['mean']:.2f} +- {r['cls']['std']:.2f} | {r['shadow']['mean']:.2f} +- "
                     f"{r['shadow']['std']:.2f} | {r['avg']['mean']:.2f} +- {r['avg']['std']:.2f} | "
                     f"{statistics.median(r['cls']['runs']):.2f} [{min(r['cls']['runs']):.2f}] | "
                     f"{summary.get('stalled', {}).get(m, '-')} of {len(r['cls']['runs'])} | "
                     f"{ci(r['vs_none']['cls'])} | {ci(r['vs_deit_hard']['cls'])} | x{r['time_vs_kd']:.2f} |")
    lines += ['', stall_rule(summary.get('stall_updates'), ups, args.epochs) + ' "ahead k/n": the method scored higher '
              'in k of the n paired runs.', '',
              'Paired differences on the DeiT average of the two heads:', '',
              '| method | avg vs none (95% CI) | avg vs deit_hard (95% CI) |', '| --- | --- | --- |']
    for m, r in main.items():
        lines.append(f"| {m} | {r['vs_none']['avg']['mean']:+.2f} [{r['vs_none']['avg']['ci95'][0]:+.2f}, "
                     f"{r['vs_none']['avg']['ci95'][1]:+.2f}] | {r['vs_deit_hard']['avg']['mean']:+.2f} "
                     f"[{r['vs_deit_hard']['avg']['ci95'][0]:+.2f}, {r['vs_deit_hard']['avg']['ci95'][1]:+.2f}] |")
    pairs = (('shake', 'kd'), ('shake_authors', 'kd'), ('shake_authors', 'shake'))
    lines += ['', 'SHAKE against `kd`, and its two forms against each other (cls head, the same pairs): ' + '; '.join(
        f"{a} - {b} {ci(paired(main[a]['cls']['runs'], main[b]['cls']['runs']))}" for a, b in pairs) + '.', '']
    if summary['grid']:
        lines += grid_lines(summary, args)
    if summary.get('terms'):
        lines += ['Loss terms of the fold-0, seed-0 run of each method, as logged (weighted, mean over 50 updates): '
                  'first, middle and last log point. `loss` is their sum, the number the optimiser sees.', '',
                  '| method | term | first | middle | last |', '| --- | --- | --- | --- | --- |']
        for m, terms in summary['terms'].items():
            for term, (first, middle, last) in terms.items():
                lines.append(f'| {m} | {term} | {first:.3f} | {middle:.3f} | {last:.3f} |')
        lines.append('')
    return '\n'.join(lines)


def grid_lines(summary: dict, args) -> List[str]:
    lines = ['', f'Sensitivity of `shake` (lambda = loss.mutual, T = loss.temperature): inner validation top-1 of the '
              f'cls head (%), {args.folds} folds x {args.sens_seeds} seed(s), trained on 80% of each training fold '
              'and scored on the other 20%; the test folds are not used.', '',
              '| | ' + ' | '.join(f'lambda = {lam:g}' for lam in LAMBDAS) + ' |', '| --- |' + ' --- |' * len(LAMBDAS)]
    for T in sorted({t for _, t in GRID}):
        stalls = summary.get('stalled_grid', {})
        lines.append(f'| T = {T:g} | ' + ' | '.join(f"{summary['grid'][f'{lam},{T}']['cls']:.2f}"
                                                  + (f" ({stalls[f'{lam},{T}']} stalled)" if stalls else '')
                                                  for lam in LAMBDAS) + ' |')
    best = max(summary['grid'], key=lambda k: summary['grid'][k]['cls'])
    lines += ['', f'Best on inner validation: lambda, T = {best} (the paper: lambda = 1, T = 4 in the main text, '
              'lambda = 0.5 best in its sensitivity plot).', '']
    return lines


def side_by_side(protocols: Dict[str, dict]) -> List[str]:
    """The protocols' cls-head results in one table."""
    names = [n for n in ORDER if n in protocols]
    head = ' | '.join(f'{n}: mean +- std | {n}: vs none (95% CI) | {n}: vs deit_hard (95% CI) | {n}: stalled'
                      for n in names)
    lines = [f'| method | {head} |', '| --- |' + ' --- |' * (4 * len(names))]
    methods = list(protocols[names[0]]['summary']['main'])
    for m in methods:
        cells = []
        for n in names:
            r = protocols[n]['summary']['main'][m]
            c = [r['cls']['mean'], r['cls']['std']]
            vn, vd = r['vs_none']['cls'], r['vs_deit_hard']['cls']
            cells.append(f"{c[0]:.2f} +- {c[1]:.2f} | " + (
                '' if m == 'none' else f"{vn['mean']:+.2f} [{vn['ci95'][0]:+.2f}, {vn['ci95'][1]:+.2f}]") + ' | ' + (
                '' if m == 'deit_hard' else f"{vd['mean']:+.2f} [{vd['ci95'][0]:+.2f}, {vd['ci95'][1]:+.2f}]")
                + f" | {protocols[n]['summary'].get('stalled', {}).get(m, '-')} of {len(r['cls']['runs'])}")
        lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
    return lines


def load_protocols(path: Path) -> Dict[str, dict]:
    """docs/results/ablation.json's protocols; a file from before there were two holds the short one."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if 'protocols' in data:
        return data['protocols']
    # the first study (2026-11-26): 4 folds x 3 seeds, 1 grid seed, 20 epochs, 66 min (its report's own figures)
    command = f"{data['command']} (the default protocol then; today: python -m benchmarks.ablation --protocol short " \
              '--sens-seeds 1 --out runs/ablation)'
    return {'short': {'command': command, 'date': data['date'], 'summary': data['summary'],
                      'runs': data['runs'], 'folds': 4, 'seeds': 3, 'sens_seeds': 1, 'epochs': 20,
                      'elapsed_s': 66 * 60}}


def write_both(docs: Path, protocols: Dict[str, dict]) -> str:
    """docs/results/ablation.md, .json and .png from every protocol on record."""
    order = [n for n in ORDER if n in protocols]
    lines = [f'# SHAKE against the baselines on digits, at {len(order)} protocols', '',
             'The same six methods at each protocol, paired by fold and seed. `quickstart` is the quick start\'s '
             'recipe (`configs/quickstart.yaml`) with only the fold, the seed and the method changing: what a user '
             'meets first. `lowdata` is that recipe trained on one fold of five (20% of the images) and tested on the '
             'other four: the student ends well below its teacher, where distillation has room. `short` is the '
             'cheaper protocol this study ran first (a 64-wide student for 20 epochs at batch 32 and lr 3e-3). '
             'Cls-head test top-1 (%):', '',
             *side_by_side(protocols), '', '![ablation](ablation.png)', '']
    for n in order:
        p = protocols[n]
        args = type('Args', (), {'protocol': n, 'folds': p['folds'], 'seeds': p['seeds'],
                                 'sens_seeds': p['sens_seeds'], 'epochs': p['epochs']})()
        lines += [report(p['summary'], args, p['command'], p['elapsed_s'], p['date']), '']
    notes = docs / 'ablation_notes.md'  # the hand-written reading, kept across reruns
    if notes.is_file():
        lines += [notes.read_text()]
    (docs / 'ablation.json').write_text(json.dumps({'protocols': protocols}, indent=2))
    figure({n: protocols[n]['summary'] for n in order}, docs / 'ablation.png',
           {n: PROTOCOLS[n]['label'] for n in PROTOCOLS}, GRID)
    text = '\n'.join(lines)
    (docs / 'ablation.md').write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--protocol', choices=sorted(PROTOCOLS), default='quickstart',
                   help="quickstart: the quick start's recipe as it is; short: 20 epochs at batch 32 and lr 3e-3; "
                        'lowdata: the quick start trained on one fold of 5')
    p.add_argument('--folds', type=int, help="folds (default: the protocol's, 4 or 5)")
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--sens-seeds', type=int, default=0, help='seeds of the optional lambda x T grid (0: no grid)')
    p.add_argument('--workers', type=int, default=2, help='runs in parallel (one CPU thread each)')
    p.add_argument('--teacher-epochs', type=int, help="the teacher's fit (default: the protocol's, 12 or 60)")
    p.add_argument('--epochs', type=int, help="student epochs per run (default: the protocol's)")
    p.add_argument('--out', help='the runs and their records (default: runs/ablation_PROTOCOL)')
    p.add_argument('--docs', default=str(ROOT / 'docs' / 'results'))
    p.add_argument('--smoke', action='store_true', help='fold 0 only, 1 seed, 1 epoch, no grid; for the tests')
    p.add_argument('--pilot', type=int, nargs='+', metavar='FOLD',
                   help='a pilot: these folds alone, --pilot-methods alone, evaluated every --pilot-eval epochs; '
                        "prints each run's test top-1 curve and the paired differences against none; no report")
    p.add_argument('--pilot-methods', nargs='+', default=['none', 'kd', 'shake'])
    p.add_argument('--pilot-eval', type=int, default=25)
    p.add_argument('--teacher-cache', action='store_true', help='runs read shared teacher-output caches (OUT/caches): '
                   "one per fold and seed, written once, so the methods and a rerun pay for the teacher once")
    args = p.parse_args()
    protocol = PROTOCOLS[args.protocol]
    defaults = {'epochs': protocol['epochs'], 'folds': protocol.get('folds', 4),
                'teacher_epochs': protocol.get('teacher_epochs', 12)}
    for k, v in defaults.items():  # None: the protocol's; a 0 given is refused below, not replaced
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if min(args.epochs, args.teacher_epochs, args.pilot_eval) < 1 or args.sens_seeds < 0:
        p.error(f'--epochs {args.epochs}, --teacher-epochs {args.teacher_epochs}, --pilot-eval {args.pilot_eval}, '
                f'--sens-seeds {args.sens_seeds}: need >= 1 epoch, >= 1 teacher epoch, --pilot-eval >= 1 and '
                '--sens-seeds >= 0')
    if args.pilot and (args.smoke or len(set(args.pilot)) < len(args.pilot)):
        p.error(f'--pilot {args.pilot}' + (' with --smoke: a pilot is a study of its own, run it without --smoke'
                                           if args.smoke else ': each fold once'))
    if args.folds < 2 or args.seeds < 1 or args.workers < 1:
        p.error(f'--folds {args.folds}, --seeds {args.seeds}, --workers {args.workers}: need >= 2 folds, >= 1 seed and '
                '>= 1 worker')
    if args.pilot and not all(0 <= f < args.folds for f in args.pilot):
        p.error(f'--pilot {args.pilot}: folds are numbered 0 to {args.folds - 1}')
    unknown = set(args.pilot_methods) - set(protocol['methods'])
    if unknown:
        p.error(f"--pilot-methods: unknown {sorted(unknown)}; the methods are {', '.join(protocol['methods'])}")
    extra_split = protocol.get('split', [])
    args.out = args.out or f'runs/ablation_{args.protocol}'
    study = [*protocol['study'], *SMOKE] if args.smoke else [*protocol['study'], f'train.epochs={args.epochs}',
                                                            f'eval.interval={args.epochs}']
    if args.smoke:
        args.teacher_epochs, args.sens_seeds = 1, 0
    if args.pilot:
        args.sens_seeds = 0
        study += [f'eval.interval={args.pilot_eval}']
        protocol = {**protocol, 'methods': {m: o for m, o in protocol['methods'].items()
                                        if m in args.pilot_methods or m == 'none'}}  # the pairs' reference
    out = Path(args.out).resolve()
    begin = time.perf_counter()
    # One thread per run, set before any worker imports torch: two processes with a thread pool each on 2 cores
    # spin against each other (measured: 20x slower per run).
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
    folds_run = [0] if args.smoke else args.pilot or list(range(args.folds))
    ctx = mp.get_context('spawn')
    # a new process per run, but in a smoke run (the tests), whose workers run job after job (study.runs_pool)
    with ctx.Pool(args.workers, maxtasksperchild=None if args.smoke else 1) as pool:
        teachers = pool.starmap(teacher_job, [(f, args.folds, inner, out, args.teacher_epochs, study, extra_split)
                                              for f in folds_run
                                              for inner in ((False, True) if args.sens_seeds else (False,))])
        paths = dict(teachers)
        jobs = []
        for f in folds_run:
            split = [f'data.num_folds={args.folds}', f'data.fold={f}', *extra_split]
            teacher = f"teacher.checkpoint={paths[f'teacher_f{f}']}"
            for s in range(args.seeds if not args.smoke else 1):
                for m, o in protocol['methods'].items():
                    jobs.append((f'{m}_f{f}_s{s}', [*split, teacher, f'train.seed={s}', *o], out, study))
            inner_teacher = f"teacher.checkpoint={paths.get(f'teacher_f{f}_inner')}"
            for s in range(args.sens_seeds):
                for lam, T in GRID:
                    jobs.append((f'grid_l{lam}_t{T}_f{f}_s{s}', [*split, 'data.inner_val_fraction=0.2', inner_teacher,
                                 f'train.seed={s}', 'loss.method=shake', f'loss.mutual={lam}',
                                 f'loss.temperature={T}'], out, study))
        if args.teacher_cache:
            jobs = with_teacher_caches(pool, jobs)
        records = {r['name']: r for r in pool.imap_unordered(_run, jobs)}
    records.update({name: json.loads((out / 'records' / f'{name}.json').read_text()) for name in paths})
    (out / 'runs.json').write_text(json.dumps(records, indent=2))
    elapsed = add_elapsed(out, time.perf_counter() - begin)
    print(f'[ablation] {len(records)} runs, {elapsed / 60:.1f} min of study time; records in {out}/runs.json')
    if args.pilot:
        print(pilot_report(out, records, folds_run, args.seeds, list(protocol['methods'])))
    if args.smoke or args.pilot:
        return
    summary = summarise(records, args.folds, args.seeds, args.sens_seeds)
    summary['terms'] = {m: loss_terms(out / 'runs' / f'{m}_f0_s0') for m in METHODS}
    summary['stall_updates'] = STALL_UPDATES
    summary['stalled'] = {m: sum(stalled(out / 'runs' / f'{m}_f{f}_s{s}') for f in range(args.folds)
                                 for s in range(args.seeds)) for m in METHODS}
    summary['stalled_grid'] = {f'{lam},{T}': sum(stalled(out / 'runs' / f'grid_l{lam}_t{T}_f{f}_s{s}')
                                                 for f in range(args.folds) for s in range(args.sens_seeds))
                               for lam, T in (GRID if args.sens_seeds else ())}
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    command = 'python -m benchmarks.ablation' + ''.join(f' {a}' for a in sys.argv[1:])
    protocols = load_protocols(docs / 'ablation.json')  # the other protocol's results stay beside this one's
    protocols[args.protocol] = {'command': command, 'date': date.today().isoformat(), 'summary': summary,
                                'runs': records, 'folds': args.folds, 'seeds': args.seeds,
                                'sens_seeds': args.sens_seeds, 'epochs': args.epochs, 'elapsed_s': elapsed}
    print(write_both(docs, protocols))


if __name__ == '__main__':
    main()
