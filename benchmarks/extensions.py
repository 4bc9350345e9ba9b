"""SHAKE beyond one DeiT teacher, on the digits data set: a CNN student, and a DeiT student with two teachers.

    python benchmarks/extensions.py            # 17 minutes on 2 CPU cores; writes docs/results/extensions.md

Each comparison is the quick-start recipe (configs/quickstart.yaml, its fixed 80/20 split) with the ablation study's
settings (benchmarks/ablation.py STUDY: 64-wide DeiT, 20 epochs, batch 32), run for `--seeds` seeds per method, two
runs in parallel with one thread each (shake_vit.runner.train through benchmarks/ablation.job). The teachers are
fitted once and shared: timm's test_byobnet (the quick start's) and test_efficientnet.
- CNN student: timm's test_resnet (no distillation token: the shadow head reads its pooled features), `none`
  against `shake` in both forms, for a short run (`--cnn-epochs`): with a CIFAR stem at 16 px (a 3x3 stride-1 stem
  at 32 px costs 4x as much: 1.2 s per update on this CPU) and its own 16-px test_byobnet teacher, and with its
  ImageNet stem at 32 px and the 32-px teacher.
- Two teachers: the DeiT, `none` against `shake` with one teacher and with both (paper Eq. 6), in the paper's form
  and in the authors'-code form (which the ablation found steadier).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

from ablation import METHODS, STUDY, _cpu_name, _run, add_elapsed, job  # noqa: E402

AUTHORS = METHODS['shake_authors']  # the form the ablation found steadier (docs/results/ablation.md)
CNN = ['model.name=test_resnet', 'model.kwargs={}', 'model.drop_path_rate=0', 'optim.lr=2e-3']
CIFAR_STEM = ['model.cifar_stem=true', 'data.img_size=16']  # CRD-style stem; 16 px keeps it affordable here


def teacher(name: str, model: str, out: Path, epochs: int, extra: tuple = ()) -> Path:
    job(f'teacher_{name}', ['loss.method=shake', 'train.epochs=1', 'eval.interval=1', f'teacher.name={model}',
                            f'teacher.fit.epochs={epochs}', *extra], out, STUDY)
    return out / 'runs' / f'teacher_{name}' / 'teacher.safetensors'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--cnn-epochs', type=int, default=4,
                   help='epochs of the CNN runs; short, since at 20 both none and shake reached the teacher')
    p.add_argument('--out', default='runs/extensions')
    p.add_argument('--docs', default=str(ROOT / 'docs' / 'results'))
    args = p.parse_args()
    out = Path(args.out).resolve()
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
    begin = time.perf_counter()
    with mp.get_context('spawn').Pool(2, maxtasksperchild=1) as pool:
        byob, eff, byob16 = pool.starmap(teacher, [('byob', 'test_byobnet', out, 12),
                                                    ('eff', 'test_efficientnet', out, 12),
                                                    ('byob16', 'test_byobnet', out, 12, ('data.img_size=16',))])
        t1 = [f'teacher.checkpoint={byob}']
        t2 = [*t1, f'extra_teachers=[{{name: test_efficientnet, checkpoint: {eff}}}]']
        e = args.cnn_epochs
        cnn = [*CNN, f'train.epochs={e}', f'eval.interval={e}']
        cifar = [*cnn, *CIFAR_STEM, f'teacher.checkpoint={byob16}']
        runs = {
            f'cnn_none_e{e}': [*cifar, 'loss.method=none'],
            f'cnn_shake_e{e}': [*cifar, 'loss.method=shake'],
            f'cnn_shake_authors_e{e}': [*cifar, *AUTHORS],
            # the ImageNet stem (stride 4) at 32 px: a weaker student than the 32-px teacher, unlike the CIFAR-stem one
            f'cnnstd_none_e{e}': [*cnn, 'loss.method=none'],
            f'cnnstd_shake_e{e}': [*cnn, 'loss.method=shake', *t1],
            f'cnnstd_shake_authors_e{e}': [*cnn, *AUTHORS, *t1],
            'deit_none': ['loss.method=none'],
            'deit_shake_1t': ['loss.method=shake', *t1],
            'deit_shake_2t': ['loss.method=shake', *t2],
            'deit_shake_authors_1t': [*AUTHORS, *t1],
            'deit_shake_authors_2t': [*AUTHORS, *t2],
        }
        jobs = [(f'{name}_s{s}', [*o, f'train.seed={s}'], out, STUDY) for s in range(args.seeds)
                for name, o in runs.items()]
        records = {r['name']: r for r in pool.imap_unordered(_run, jobs)}
    elapsed = add_elapsed(out, time.perf_counter() - begin)
    teachers = {n: json.loads((out / 'records' / f'teacher_{n}.json').read_text())['teacher_top1']
                for n in ('byob', 'eff', 'byob16')}
    rows = {}
    for name in runs:
        rs = [records[f'{name}_s{s}'] for s in range(args.seeds)]
        rows[name] = {h: (statistics.fmean(r[f'top1_{h}'] for r in rs),
                          statistics.stdev(r[f'top1_{h}'] for r in rs) if len(rs) > 1 else 0.0,
                          [round(r[f'top1_{h}'], 2) for r in rs]) for h in ('cls', 'shadow', 'avg')}
    command = 'python benchmarks/extensions.py' + ''.join(f' {a}' for a in sys.argv[1:])
    lines = ['# SHAKE for a CNN student and with two teachers (digits)', '', f'Command: `{command}`  ',
             f'Machine: {os.cpu_count()} CPU cores ({_cpu_name()}), two runs in parallel, one thread each; '
             f'{date.today().isoformat()}; {elapsed / 60:.0f} min in all.', '',
             'The quick start\'s digits split (1,437 train / 360 test images), '
             f'{args.seeds} seeds per row; test top-1 (%), mean +- std, then each seed. Teachers fitted once on the '
             f"training split: test_byobnet {teachers['byob']:.2f}, test_efficientnet {teachers['eff']:.2f}, 16-px "
             f"test_byobnet (the CNN's) {teachers['byob16']:.2f}.", '',
             '| run | cls head | shadow head(s) | average of heads | cls head per seed |',
             '| --- | --- | --- | --- | --- |']
    cnn = f'CNN (test_resnet, CIFAR stem, 16 px, {e} epochs)'
    std = f'CNN (test_resnet, ImageNet stem, 32 px, {e} epochs)'
    labels = {f'cnn_none_e{e}': f'{cnn}, none', f'cnn_shake_e{e}': f'{cnn}, shake',
              f'cnn_shake_authors_e{e}': f"{cnn}, shake, authors' form", f'cnnstd_none_e{e}': f'{std}, none',
              f'cnnstd_shake_e{e}': f'{std}, shake', f'cnnstd_shake_authors_e{e}': f"{std}, shake, authors' form",
              'deit_none': 'DeiT (64 wide), none', 'deit_shake_1t': 'DeiT, shake, one teacher (test_byobnet)',
              'deit_shake_2t': 'DeiT, shake, two teachers (+ test_efficientnet)',
              'deit_shake_authors_1t': "DeiT, shake, authors' form, one teacher",
              'deit_shake_authors_2t': "DeiT, shake, authors' form, two teachers"}
    for name, r in rows.items():
        lines.append(f"| {labels[name]} | {r['cls'][0]:.2f} +- {r['cls'][1]:.2f} | {r['shadow'][0]:.2f} +- "
                     f"{r['shadow'][1]:.2f} | {r['avg'][0]:.2f} +- {r['avg'][1]:.2f} | {r['cls'][2]} |")
    lines += ['', 'With two teachers the shadow-head column is the first shadow head (`top1_shadow`); '
              'extensions.json beside this file holds every head of every run, `top1_shadow_1` included.', '']
    notes = Path(args.docs) / 'extensions_notes.md'  # the hand-written reading of the table, kept across reruns
    if notes.is_file():
        lines.append(notes.read_text())
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / 'extensions.md').write_text('\n'.join(lines))
    (docs / 'extensions.json').write_text(json.dumps({'command': command, 'rows': rows, 'teachers': teachers,
                                                      'runs': records}, indent=2))
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
