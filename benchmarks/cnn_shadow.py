"""Which shadow head serves a CNN student? SHAKE with the pooled-feature head and with the authors' proxy teacher, each
with the paper's loss and with the authors' (the CIFAR-100 recipes'), against `none` and `kd`, on the embedded digits,
with CRD's networks and the CIFAR-100 recipe's protocol.

    python -m benchmarks.cnn_shadow            # about 20 minutes on 2 CPU cores; writes docs/results/cnn_shadow.md
    python -m benchmarks.cnn_shadow --smoke    # one seed, a few updates (tests/test_benchmarks.py runs it)

Protocol. Every run is configs/cifar100_wrn_40_2_wrn_16_2.yaml (CRD's SGD protocol, the authors' SHAKE loss) on the
digits with the changes in STUDY: a CRD resnet56 teacher fitted once on the training split and shared by every run,
a CRD resnet8 student for 30 epochs. The training split is 20% of the 1,797 images (359), the test split the other
1,438: with the full 80% a resnet8 alone reaches 97.8 in 8 epochs, close to its teacher, and distillation has no room
(the lesson of docs/results/extensions.md); with 20% it stays ~2 points below its teacher. Each method runs on
`--seeds` seeds; methods are compared seed by seed (paired differences, 95% t-interval). Wall time per run is
relative to `kd`, both from runs that share the machine two at a time (one thread each), so it is coarse: the
step-time benchmark (benchmarks/step_throughput.py --preset cifar) measures cost properly.

Writes OUT/runs.json (one record per run, reused when rerun) and, unless --smoke, the report docs/results/cnn_shadow.md
with its data beside it (cnn_shadow.json).
"""
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.study import ROOT, _cpu_name, add_elapsed, paired, study_args, teacher_then_methods, write_report

BASE = str(ROOT / 'configs' / 'cifar100_wrn_40_2_wrn_16_2.yaml')
STUDY = ['data.name=digits', 'data.val_fraction=0.8', 'data.img_size=32', 'data.num_workers=0', 'aug.hflip=0',
         'model.name=cifar_resnet8', 'teacher.name=cifar_resnet56', 'teacher.fit.sched=cosine', 'train.epochs=30',
         'optim.decay_milestones=[20,25]', 'eval.interval=30', 'train.log_interval=10', 'ckpt.keep_last=1',
         'train.cpu_threads=1']
SMOKE = ['train.epochs=1', 'eval.interval=1', 'train.max_updates_per_epoch=2', 'data.val_fraction=0.1']
PAPER = ['loss.method=shake', 'loss.standardize=false', 'loss.teacher_loss=kl', 'loss.shadow_ce=0']  # Eq. 5
METHODS = {  # name: (label, overrides); the recipe's loss is the authors' form
    'none': ('none (labels only)', ['loss.method=none']),
    'kd': ('kd (Hinton, a 0.9, T 4)', ['loss.method=kd']),
    'shake_pooled_paper': ("SHAKE, paper's loss, pooled-feature head", [*PAPER, 'model.shadow_on=pooled']),
    'shake_proxy_paper': ("SHAKE, paper's loss, proxy-teacher head", [*PAPER, 'model.shadow_on=teacher']),
    'shake_pooled_authors': ("SHAKE, authors' loss, pooled-feature head", ['loss.method=shake',
                                                                          'model.shadow_on=pooled']),
    'shake_proxy_authors': ("SHAKE, authors' loss, proxy-teacher head", ['loss.method=shake',
                                                                         'model.shadow_on=teacher']),
}
TEACHER_EPOCHS = 60


def report(records: dict, seeds: int, teacher_top1: float, command: str, elapsed: float) -> tuple:
    runs = {m: [records[f'{m}_s{s}'] for s in range(seeds)] for m in METHODS}
    top1 = {m: [r['top1_cls'] for r in rs] for m, rs in runs.items()}
    wall = {m: statistics.median(r['wall_s'] for r in rs) for m, rs in runs.items()}
    summary = {m: {'mean': statistics.fmean(v), 'std': statistics.stdev(v) if len(v) > 1 else 0.0, 'runs': v,
                   'vs_none': paired(v, top1['none']), 'vs_kd': paired(v, top1['kd']),
                   'time_vs_kd': wall[m] / wall['kd']} for m, v in top1.items()}
    for form in ('paper', 'authors'):
        summary[f'proxy_vs_pooled_{form}'] = paired(top1[f'shake_proxy_{form}'], top1[f'shake_pooled_{form}'])

    def ci(d):
        return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}], {d['wins']} of {d['n']}"
    lines = ['# Which shadow head serves a CNN student? (digits)', '', f'Command: `{command}`  ',
             f'Machine: {os.cpu_count()} CPU cores ({_cpu_name()}), two runs in parallel, one thread each; '
             f'{date.today().isoformat()}; {elapsed / 60:.0f} min in all.', '',
             "Protocol: configs/cifar100_wrn_40_2_wrn_16_2.yaml (CRD's SGD protocol, lr 0.05) on the digits: 359 "
             'training images (20%), 1,438 test images; a CRD resnet56 teacher fitted once for '
             f'{TEACHER_EPOCHS} epochs (test top-1 {teacher_top1:.2f}), a CRD resnet8 student for 30 epochs, '
             f'{seeds} seeds per method. Test top-1 of the cls head (%), mean +- std; differences are paired by '
             'seed (mean, 95% t-interval, seeds ahead).', '',
             '| method | cls top-1 | per seed | vs none | vs kd | wall time vs kd |',
             '| --- | --- | --- | --- | --- | --- |']
    for m, (label, _) in METHODS.items():
        r = summary[m]
        lines.append(f"| {label} | {r['mean']:.2f} +- {r['std']:.2f} | {', '.join(f'{v:.2f}' for v in r['runs'])} | "
                     f"{ci(r['vs_none']) if m != 'none' else ''} | {ci(r['vs_kd']) if m != 'kd' else ''} | "
                     f"x{r['time_vs_kd']:.2f} |")
    lines += ['', 'Proxy-teacher head minus pooled-feature head, with the paper\'s loss: '
              f"{ci(summary['proxy_vs_pooled_paper'])}; with the authors' loss: "
              f"{ci(summary['proxy_vs_pooled_authors'])}.", '']
    return '\n'.join(lines) + '\n', summary


def main() -> None:
    args = study_args(__doc__, seeds=5, out='runs/cnn_shadow', teacher_cache=True)
    study = [*STUDY, *SMOKE] if args.smoke else STUDY
    seeds, teacher_epochs = (1, 1) if args.smoke else (args.seeds, TEACHER_EPOCHS)
    out = Path(args.out).resolve()
    begin = time.perf_counter()
    teacher, records = teacher_then_methods(out, study, BASE, teacher_epochs, METHODS, seeds, args.teacher_cache,
                                            smoke=args.smoke)
    elapsed = add_elapsed(out, time.perf_counter() - begin)
    print(f'[cnn_shadow] {len(records)} runs, {elapsed / 60:.1f} min of study time; records in {out}/runs.json')
    if args.smoke:
        return
    command = 'python -m benchmarks.cnn_shadow' + ''.join(f' {a}' for a in sys.argv[1:])
    text, summary = report(records, seeds, teacher['teacher_top1'], command, elapsed)
    write_report(args.docs, 'cnn_shadow', text, {'command': command, 'summary': summary, 'runs': records})


if __name__ == '__main__':
    main()
