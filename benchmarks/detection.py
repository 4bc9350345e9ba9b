"""Does SHAKE help a Faster R-CNN student? `none`, `kd` and `shake` on the embedded digit scenes, seed by seed.

    python benchmarks/detection.py            # about 40 minutes on 2 CPU cores; writes docs/results/detection.md
    python benchmarks/detection.py --smoke    # one seed, a few updates (tests/test_benchmarks.py runs it)

Protocol. Every run is configs/det_quickstart.yaml (640 digit scenes, a ResNet-18 FPN teacher 128/256 wide, a
student 64/128 wide, SGD momentum) with the changes in STUDY: a teacher fitted once on the training scenes and shared
by every run, then the student for STUDENT_EPOCHS epochs with each method on `--seeds` seeds. Methods are compared
seed by seed (paired differences of the student's own AP, 95% t-interval). Two runs share the machine at a time (one
thread each), so wall time per run, relative to `none`, is coarse; the training throughput (images/s) is each run's
own.

Writes OUT/runs.json (one record per run, reused when rerun) and, unless --smoke, the report docs/results/detection.md
with its data beside it (detection.json).
"""
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

from ablation import (_cpu_name, add_elapsed, paired, study_args, teacher_then_methods,  # noqa: E402
                      write_report)

BASE = str(ROOT / 'configs' / 'det_quickstart.yaml')
STUDENT_EPOCHS = 6
TEACHER_EPOCHS = 5
STUDY = ['det.scenes=[640,200]', f'train.epochs={STUDENT_EPOCHS}', f'eval.interval={STUDENT_EPOCHS}',
         'train.log_interval=10', 'ckpt.keep_last=1', 'train.cpu_threads=1']
METHODS = {  # name: (label, overrides)
    'none': ('none (the detector\'s own losses)', ['loss.method=none']),
    'kd': ('kd (KL + box distance to the predictor)', ['loss.method=kd']),
    'shake': ('SHAKE (shadow box predictor)', ['loss.method=shake']),
}
HEADS = ('ap', 'ap50', 'ap75')


def report(records: dict, seeds: int, teacher: dict, command: str, elapsed: float) -> tuple:
    runs = {m: [records[f'{m}_s{s}'] for s in range(seeds)] for m in METHODS}
    ap = {m: [r['student_ap'] for r in rs] for m, rs in runs.items()}
    wall = {m: statistics.median(r['wall_s'] for r in rs) for m, rs in runs.items()}
    summary = {m: {**{k: {'mean': statistics.fmean(r[f'student_{k}'] for r in rs),
                          'std': statistics.stdev(r[f'student_{k}'] for r in rs) if len(rs) > 1 else 0.0}
                      for k in HEADS},
                   'runs': ap[m], 'vs_none': paired(ap[m], ap['none']), 'vs_kd': paired(ap[m], ap['kd']),
                   'time_vs_none': wall[m] / wall['none'],
                   'images_per_sec': statistics.median(r['train_images_per_sec'] for r in rs)}
               for m, rs in runs.items()}
    shadow = [r['shadow_ap'] for r in runs['shake']]
    summary['shake']['shadow_ap'] = statistics.fmean(shadow)
    summary['shake']['student_vs_shadow'] = paired(ap['shake'], shadow)

    def ci(d):
        return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}], {d['wins']} of {d['n']}"
    lines = ['# Does SHAKE help a Faster R-CNN student? (digit scenes)', '', f'Command: `{command}`  ',
             f'Machine: {os.cpu_count()} CPU cores ({_cpu_name()}), two runs in parallel, one thread each; '
             f'{date.today().isoformat()}; {elapsed / 60:.0f} min in all.', '',
             'Protocol: configs/det_quickstart.yaml with ' + ' '.join(f'`{o}`' for o in STUDY[:1]) +
             ': 640 training scenes, 200 test scenes (128 px, 1-4 digits each, from disjoint digit images); a '
             f'ResNet-18 FPN teacher (FPN 128, box head 256) fitted once for {TEACHER_EPOCHS} epochs (test AP '
             f'{teacher["teacher_ap"]:.2f}, AP50 {teacher["teacher_ap50"]:.2f}), a narrower student (FPN 64, box '
             'head 128) trained from scratch for '
             f'{STUDENT_EPOCHS} epochs (SGD momentum, lr 0.02, batch 8), {seeds} seeds per method. COCO AP of the '
             "student's own box predictor (%), mean +- std; differences are paired by seed (mean, 95% t-interval, "
             'seeds ahead).', '',
             '| method | AP | AP50 | AP75 | AP per seed | vs none | vs kd | wall time vs none | train images/s |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for m, (label, _) in METHODS.items():
        r = summary[m]
        lines.append(f"| {label} | {r['ap']['mean']:.2f} +- {r['ap']['std']:.2f} | {r['ap50']['mean']:.2f} | "
                     f"{r['ap75']['mean']:.2f} | {', '.join(f'{v:.2f}' for v in r['runs'])} | "
                     f"{ci(r['vs_none']) if m != 'none' else ''} | {ci(r['vs_kd']) if m != 'kd' else ''} | "
                     f"x{r['time_vs_none']:.2f} | {r['images_per_sec']:.1f} |")
    lines += ['', f"SHAKE's shadow predictor: AP {summary['shake']['shadow_ap']:.2f}; the student's predictor minus "
              f"the shadow's: {ci(summary['shake']['student_vs_shadow'])}.", '']
    return '\n'.join(lines) + '\n', summary


def main() -> None:
    args = study_args(__doc__, seeds=3, out='runs/detection_study')
    seeds = 1 if args.smoke else args.seeds
    study = [*STUDY, 'train.epochs=2', 'eval.interval=1', 'train.max_updates_per_epoch=2'] if args.smoke else STUDY
    teacher_epochs = 1 if args.smoke else TEACHER_EPOCHS
    # the smoke overlay: tiny scenes and detectors, nothing downloaded
    base = [BASE, str(ROOT / 'configs' / 'smoke_det.yaml')] if args.smoke else BASE
    if args.smoke:
        study = [s for s in study if not s.startswith('det.scenes')]
    out = Path(args.out).resolve()
    begin = time.perf_counter()
    teacher, records = teacher_then_methods(out, study, base, teacher_epochs, METHODS, seeds)
    elapsed = add_elapsed(out, time.perf_counter() - begin)
    print(f'[detection] {len(records)} runs, {elapsed / 60:.1f} min of study time; records in {out}/runs.json; '
          f"teacher AP {teacher['teacher_ap']:.2f}")
    if args.smoke:
        return
    command = 'python benchmarks/detection.py' + ''.join(f' {a}' for a in sys.argv[1:])
    text, summary = report(records, seeds, teacher, command, elapsed)
    write_report(args.docs, 'detection', text,
                 {'command': command, 'teacher': teacher, 'summary': summary, 'runs': records})


if __name__ == '__main__':
    main()
