"""The ablation's figure (benchmarks/ablation.py): one row per protocol, every run, the paired differences, the
sensitivity grid."""
import math
import statistics
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple


def figure(summaries: Dict[str, dict], path: Path, labels: Dict[str, str], grid: List[Tuple[float, float]]) -> None:
    """One row per protocol. Left: every run's cls-head top-1 per method (dots) with the mean; middle: the paired
    difference of the cls head against `none` and `deit_hard` with its 95% interval; right: the sensitivity grid,
    where the protocol ran one."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = len(summaries)
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.4 * rows), gridspec_kw={'width_ratios': [1.4, 1.4, 1]},
                             squeeze=False)
    for (name, summary), (ax, cx, bx) in zip(summaries.items(), axes):
        label = textwrap.fill(labels.get(name, name), 70)  # a long label would run off the panel
        methods = list(summary['main'])
        runs = [summary['main'][m]['cls']['runs'] for m in methods]
        floor = math.floor(statistics.median(v for r in runs for v in r) - 8)  # runs below it are drawn on it
        for j, r in enumerate(runs):
            ax.scatter([j + 0.06 * (i % 5 - 2) for i in range(len(r))], [max(v, floor) for v in r], s=14, alpha=0.7)
            ax.hlines(statistics.fmean(r), j - 0.3, j + 0.3, color='black')
            for v in r:
                if v < floor:
                    ax.annotate(f'{v:.1f}', (j, floor), textcoords='offset points', xytext=(6, 2), fontsize=8)
        ax.set_ylim(floor - 0.5, 100)
        ax.set_xticks(range(len(methods)), methods, rotation=15)
        ax.set_ylabel('test top-1 of the cls head (%)')
        ax.set_title(f'{label}\nevery run (dots; below the axis: at its floor), mean (bar)', fontsize=9)
        for ref, dx in (('none', -0.12), ('deit_hard', 0.12)):
            d = [summary['main'][m][f'vs_{ref}']['cls'] for m in methods]
            mean = [x['mean'] for x in d]
            err = [[x['mean'] - x['ci95'][0] for x in d], [x['ci95'][1] - x['mean'] for x in d]]
            cx.errorbar([j + dx for j in range(len(methods))], mean, yerr=err, fmt='o', capsize=3,
                        label=f'vs {ref}')
        cx.axhline(0, color='grey', lw=0.8)
        cx.set_ylim(-5, 5)
        cx.set_xticks(range(len(methods)), methods, rotation=15)
        cx.set_ylabel('cls top-1 difference (points), 95% CI')
        cx.set_title('Paired by fold and seed (clipped at +-5)', fontsize=9)
        cx.legend(loc='lower left', fontsize=8)
        if not summary['grid']:
            bx.axis('off')
            continue
        lams, temps = sorted({lam for lam, _ in grid}), sorted({t for _, t in grid})
        cells = [[summary['grid'][f'{lam},{t}']['cls'] for lam in lams] for t in temps]
        im = bx.imshow(cells, cmap='viridis')
        bx.set_xticks(range(len(lams)), [f'lambda {lam:g}' for lam in lams], fontsize=8)
        bx.set_yticks(range(len(temps)), [f'T={t:g}' for t in temps])
        for r, row in enumerate(cells):
            for c, v in enumerate(row):
                bx.text(c, r, f'{v:.2f}', ha='center', va='center', color='white')
        bx.set_title('shake, cls head, inner validation (%)', fontsize=9)
        fig.colorbar(im, ax=bx, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
