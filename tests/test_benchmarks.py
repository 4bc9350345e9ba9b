"""The benchmark scripts run (one step, tiny models), so they cannot rot; their figures live in docs/benchmarks.md."""
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

TINY = ['--set', 'data.img_size=32', '--set', 'model.kwargs.depth=1', '--set', 'model.kwargs.embed_dim=32',
        '--set', 'model.kwargs.num_heads=2', '--set', 'teacher.name=test_byobnet', '--set', 'train.batch_size=4']


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_step_throughput_prints_every_method_and_the_ratios():
    out = run('-m', 'benchmarks.step_throughput', '--steps', '1', '--repeats', '1', '--warmup', '0', '--no-memory',
              '--variant', 'teacher.inference_mode=false', *TINY)
    for row in ('| none |', '| deit_hard |', '| shake |', '| timm_token_hard |', '| shake / deit_hard |',
                '| deit_hard / timm_token_hard |', '| shake [teacher.inference_mode=false] / shake |'):
        assert row in out, row


def test_step_throughput_measures_memory_in_a_process_per_method():
    out = run('-m', 'benchmarks.step_throughput', '--steps', '1', '--repeats', '1', '--warmup', '0',
              '--methods', 'none', 'shake', *TINY)
    rows = [line for line in out.splitlines() if line.startswith(('| none |', '| shake |'))]
    assert len(rows) == 2 and all('not measured' not in r for r in rows)


def test_step_throughput_reads_a_teacher_cache_in_place_of_the_teacher():
    out = run('-m', 'benchmarks.step_throughput', '--steps', '2', '--repeats', '1', '--warmup', '0', '--no-memory',
              '--methods', 'shake', 'shake_cached', *TINY)
    assert '| shake_cached |' in out and '| shake_cached / shake |' in out


def test_teacher_cache_benchmark_prints_sizes_and_reader_rates():
    out = run('-m', 'benchmarks.teacher_cache', 'sizes')
    row = '| ImageNet-1k, DeiT (300 epochs, bf16 teacher) | top-10 logits and a shared tail (bf16, 1000 classes) | 64 |'
    assert row in out
    out = run('-m', 'benchmarks.teacher_cache', 'reader', '--batches', '3')
    assert out.count('| 3 |') == 3, out


def test_data_throughput_runs_both_loaders_side_by_side():
    out = run('-m', 'benchmarks.data_throughput', '--batches', '1', '--batch-size', '8', '--workers', '0',
              '--loaders', 'pil', 'dali', '--transforms', 'train', 'eval', '--dali-threads', '1')
    rows = [line.split(' | ')[:2] for line in out.splitlines() if line.startswith(('| pil', '| dali'))]
    assert rows == [['| pil', 'train'], ['| pil', 'eval'], ['| dali', 'train'], ['| dali', 'eval']], out
    assert 'DALI 2.4.0: decoding on the CPU (libjpeg-turbo), augmenting on the CPU' in out


@pytest.fixture(scope='module')
def ablation_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('ablation')
    return out, run('-m', 'benchmarks.ablation', '--smoke', '--protocol', 'lowdata', '--out', str(out))


def test_ablation_smoke_runs_every_method_on_one_fold(ablation_smoke):
    """One fold, one seed, one epoch of the low-data protocol (trained on fold 0 of 5, tested on the other 4): every
    method trains through the study's own job() and leaves a record."""
    tmp_path, out = ablation_smoke
    records = json.loads((tmp_path / 'runs.json').read_text())
    methods = ('none', 'deit_hard', 'deit_soft', 'kd', 'shake', 'shake_authors')
    assert set(records) == {f'{m}_f0_s0' for m in methods} | {'teacher_f0'}, out
    for m in methods:
        r = records[f'{m}_f0_s0']
        assert 0 <= r['top1_cls'] <= 100 and r['wall_s'] > 0
        assert ('top1_avg' in r) == (m not in ('kd', 'none'))  # no shadow head: the cls head is all they have
        assert r['num_samples'] in (1437, 1438)  # folds 1-4 of 5 over all 1,797 images are the test set
    from benchmarks import study
    terms = study.loss_terms(tmp_path / 'runs' / 'shake_f0_s0')  # what the report's loss-scale table reads
    assert {'loss', 'ce_cls', 'kl_shadow_teacher', 'kl_shadow_cls', 'kl_cls_shadow'} <= set(terms), terms


