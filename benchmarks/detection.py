"""Does SHAKE help a Faster R-CNN student? `none`, `kd` and `shake`, their old forms and each new switch, on the
embedded digit scenes, seed by seed.

    python -m benchmarks.detection                          # every group of rows; writes docs/results/detection.md
    python -m benchmarks.detection --groups main,old        # some groups: records are kept, so later calls add rows
    python -m benchmarks.detection --smoke                  # one seed, a few updates (tests/test_benchmarks.py)

Protocol. Every run is configs/det_quickstart.yaml (640 digit scenes, a ResNet-18 FPN teacher 128/256 wide fitted
once for TEACHER_EPOCHS epochs and shared by every run, a student 64/128 wide, SGD momentum, STUDENT_EPOCHS epochs)
in one of two settings: `pretrained`, the quick start's (the student's ResNet-18 pretrained on the training scenes'
digits, det.backbone_weights=digits, done once and shared), and `scratch` (a random backbone). The rows of ROWS,
each on its group's seeds (GROUPS), are compared seed by seed (paired differences of the student's own AP, 95%
t-interval). Two runs share the machine at a time (one thread each), so wall time per run, relative to `none`, is
coarse; the training throughput (images/s) is each run's own.

Writes OUT/runs.json (one record per run; OUT/records/ keeps them, so a rerun or another --groups call reuses every
finished run) and, unless --smoke, docs/results/detection.md with its data beside it (detection.json).
"""
import json
import math
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.study import ROOT, _cpu_name, _run, add_elapsed, job, paired, runs_pool, study_args, write_report

BASE = str(ROOT / 'configs' / 'det_quickstart.yaml')
STUDENT_EPOCHS = 6
TEACHER_EPOCHS = 5
STUDY = ['det.scenes=[640,200]', f'train.epochs={STUDENT_EPOCHS}', f'eval.interval={STUDENT_EPOCHS}',
         'train.log_interval=10', 'ckpt.keep_last=1', 'train.cpu_threads=1']
GROUPS = {'main': 5, 'old': 3, 'scratch': 3, 'switches': 3}  # group: seeds
SCRATCH = ['det.backbone_weights=null']
OLD_SHAKE = ['loss.shadow_anchor=0', 'loss.mutual_shadow=1']  # the first detection SHAKE (before issue 22)
FIRST = 'loss.mutual_shadow=0.1'  # the issue-22 default the switch rows vary one switch of (0 since the study)
ROWS = {  # name: (label, group, overrides)
    'none': ("none (the detector's own losses)", 'main', ['loss.method=none']),
    'kd': ('kd (KL and box distance added to the detector\'s losses)', 'main', ['loss.method=kd']),
    'shake': ('SHAKE, shadow <- student 0.1 (the default the switches vary)', 'main', ['loss.method=shake', FIRST]),
    'shake_old': ('SHAKE, first defaults (no anchor, mutual 1 both ways)', 'old', ['loss.method=shake', *OLD_SHAKE]),
    'scratch_none': ('none, from scratch', 'scratch', ['loss.method=none', *SCRATCH]),
    'scratch_kd': ('kd, from scratch', 'scratch', ['loss.method=kd', *SCRATCH]),
    'scratch_shake': ('SHAKE, from scratch, shadow <- student 0.1', 'scratch', ['loss.method=shake', *SCRATCH, FIRST]),
    'scratch_shake_ms0': ('SHAKE, from scratch, shadow <- student 0 (the default)', 'scratch',
                          ['loss.method=shake', *SCRATCH, 'loss.mutual_shadow=0']),
    'shake_no_anchor': ('SHAKE without the anchor', 'switches', ['loss.method=shake', 'loss.shadow_anchor=0', FIRST]),
    # the best switch on its 3 seeds, confirmed on the main rows' two other seeds: the default since
    'shake_ms0': ('SHAKE, shadow <- student 0 (the default)', 'main', ['loss.method=shake', 'loss.mutual_shadow=0']),
    'shake_ms1': ('SHAKE, shadow <- student 1', 'switches', ['loss.method=shake', 'loss.mutual_shadow=1']),
    'shake_chen': ('SHAKE, Chen balance (0.5 CE + 0.5 KL)', 'switches',
                   ['loss.method=shake', 'loss.det_balance=chen', FIRST]),
    'kd_chen': ('kd, Chen balance (0.5 CE + 0.5 KL)', 'switches', ['loss.method=kd', 'loss.det_balance=chen']),
    'shake_defeat': ('SHAKE, DeFeat balance', 'switches', ['loss.method=shake', 'loss.det_balance=defeat', FIRST]),
    'kd_defeat': ('kd, DeFeat balance', 'switches', ['loss.method=kd', 'loss.det_balance=defeat']),
    'shake_bounded': ('SHAKE, teacher-bounded box term', 'switches',
                      ['loss.method=shake', 'loss.det_box=bounded', FIRST]),
}
# each row against: the setting's none, and its kd
BASELINES = {'scratch': ('scratch_none', 'scratch_kd')}
HEADS = ('ap', 'ap50', 'ap75')
SMOKE_ROWS = ('none', 'kd', 'shake_ms0')  # --smoke: each method once, SHAKE at its default


