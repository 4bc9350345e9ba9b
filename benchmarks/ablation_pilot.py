"""The low-data protocol's pilot table (`python -m benchmarks.ablation --pilot FOLD ...`): each run's test curve, and
the pairs a +-0.5-point interval would need at the paired sd the pilot measured."""
import math
from pathlib import Path
from typing import Dict, List

from benchmarks.study import _mean, _std, logged


def pilot_report(out: Path, records: Dict[str, dict], folds: List[int], seeds: int, methods: List[str]) -> str:
    """Each pilot run's test top-1 (cls head) at every evaluation, and each method's paired differences against
    `none`: their mean, sd, and the pairs a 95% interval of +-0.5 points would need at that sd."""
    lines = ['| run | test top-1 (cls) at each evaluation (update: %) | final |', '| --- | --- | --- |']
    for name in sorted(r for r in records if not r.startswith('teacher')):
        points = logged(out / 'runs' / name).get('val/top1_cls', [])
        curve = ', '.join(f'{step}: {value:.1f}' for step, value in sorted(points))
        lines.append(f"| {name} | {curve} | {records[name]['top1_cls']:.2f} |")
    lines += ['', '| method | mean | vs none: mean diff | sd of the paired diffs | pairs | pairs for +-0.5 |',
              '| --- | --- | --- | --- | --- | --- |']
    keys = [(f, s) for f in folds for s in range(seeds)]
    base = [records[f'none_f{f}_s{s}']['top1_cls'] for f, s in keys]
    for m in methods:
        runs = [records[f'{m}_f{f}_s{s}']['top1_cls'] for f, s in keys]
        d = [a - b for a, b in zip(runs, base)]
        sd = _std(d) if m != 'none' and len(d) > 1 else float('nan')  # one pair: no sd
        need = math.ceil((1.96 * sd / 0.5) ** 2) if sd == sd else '-'
        spread = f'{sd:.2f}' if sd == sd else '-'
        lines.append(f'| {m} | {_mean(runs):.2f} | {_mean(d):+.2f} | {spread} | {len(d)} | {need} |')
    return '\n'.join(lines)
