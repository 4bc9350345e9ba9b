"""The teacher-output cache (shake_vit/distill/cache.py): written once with --cache-teacher, read with teacher.cache.

A cached run must end with exactly the live run's weights (mid-epoch resume included; a cache written by other process
counts: tests/test_stream.py), refuse a cache of another input stream by naming the keys, and a top-k cache must stay
within the pinned error."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import RUN, assert_same_weights, main, results
from omegaconf import OmegaConf

from shake_vit.distill.cache_format import Format, decode, encode


@pytest.fixture(scope='module')
def cache(reference, teacher_file, tmp_path_factory):
    """A full-logit cache of the reference run's input stream, written in this process with its fitted teacher."""
    root = tmp_path_factory.mktemp('cache')
    proc = main([*RUN, f'teacher.checkpoint={teacher_file}', f'train.output_dir={root / "writer"}',
                 '--cache-teacher', str(root / 'cache')])
    assert 'teacher cache complete' in proc.stdout
    return root / 'cache'


def cached(teacher_file, cache, out, *extra, check=True):
    return main([*RUN, f'teacher.checkpoint={teacher_file}', f'teacher.cache={cache}', f'train.output_dir={out}',
                 *extra], check=check)


def test_a_cached_run_ends_with_the_live_runs_weights(reference, teacher_file, cache, tmp_path):
    """The reference run has mixup, cutmix, random erasing, drop path and EMA on: every input the teacher saw must
    come back from the cache bit for bit."""
    manifest = json.loads((cache / 'manifest.json').read_text())
    assert manifest['format'] == {'store': 'full', 'k': 0, 'precision': 'fp32', 'num_classes': 10, 'exact': True}
    assert sorted(p.name for p in cache.iterdir()) == ['e0000_b0000', 'e0001_b0000', 'manifest.json']
    proc = cached(teacher_file, cache, tmp_path)
    assert 'no teacher is built' in proc.stdout and 'teacher test_byobnet receives' not in proc.stdout
    assert_same_weights(reference / 'student.safetensors', tmp_path / 'student.safetensors')
    last = 'checkpoints/update_00000008/ema.safetensors'
    assert_same_weights(reference / last, tmp_path / last)
    # the teacher's top-1 is the one the writer measured, as the live run measured it
    assert results(tmp_path)['teacher_top1'] == pytest.approx(results(reference)['teacher_top1'])
    # --eval of the cache-trained run evaluates its live teacher beside the student, as for any run
    main(['--eval', str(tmp_path)])
    evaluated = json.loads(next(tmp_path.glob('checkpoints/*/eval.json')).read_text())
    assert evaluated['teacher_top1'] == pytest.approx(results(reference)['teacher_top1'])


def test_resuming_mid_epoch_reads_the_right_batches(reference, teacher_file, cache, tmp_path):
    name = 'update_00000003'  # 3 of epoch 0's 4 updates done
    shutil.copytree(reference / 'checkpoints' / name, tmp_path / 'checkpoints' / name)
    proc = cached(teacher_file, cache, tmp_path, '--resume', 'auto')
    assert f'resumed from {tmp_path}/checkpoints/{name}' in proc.stdout
    assert_same_weights(reference / 'student.safetensors', tmp_path / 'student.safetensors')


def test_the_student_and_the_loss_may_change_the_input_stream_may_not(teacher_file, cache, tmp_path):
    proc = cached(teacher_file, cache, tmp_path / 'kd', 'loss.method=kd', 'loss.temperature=2',
                  'model.kwargs.depth=2')
    assert 'no teacher is built' in proc.stdout and results(tmp_path / 'kd')['epochs'] == 2
    proc = cached(teacher_file, cache, tmp_path / 'other', 'aug.re_prob=0.5', 'train.seed=3', check=False)
    assert proc.returncode == 2
    assert 'aug.re_prob: cache 0.25, this run 0.5' in proc.stderr and 'seed: cache 0, this run 3' in proc.stderr
    assert '--cache-teacher' in proc.stderr
    proc = cached(teacher_file, cache, tmp_path / 'longer', 'train.epochs=3', check=False)
    assert proc.returncode == 2 and 'holds 2 epochs of 4 micro-batches; this run needs 3 of 4' in proc.stderr