def run_rows(out: Path, study: list, base, groups: list, teacher_epochs: int, seeds: dict, only=None,
             smoke: bool = False) -> tuple:
    """The shared backbone and teacher (a 1-epoch kd run of the quick start pretrains the backbone on the digits,
    fits the teacher and saves both), then every row of `groups` on its seeds (`only`: those rows alone), two runs at
    a time."""
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
    with runs_pool(smoke) as pool:
        pool.apply(job, ('teacher', ['loss.method=kd', 'train.epochs=1', 'eval.interval=1',
                                               f'teacher.fit.epochs={teacher_epochs}'], out, study, base))
        shared = out / 'runs' / 'teacher'
        common = [f"teacher.checkpoint={shared / 'teacher.safetensors'}",
                  f"det.backbone_weights={shared / 'backbone' / 'student.safetensors'}"]
        jobs = [(f'{name}_s{s}', [*common, *overrides, f'train.seed={s}'], out, study, base)
                for group in groups for s in range(seeds[group])
                for name, (_, g, overrides) in ROWS.items() if g == group and (only is None or name in only)]
        records = {r['name']: r for r in pool.imap_unordered(_run, jobs)}
    return shared_records(out), records


def shared_records(out: Path) -> dict:
    """The shared teacher's record, with its backbone pretraining's top-1."""
    teacher = json.loads((out / 'records' / 'teacher.json').read_text())
    backbone = json.loads((out / 'runs' / 'teacher' / 'backbone' / 'backbone.json').read_text())
    return {**teacher, 'backbone_top1': backbone['top1']}