@pytest.mark.benchmark  # 35 s: the whole ablation smoke again, from caches (tests/test_teacher_cache.py pins exactness)
def test_ablation_with_a_teacher_cache_gives_the_same_results(ablation_smoke, tmp_path):
    """--teacher-cache: the five methods with a teacher read one cache of fold 0, seed 0, and every run scores what
    it scored with the live teacher."""
    live = json.loads((ablation_smoke[0] / 'runs.json').read_text())
    run('-m', 'benchmarks.ablation', '--smoke', '--teacher-cache', '--out', str(tmp_path))
    cached = json.loads((tmp_path / 'runs.json').read_text())
    assert len(list((tmp_path / 'caches').iterdir())) == 1
    for name, record in cached.items():
        reads = any(o.startswith('teacher.cache=') for o in record['overrides'])
        assert reads == (name not in ('none_f0_s0', 'teacher_f0')), name
        assert record['top1_cls'] == live[name]['top1_cls'], name


def test_ablation_report_pairs_runs_and_reads_the_grid(tmp_path):
    """summarise/report/figure on made-up records: the paired differences and the table are what the inputs say."""
    from benchmarks import ablation
    records = {}
    for f in range(2):
        records[f'teacher_f{f}'] = {'teacher_top1': 99.0}
        for s in range(2):
            for i, m in enumerate(ablation.METHODS):
                # method i scores 80 + i on every head, +f so folds differ, +s*(i%2) so seeds differ for odd methods
                v = 80.0 + i + f + s * (i % 2)
                records[f'{m}_f{f}_s{s}'] = {**{f'top1_{h}': v for h in ablation.HEADS},
                                            'train_images_per_sec': 100.0 / (1 + i)}
            for lam, T in ablation.GRID:
                records[f'grid_l{lam}_t{T}_f{f}_s{s}'] = {f'top1_{h}': 70 + lam * T for h in ablation.HEADS}
    summary = ablation.summarise(records, folds=2, seeds=2, sens_seeds=2)
    methods = list(ablation.METHODS)
    kd, shake = summary['main']['kd'], summary['main']['shake']
    assert kd['vs_none']['cls']['mean'] == methods.index('kd') + 0.5  # odd method: +1 on seed 1
    assert shake['vs_deit_hard']['cls']['mean'] == methods.index('shake') - methods.index('deit_hard') - 0.5
    assert shake['time_vs_kd'] == (1 + methods.index('shake')) / (1 + methods.index('kd'))
    assert summary['grid']['2.0,4.0']['cls'] == 78.0
    summary['terms'] = {'shake': {'loss': [3.0, 2.0, 1.0]}}
    args = type('A', (), {'folds': 2, 'seeds': 2, 'sens_seeds': 2, 'epochs': 1, 'protocol': 'short'})()
    text = ablation.report(summary, args, 'python -m benchmarks.ablation', 60.0)
    assert '| shake |' in text and 'lambda, T = 2.0,4.0' in text and '| shake | loss | 3.000 | 2.000 | 1.000 |' in text
    # shake - kd: +1 on seed 0, 0 on seed 1; shake_authors - kd: +2 on every run
    assert 'shake - kd +0.50 [-0.42, +1.42], ahead 2/4;' in text
    assert 'shake_authors - kd +2.00 [+2.00, +2.00], ahead 4/4;' in text
    assert 'shake_authors - shake +1.50 [+0.58, +2.42], ahead 4/4.' in text
    # a count made by the old rule (the first 6 log points): 2 folds of 1,797 at batch 32 are 28 updates per epoch,
    # log points at 28, 50, 56, 84, 100, 112
    assert 'the first 6 log points' in text and 'is the first 112 updates (4.0 of 1 epochs)' in text
    args.protocol, args.folds, summary['stall_updates'] = 'lowdata', 5, 300
    text = ablation.report(summary, args, 'python -m benchmarks.ablation --protocol lowdata', 60.0)
    assert 'the other 4 test, so every image is tested 4 times per seed' in text
    assert '300 updates (60 of 1 epochs)' in text  # 359 images at batch 64, the last partial batch dropped: 5 a epoch
    from benchmarks.ablation_figure import figure
    figure({'short': summary}, tmp_path / 'a.png', {'short': 'short'}, ablation.GRID)
    assert (tmp_path / 'a.png').stat().st_size > 1000