def test_a_cache_whose_samples_differ_from_the_data_is_refused(teacher_file, cache, tmp_path):
    broken = tmp_path / 'cache'
    shutil.copytree(cache, broken)
    labels = np.load(broken / 'e0000_b0000' / 'labels.npy')
    np.save(broken / 'e0000_b0000' / 'labels.npy', (labels + 1) % 10)
    proc = cached(teacher_file, broken, tmp_path / 'run', check=False)
    assert proc.returncode == 2 and 'micro-batch 0 of epoch 0 (process 0) holds other samples' in proc.stderr
    shutil.rmtree(broken / 'e0001_b0000')
    (broken / 'manifest.json').unlink()
    proc = cached(teacher_file, broken, tmp_path / 'run', check=False)
    assert proc.returncode == 2 and 'no manifest.json there' in proc.stderr


def test_an_interrupted_writer_writes_only_what_is_missing(teacher_file, cache, tmp_path):
    root = tmp_path / 'cache'
    shutil.copytree(cache, root)
    shutil.rmtree(root / 'e0001_b0000')
    (root / '.tmp-e0001_b0000').mkdir()  # what a writer killed mid-shard leaves
    (root / '.tmp-e0001_b0000' / 'labels.npy').write_bytes(b'half')
    kept = os.stat(root / 'e0000_b0000' / 't0.values.npy').st_mtime_ns
    main([*RUN, f'teacher.checkpoint={teacher_file}', f'train.output_dir={tmp_path / "w"}', '--cache-teacher',
          str(root)])
    assert os.stat(root / 'e0000_b0000' / 't0.values.npy').st_mtime_ns == kept
    assert not (root / '.tmp-e0001_b0000').exists()
    for name in ('labels.npy', 't0.values.npy'):
        assert np.array_equal(np.load(root / 'e0001_b0000' / name), np.load(cache / 'e0001_b0000' / name))
    proc = main([*RUN, f'teacher.checkpoint={teacher_file}', 'aug.cutmix=0', f'train.output_dir={tmp_path / "w"}',
                 '--cache-teacher', str(root)], check=False)
    assert proc.returncode == 2 and 'holds a cache of another run' in proc.stderr and 'aug.cutmix' in proc.stderr


def test_an_argmax_cache_serves_deit_hard_exactly_and_nothing_else(teacher_file, tmp_path):
    base = [*RUN, 'loss.method=deit_hard', f'teacher.checkpoint={teacher_file}', 'train.epochs=1']
    main([*base, f'train.output_dir={tmp_path / "w"}', 'teacher_cache.store=argmax', '--cache-teacher',
          str(tmp_path / 'cache')])
    assert {p.name for p in (tmp_path / 'cache' / 'e0000_b0000').iterdir()} == {'labels.npy', 't0.indices.npy',
                                                                              'meta.json'}
    main([*base, f'train.output_dir={tmp_path / "live"}'])
    main([*base, f'teacher.cache={tmp_path / "cache"}', f'train.output_dir={tmp_path / "cached"}'])
    assert_same_weights(tmp_path / 'live' / 'student.safetensors', tmp_path / 'cached' / 'student.safetensors')
    proc = main([*base, 'loss.method=shake', f'teacher.cache={tmp_path / "cache"}',
                 f'train.output_dir={tmp_path / "shake"}'], check=False)
    assert proc.returncode == 2 and "holds the teacher's argmax alone, which serves deit_hard" in proc.stderr