def summarise(records: dict, seeds: dict) -> dict:
    summary = {}
    for name, (label, group, _) in ROWS.items():
        runs = [records.get(f'{name}_s{s}') for s in range(seeds[group])]
        runs = runs[:runs.index(None)] if None in runs else runs  # the seeds done, in order (a study cut short)
        if len(runs) < 2:
            continue
        failed = [(s, r['failed']) for s, r in enumerate(runs) if 'failed' in r]
        if failed:  # diverged (a NaN loss): reported as such, with no statistics
            summary[name] = {'label': label, 'group': group, 'failed': failed,
                             'runs': [r.get('student_ap') for r in runs]}
            continue
        none, kd = BASELINES.get(group, ('none', 'kd'))
        summary[name] = {'label': label, 'group': group,
                         **{k: {'mean': statistics.fmean(r[f'student_{k}'] for r in runs),
                                'std': statistics.stdev(r[f'student_{k}'] for r in runs) if len(runs) > 1 else 0.0}
                            for k in HEADS},
                         'runs': [r['student_ap'] for r in runs],
                         'wall_s': statistics.median(r['wall_s'] for r in runs),
                         'images_per_sec': statistics.median(r['train_images_per_sec'] for r in runs)}
        if 'shadow_ap' in runs[0]:
            shadow = [r['shadow_ap'] for r in runs]
            d = paired(summary[name]['runs'], shadow)
            summary[name].update(shadow_ap=statistics.fmean(shadow), shadow_ap_runs=shadow, student_vs_shadow={
                'mean': d['mean'], 'lo': d['ci95'][0], 'hi': d['ci95'][1], 'n': d['n'], 'wins': d['wins']})
        summary[name]['baselines'] = (none, kd)
    for name, row in summary.items():
        if 'failed' in row:
            continue
        for key, base in zip(('vs_none', 'vs_kd'), row['baselines']):
            if base in summary and base != name and 'failed' not in summary[base]:
                n = min(len(row['runs']), len(summary[base]['runs']))  # paired by seed, on the seeds both have
                diff = paired(row['runs'][:n], summary[base]['runs'][:n])
                row[key] = {'mean': diff['mean'], 'lo': diff['ci95'][0], 'hi': diff['ci95'][1], 'n': n,
                            'wins': diff['wins']}
        if base_wall := summary.get(row['baselines'][0], {}).get('wall_s'):
            row['time_vs_none'] = row['wall_s'] / base_wall
    return summary


def _ci(d: dict) -> str:
    if not d or math.isnan(d['lo']):
        return f"{d['mean']:+.2f}" if d else ''
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}], {d['wins']} of {d['n']}"


def report(summary: dict, teacher: dict, command: str, elapsed: float, seeds: dict) -> str:
    lines = ['# Does SHAKE help a Faster R-CNN student? (digit scenes)', '', f'Command: `{command}`  ',
             f'Machine: {os.cpu_count()} CPU cores ({_cpu_name()}), two runs in parallel, one thread each; '
             f'{date.today().isoformat()}; {elapsed / 60:.0f} min of study time in all.', '',
             'Protocol: configs/det_quickstart.yaml with `det.scenes=[640,200]`: 640 training scenes, 200 test '
             'scenes (128 px, 1-4 digits each, from disjoint digit images). One ResNet-18 FPN teacher (FPN 128, box '
             f'head 256) fitted for {TEACHER_EPOCHS} epochs from scratch, as the quick start fits it (test AP '
             f"{teacher['teacher_ap']:.2f}, AP50 {teacher['teacher_ap50']:.2f}), shared by every run; the backbone "
             f"pretraining (ResNet-18 on the training scenes' digits, 32 px): top-1 {teacher['backbone_top1']:.2f}% "
             f'on the held-out digits. A narrower student (FPN 64, box head 128), {STUDENT_EPOCHS} epochs (480 '
             'updates, SGD momentum, lr 0.02, batch 8), from the digits-pretrained backbone (the quick start\'s '
             'setting) or from scratch. COCO AP of the student\'s own box predictor (%), mean +- std over seeds; '
             'differences are paired by seed (mean, 95% t-interval, seeds ahead) against the same setting\'s none '
             'and kd.', '']
    groups = {'main': f"Main rows (the quick start's setting, {seeds['main']} seeds planned)",
              'old': f"The first detection forms, for comparison ({seeds['old']} seeds planned)",
              'switches': "Each switch against the issue-22 defaults, shadow <- student 0.1 "
                          f"({seeds['switches']} seeds planned)",
              'scratch': f"The other setting: students from a random backbone ({seeds['scratch']} seeds planned)"}
    for group, title in groups.items():
        rows = [(n, r) for n, r in summary.items() if r['group'] == group]
        if not rows:
            lines += [f'## {title}', '', 'Not run yet (`--groups ' + group + '`).', '']
            continue
        lines += [f'## {title}', '', '| row | AP | AP50 | AP75 | AP per seed | vs none | vs kd | shadow AP | '
                  'wall time vs none | train images/s |', '|' + ' --- |' * 10]
        for name, r in rows:
            if 'failed' in r:
                failed = dict(r['failed'])
                seen = ', '.join(f"NaN loss at {failed[s].rsplit(' at ', 1)[-1].split(' (')[0]}" if s in failed
                                 else f'{ap:.2f}' for s, ap in enumerate(r['runs']))
                lines.append(f"| {r['label']} | diverged in {len(failed)} of {len(r['runs'])} seeds | | | {seen} | | | "
                             '| | |')
                continue
            shadow = f"{r['shadow_ap']:.2f}" if 'shadow_ap' in r else ''
            lines.append(f"| {r['label']} | {r['ap']['mean']:.2f} +- {r['ap']['std']:.2f} | {r['ap50']['mean']:.2f} | "
                         f"{r['ap75']['mean']:.2f} | {', '.join(f'{v:.2f}' for v in r['runs'])} | "
                         f"{_ci(r.get('vs_none'))} | {_ci(r.get('vs_kd'))} | {shadow} | "
                         f"x{r.get('time_vs_none', float('nan')):.2f} | {r['images_per_sec']:.1f} |")
        lines.append('')
    if 'shake' in summary:
        lines += [f"SHAKE's shadow predictor (main rows): AP {summary['shake']['shadow_ap']:.2f}; the student's "
                  f"predictor minus the shadow's: {_ci(summary['shake']['student_vs_shadow'])}.", '']
    return '\n'.join(lines) + '\n'