def test_the_ablation_report_keeps_the_other_protocol_beside_this_one(tmp_path):
    """The committed results (either format) and a new protocol's summary make one report with all of them."""
    import shutil

    from benchmarks import ablation
    shutil.copy(ROOT / 'docs' / 'results' / 'ablation.json', tmp_path / 'ablation.json')
    protocols = ablation.load_protocols(tmp_path / 'ablation.json')
    assert 'short' in protocols
    other = 'quickstart' if 'quickstart' not in protocols else 'short'
    protocols[other] = dict(protocols['quickstart' if other == 'short' else 'short'])
    text = ablation.write_both(tmp_path, protocols)
    assert '## Protocol: the quick start' in text and '## Protocol: short' in text and '## Protocol: low data' in text
    assert 'quickstart: vs none (95% CI)' in text and 'short: stalled' in text and 'lowdata: stalled' in text
    assert text.index('## Protocol: the quick start') < text.index('## Protocol: low data') < text.index(
        '## Protocol: short')
    assert (tmp_path / 'ablation.png').stat().st_size > 1000
    assert set(json.loads((tmp_path / 'ablation.json').read_text())['protocols']) == {'quickstart', 'short', 'lowdata'}


def test_a_stalled_start_is_a_cross_entropy_that_stays_at_chance(monkeypatch):
    """Counted by update, not by log point: epochs shorter than the log interval log at each epoch's end."""
    from benchmarks import study

    def logged(values, every):
        monkeypatch.setattr(study, 'train_series', lambda _: {'ce_cls': [(every * (i + 1), v)
                                                                         for i, v in enumerate(values)]})
    logged([2.30, 2.25, 2.33, 2.31, 2.32, 2.30, 1.2], every=50)
    assert study.stalled(ROOT)  # fell by 2% at most by update 300, whatever came later
    logged([2.30, 2.27, 2.23, 2.11, 2.13, 2.02], every=50)
    assert not study.stalled(ROOT)
    logged([2.30] * 7 + [2.0], every=5)  # 5 updates an epoch: flat for 7 epochs, then learning well before 300
    assert not study.stalled(ROOT)
    logged([2.30] * 60 + [2.0], every=5)  # flat until update 300, learning only at 305
    assert study.stalled(ROOT)


def test_ablation_pilot_report_estimates_the_pairs_a_half_point_interval_needs(tmp_path):
    """The pilot's table on made-up records: paired differences against none, their sd, and (1.96 sd / 0.5)^2 pairs;
    with one pair there is no sd to size from."""
    from benchmarks.ablation_pilot import pilot_report
    records = {'none_f0_s0': {'top1_cls': 90.0}, 'none_f0_s1': {'top1_cls': 91.0},
               'shake_f0_s0': {'top1_cls': 91.0}, 'shake_f0_s1': {'top1_cls': 93.0}}
    text = pilot_report(tmp_path, records, [0], 2, ['none', 'shake'])
    assert '| shake | 92.00 | +1.50 | 0.71 | 2 | 8 |' in text, text  # diffs 1 and 2: sd 0.707, 7.7 -> 8 pairs
    text = pilot_report(tmp_path, records, [0], 1, ['none', 'shake'])
    assert '| shake | 91.00 | +1.00 | - | 1 | - |' in text, text


@pytest.mark.parametrize('argv, says', [
    (['--folds', '0'], '--folds 0, --seeds 3'), (['--seeds', '0'], 'need >= 2 folds, >= 1 seed'),
    (['--epochs', '0'], '--epochs 0'), (['--protocol', 'lowdata', '--pilot', '5'], 'folds are numbered 0 to 4'),
    (['--pilot', '0', '0'], 'each fold once'), (['--pilot', '0', '--pilot-methods', 'shak'], "unknown ['shak']"),
    (['--smoke', '--pilot', '0'], 'with --smoke')])