def test_nothing_to_cache_and_uncacheable_setups_are_refused(tmp_path):
    proc = main([*RUN, 'loss.method=none', '--cache-teacher', str(tmp_path)], check=False)
    assert proc.returncode == 2 and 'uses no teacher, so there is nothing to cache' in proc.stderr
    proc = main([*RUN, 'model.shadow_on=teacher', 'model.name=resnet18', f'teacher.cache={tmp_path}',
                 '--print-config'], check=False)
    assert proc.returncode == 2 and "feature maps on every step" in proc.stderr
    # detection's teacher scores the student's own proposals: its family refuses the writer (a Family hook)
    proc = main(['--config', 'configs/det_quickstart.yaml', '--config', 'configs/smoke_det.yaml', '--cache-teacher',
                 str(tmp_path / 'det')], check=False)
    assert proc.returncode == 2 and '--cache-teacher serves classification' in proc.stderr
    assert not (tmp_path / 'det').exists()


def test_the_stored_formats_rebuild_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(64, 10) * 3
    fmt = Format('full', 0, 'fp32', 10)
    assert torch.equal(decode(encode(logits, fmt), fmt), logits)
    low = logits.to(torch.bfloat16).float()  # what a bf16 teacher produces: stored in 16 bits, exactly
    fmt = Format('full', 0, 'bf16', 10)
    assert encode(low, fmt)['values'].dtype == np.uint16 and torch.equal(decode(encode(low, fmt), fmt), low)
    fmt = Format('argmax', 0, 'fp32', 10)
    assert torch.equal(decode(encode(logits, fmt), fmt).argmax(1), logits.argmax(1))
    fmt = Format('topk', 3, 'fp32', 10)  # the k largest stay the k largest, in their places
    top = logits.topk(3, dim=1).indices
    assert torch.equal(decode(encode(logits, fmt), fmt, 4.0).topk(3, dim=1).indices.sort(1).values,
                       top.sort(1).values)


# The pinned error of a top-k cache (docs/teacher_cache.md): |term with the rebuilt logits - term with the
# full ones| for SHAKE's shadow-teacher KL, on seeded Gaussian logits (K = 100 classes, teacher std 3, 512 samples,
# student and shadow std 2). Measured: T = 1: 0.129 of 4.407 (k = 10), 0.037 (k = 20); T = 4: 1.798 of 6.360
# (k = 10), 1.090 (k = 20). The other terms do not read the teacher and must not move at all.
TOPK_BOUND = {(10, 1.0): 0.15, (20, 1.0): 0.05, (10, 4.0): 2.0, (20, 4.0): 1.2}


@pytest.mark.parametrize('k,temperature', sorted(TOPK_BOUND))
def test_topk_loss_terms_stay_within_the_pinned_bound(k, temperature):
    from shake_vit.core.config import load_config
    from shake_vit.distill.methods import loss_fn
    torch.manual_seed(0)
    K, B = 100, 512
    t, s, h = torch.randn(B, K) * 3, torch.randn(B, K) * 2, torch.randn(B, K) * 2
    y = torch.randint(0, K, (B,))
    fmt = Format('topk', k, 'fp32', K)
    rebuilt = decode(encode(t, fmt), fmt, temperature)
    loss = loss_fn(load_config(None, [f'loss.temperature={temperature}']))
    live, approx = (loss(s, h, teacher, y, torch.nn.CrossEntropyLoss()) for teacher in (t, rebuilt))
    error = {n: abs(live[n].item() - approx[n].item()) for n in live}
    assert error['kl_shadow_teacher'] <= TOPK_BOUND[(k, temperature)], error
    assert all(v == 0 for n, v in error.items() if n != 'kl_shadow_teacher'), error
    # the tail's softmax mass is exact at the stored temperatures, as are the k classes' probabilities
    top = t.topk(k, dim=1).indices
    for T in (1.0, 2.0, 4.0, 8.0):
        p, q = (t / T).softmax(1), (decode(encode(t, fmt), fmt, T) / T).softmax(1)
        assert torch.allclose(q.gather(1, top), p.gather(1, top), atol=1e-5)
        assert torch.allclose(1 - q.gather(1, top).sum(1), 1 - p.gather(1, top).sum(1), atol=1e-5)