def main() -> None:
    args = study_args(__doc__, seeds=0, out='runs/detection_study', groups=','.join(GROUPS), report_only=True)
    seeds = {g: (1 if args.smoke else (args.seeds or n)) for g, n in GROUPS.items()}
    groups = ['main'] if args.smoke else [g for g in args.groups.split(',') if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f'--groups: {unknown} are not groups of rows; choose from {", ".join(GROUPS)}')
    study = [*STUDY, 'train.epochs=2', 'eval.interval=1', 'train.max_updates_per_epoch=2',
             'det.backbone_fit.epochs=1'] if args.smoke else STUDY
    base = [BASE, str(ROOT / 'configs' / 'smoke_det.yaml')] if args.smoke else BASE  # tiny scenes and detectors
    if args.smoke:
        study = [s for s in study if not s.startswith('det.scenes')] + ['det.backbone_weights=digits']
    out = Path(args.out).resolve()
    begin = time.perf_counter()
    if args.report_only:  # the report of the finished runs, e.g. after a study stopped part-way
        teacher, records = shared_records(out), {}
    else:
        teacher, records = run_rows(out, study, base, groups, 1 if args.smoke else TEACHER_EPOCHS, seeds,
                                    only=SMOKE_ROWS if args.smoke else None, smoke=args.smoke)
    elapsed = add_elapsed(out, time.perf_counter() - begin)
    everything = {json.loads(p.read_text())['name']: json.loads(p.read_text())
                  for p in (out / 'records').glob('*.json')}  # earlier calls' rows too
    (out / 'runs.json').write_text(json.dumps(everything, indent=2))
    print(f'[detection] {len(records)} runs this call, {elapsed / 60:.1f} min of study time; records in '
          f"{out}/runs.json; teacher AP {teacher['teacher_ap']:.2f}")
    if args.smoke:
        return
    summary = summarise(everything, seeds)
    command = 'python -m benchmarks.detection' + ''.join(f' {a}' for a in sys.argv[1:])
    write_report(args.docs, 'detection', report(summary, teacher, command, elapsed, seeds),
                 {'command': command, 'teacher': teacher, 'summary': summary, 'runs': everything})


if __name__ == '__main__':
    main()