def test_ablation_refuses_a_bad_command_line_before_any_run(argv, says, monkeypatch, capsys, tmp_path):
    from benchmarks import ablation
    monkeypatch.setattr(sys, 'argv', ['ablation', *argv, '--out', str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        ablation.main()
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_cnn_shadow_study_smoke_runs_every_method(tmp_path):
    """One seed, two updates: every method trains through the study's own jobs, the proxy head reports its shadow."""
    run('-m', 'benchmarks.cnn_shadow', '--smoke', '--out', str(tmp_path))
    records = json.loads((tmp_path / 'runs.json').read_text())
    assert set(records) == {f'{m}_s0' for m in ('none', 'kd', 'shake_pooled_paper', 'shake_proxy_paper',
                                                'shake_pooled_authors', 'shake_proxy_authors')}
    assert all('top1_shadow' in r for name, r in records.items() if name.startswith('shake'))
    assert 'top1_shadow' not in records['kd_s0'] and 'teacher_top1' not in records['none_s0']


def test_cnn_shadow_report_pairs_by_seed():
    from benchmarks import cnn_shadow
    # method i scores 90 + i on seed 0 and 91 + i on seed 1; kd runs twice as long as the others
    records = {f'{m}_s{s}': {'top1_cls': 90.0 + i + s, 'wall_s': 20.0 if m == 'kd' else 10.0}
               for i, m in enumerate(cnn_shadow.METHODS) for s in range(2)}
    text, summary = cnn_shadow.report(records, seeds=2, teacher_top1=99.0, command='cmd', elapsed=60.0)
    proxy = summary['shake_proxy_paper']
    assert proxy['vs_none']['mean'] == 3.0 and proxy['vs_kd']['mean'] == 2.0
    assert summary['proxy_vs_pooled_authors']['mean'] == 1.0 and summary['shake_pooled_paper']['time_vs_kd'] == 0.5
    assert "| SHAKE, paper's loss, proxy-teacher head | 93.50 +- 0.71 | 93.00, 94.00 |" in text


def test_detection_study_smoke_runs_every_method(tmp_path):
    """One seed, two updates per epoch on tiny scenes: the shared teacher and digits backbone, then none, kd and shake
    (at its default) through the study's own jobs."""
    run('-m', 'benchmarks.detection', '--smoke', '--out', str(tmp_path))
    records = json.loads((tmp_path / 'runs.json').read_text())
    assert set(records) == {'teacher', 'none_s0', 'kd_s0', 'shake_ms0_s0'}
    assert 'shadow_ap' in records['shake_ms0_s0'] and 'shadow_ap' not in records['kd_s0']
    assert 'teacher_ap' in records['kd_s0'] and 'teacher_ap' not in records['none_s0']
    assert (tmp_path / 'runs/teacher/backbone/backbone.json').is_file()  # pretrained once, for every run
    assert not (tmp_path / 'runs/none_s0/backbone').exists()


def test_detection_report_pairs_by_seed_within_a_setting():
    from benchmarks import detection
    seeds = {'main': 2, 'old': 2, 'scratch': 2, 'switches': 2}
    # row i scores AP 30 + i on seed 0 and 31 + i on seed 1; kd runs twice as long as none
    records = {f'{name}_s{s}': {'student_ap': 30.0 + i + s, 'student_ap50': 60.0 + i, 'student_ap75': 20.0 + i,
                                'wall_s': 20.0 if name == 'kd' else 10.0, 'train_images_per_sec': 5.0,
                                **({'shadow_ap': 29.0 + s} if 'shake' in name else {})}
               for i, name in enumerate(detection.ROWS) for s in range(2)}
    order = list(detection.ROWS)
    summary = detection.summarise(records, seeds)
    assert summary['shake']['vs_none']['mean'] == order.index('shake') - order.index('none')
    assert summary['shake']['vs_kd']['mean'] == order.index('shake') - order.index('kd')
    assert summary['kd']['time_vs_none'] == 2.0
    assert summary['shake']['student_vs_shadow']['mean'] == 1.0 + order.index('shake')
    # a from-scratch row is paired with the from-scratch none and kd, not the main rows'
    assert summary['scratch_shake']['vs_none']['mean'] == order.index('scratch_shake') - order.index('scratch_none')
    text = detection.report(summary, {'teacher_ap': 50.0, 'teacher_ap50': 80.0, 'backbone_top1': 70.0}, 'cmd', 60.0,
                            seeds)
    label = detection.ROWS['shake'][0]
    i = order.index('shake')
    assert f'| {label} | {30.5 + i:.2f} +- 0.71 | {60.0 + i:.2f} | {20.0 + i:.2f} | {30.0 + i:.2f}, {31.0 + i:.2f} |' \
        in text
    partial = detection.summarise({k: v for k, v in records.items() if not k.startswith('kd_defeat')}, seeds)
    assert 'kd_defeat' not in partial and 'shake' in partial  # a row missing a seed is left out, not half-reported


def test_gpu_script_refuses_without_a_gpu_naming_what_it_needs(tmp_path):
    import shutil
    if shutil.which('nvidia-smi'):
        pytest.skip('this machine has nvidia-smi')
    proc = subprocess.run(['bash', 'benchmarks/gpu.sh'], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, 'OUT': str(tmp_path / 'out')})
    assert proc.returncode == 2 and 'needs an NVIDIA GPU' in proc.stderr and 'benchmarks.step_throughput' in proc.stderr
    assert not (tmp_path / 'out').exists() and not proc.stdout  # no stage ran on the CPU