def test_config_for_a_cache_is_classification_only(tmp_path):
    from shake_vit.core.config import ConfigError, load_config
    with pytest.raises(ConfigError, match='teacher.cache'):
        load_config(None, ['task=detection', 'data.name=digit_scenes', 'loss.method=shake',
                           f'teacher.cache={tmp_path}'])
    cfg = load_config(None, ['teacher_cache.store=topk', 'teacher_cache.topk=5'])
    assert OmegaConf.to_container(cfg.teacher_cache)['topk'] == 5
    with pytest.raises(ConfigError, match="'teacher_cache.store' is 'top5'"):
        load_config(None, ['teacher_cache.store=top5'])


def test_mixup_seeds_take_any_run_seed():
    from shake_vit.core.stream import mix_seed, student_seed
    seeds = {f(s, e, m) for f in (mix_seed, student_seed) for s in (0, 20240101, 2 ** 40) for e in (0, 7)
             for m in (0, 1)}
    assert len(seeds) == 24 and all(0 <= s < 2 ** 62 for s in seeds)


def test_a_run_reading_fewer_batches_leaves_no_reading_thread(teacher_file, cache, tmp_path):
    import threading
    cached(teacher_file, cache, tmp_path, 'train.max_updates_per_epoch=2')  # 2 of the cache's 4 batches per epoch
    assert not [t for t in threading.enumerate() if t.name == 'teacher-cache']


def test_a_bf16_teacher_is_cached_in_16_bits_and_read_back_exactly(teacher_file, tmp_path):
    # two blocks: drop path is on (with one block timm's rate schedule gives it 0), so the RNG streams must agree
    base = [*RUN, f'teacher.checkpoint={teacher_file}', 'teacher.precision=bf16', 'train.epochs=1',
            'model.kwargs.depth=2']
    main([*base, f'train.output_dir={tmp_path / "w"}', '--cache-teacher', str(tmp_path / 'cache')])
    assert json.loads((tmp_path / 'cache' / 'manifest.json').read_text())['format']['precision'] == 'bf16'
    assert np.load(tmp_path / 'cache' / 'e0000_b0000' / 't0.values.npy').dtype == np.uint16
    main([*base, f'train.output_dir={tmp_path / "live"}'])
    main([*base, f'teacher.cache={tmp_path / "cache"}', f'train.output_dir={tmp_path / "cached"}'])
    assert_same_weights(tmp_path / 'live' / 'student.safetensors', tmp_path / 'cached' / 'student.safetensors')
    assert results(tmp_path / 'live')['teacher_top1'] == results(tmp_path / 'cached')['teacher_top1']


def test_other_weights_at_the_same_path_and_a_topk_cache_for_raw_logits_are_refused(teacher_file, cache, tmp_path):
    from safetensors.torch import load_file, save_file
    moved = tmp_path / 'teacher.safetensors'
    shutil.copy(teacher_file, moved)
    base = [*RUN, f'teacher.checkpoint={moved}', 'train.epochs=1']
    main([*base, f'train.output_dir={tmp_path / "w"}', 'teacher_cache.store=topk', 'teacher_cache.topk=3',
          '--cache-teacher', str(tmp_path / 'cache')])
    proc = main([*base, 'loss.standardize=true', f'teacher.cache={tmp_path / "cache"}',
                 f'train.output_dir={tmp_path / "std"}'], check=False)
    assert proc.returncode == 2 and 'teacher_cache.store=full' in proc.stderr
    state = load_file(str(moved))
    state['head.fc.bias'] = state['head.fc.bias'] + 1
    save_file(state, str(moved))
    proc = main([*base, f'teacher.cache={tmp_path / "cache"}', f'train.output_dir={tmp_path / "other"}'],
                check=False)
    assert proc.returncode == 2 and "teacher 0: the weights' sha256 differ" in proc.stderr
