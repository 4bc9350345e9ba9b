"""The benchmark scripts run (one step, tiny models), so they cannot rot; their figures live in docs/benchmarks.md."""
import subprocess
import sys

from helpers import ROOT

TINY = ['--set', 'data.img_size=32', '--set', 'model.kwargs.depth=1', '--set', 'model.kwargs.embed_dim=32',
        '--set', 'model.kwargs.num_heads=2', '--set', 'teacher.name=test_byobnet', '--set', 'train.batch_size=4']


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_step_throughput_prints_every_method_and_the_ratios():
    out = run('benchmarks/step_throughput.py', '--steps', '1', '--repeats', '1', '--warmup', '0', '--no-memory',
              '--variant', 'teacher.inference_mode=false', *TINY)
    for row in ('| none |', '| deit_hard |', '| shake |', '| timm_token_hard |', '| shake / deit_hard |',
                '| deit_hard / timm_token_hard |', '| shake [teacher.inference_mode=false] / shake |'):
        assert row in out, row


def test_step_throughput_measures_memory_in_a_process_per_method():
    out = run('benchmarks/step_throughput.py', '--steps', '1', '--repeats', '1', '--warmup', '0',
              '--methods', 'none', 'shake', *TINY)
    rows = [line for line in out.splitlines() if line.startswith(('| none |', '| shake |'))]
    assert len(rows) == 2 and all('not measured' not in r for r in rows)


def test_data_throughput_runs():
    out = run('benchmarks/data_throughput.py', '--batches', '1', '--batch-size', '8', '--workers', '0')
    assert '| train pipeline |' in out
