"""What the teacher-output cache costs and saves (shake_vit/distill/cache.py); prints tables for docs/benchmarks.md.

    python -m benchmarks.teacher_cache sizes        # disk per epoch and per schedule, computed from the format
    python -m benchmarks.teacher_cache reader       # the reader's thread: batches/s it reads and decodes
    python -m benchmarks.teacher_cache writer       # --cache-teacher's images/s against a live SHAKE run's, one process
    python -m benchmarks.teacher_cache end-to-end   # the ablation's six methods: live teachers against one cache

The step itself, live against cached, is `python -m benchmarks.step_throughput --preset deit_ratio --methods shake
shake_cached` (a CPU stand-in of DeiT-Ti + RegNetY-16GF with the real pair's teacher/student FLOP ratio), and on a GPU
`benchmarks/gpu.sh`.
"""
import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from shake_vit.core.family import family_of
from shake_vit.distill import cache as tc
from shake_vit.distill import cache_format as cf

IMAGENET, CIFAR = 1_281_167, 50_000  # training images per epoch


def sizes() -> None:
    rows = [('ImageNet-1k, DeiT (300 epochs, bf16 teacher)', IMAGENET, 1000, 300, 'topk', 10, 'bf16'),
            ('ImageNet-1k, DeiT (300 epochs, bf16 teacher)', IMAGENET, 1000, 300, 'full', 0, 'bf16'),
            ('CIFAR-100, CRD (240 epochs, fp32 teacher)', CIFAR, 100, 240, 'full', 0, 'fp32'),
            ('CIFAR-100, CRD (240 epochs, fp32 teacher)', CIFAR, 100, 240, 'full', 0, 'fp16'),
            ('CIFAR-100, CRD (240 epochs, fp32 teacher)', CIFAR, 100, 240, 'topk', 10, 'fp32')]
    print('| data set and schedule | format | bytes / sample | per epoch | whole schedule |')
    print('| --- | --- | --- | --- | --- |')
    for label, n, k_classes, epochs, store, k, precision in rows:
        fmt = cf.Format(store, k, precision, k_classes)
        per = fmt.bytes_per_sample(1)
        print(f'| {label} | {fmt.describe()} | {per} | {n * per / 1e9:.3f} GB | {n * per * epochs / 1e9:.1f} GB |')
    print('\nThe byte counts come from `cache_format.Format.bytes_per_sample` (values, class indices, the tail at '
          f'{len(cf.TAIL_TEMPERATURES)} temperatures for top-k, and the int64 label every read checks); '
          "`teacher_cache.store=auto` picks full logits when the whole schedule stays under teacher_cache.max_gb "
          '(default 50).')


def _shard(root: Path, fmt: cf.Format, batches: int, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    writer = tc.ShardWriter(root, 0, 0, range(batches), batch)
    for _ in range(batches):
        logits = torch.randn(batch, fmt.num_classes, generator=g) * 3
        if fmt.precision == 'bf16':
            logits = logits.to(torch.bfloat16).float()
        writer.add(torch.zeros(batch, dtype=torch.long).numpy(), [cf.encode(logits, fmt)])
    writer.finish()


def reader(batches: int) -> None:
    """Times the reader's thread alone: open the shard, slice, decode, queue; the consumer only takes."""
    print('| cache | batch | batches read | ms / batch | batches / s | images / s |\n| --- | --- | --- | --- | --- '
          '| --- |')
    for label, k_classes, batch, store, k, precision in (('ImageNet-1k top-10, bf16', 1000, 256, 'topk', 10, 'bf16'),
                                                         ('ImageNet-1k full, bf16', 1000, 256, 'full', 0, 'bf16'),
                                                         ('CIFAR-100 full, fp32', 100, 64, 'full', 0, 'fp32')):
        fmt = cf.Format(store, k, precision, k_classes)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            _shard(root, fmt, batches, batch)
            r = tc.Reader.__new__(tc.Reader)  # the reader without a run to check against: its thread is timed
            r.root, r.rank, r.fmt, r.num_teachers, r.temperature = root, 0, fmt, 1, 4.0
            r.block, r.micro_batch = batches, batch
            r._thread, r._staged, r._where = None, None, (0, 0)
            os.system(f'cat {root}/{tc.shard_name(0, 0)}/*.npy > /dev/null')  # in the page cache, as a shard read
            labels = torch.zeros(batch, dtype=torch.long)
            start = time.perf_counter()
            r.start_epoch(0, list(range(batches)))
            for _ in range(batches):
                r.next_batch(labels)
                r.take(torch.device('cpu'))
            elapsed = time.perf_counter() - start
            r.close()
        print(f'| {label} | {batch} | {batches} | {1000 * elapsed / batches:.2f} | {batches / elapsed:.0f} | '
              f'{batches * batch / elapsed:.0f} |')


def writer(updates: int) -> None:
    """--cache-teacher against a live SHAKE run of the same config, one process, same machine, one after the other:
    the deit_ratio stand-in (64 px, DeiT-Ti cut to 3 blocks, RegNetY-16GF), fake data, batch 32."""
    import timm
    from safetensors.torch import save_file

    from shake_vit.core.config import load_config
    from shake_vit.core.runner import train
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = timm.create_model('regnety_160', num_classes=100)
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp / 'teacher.safetensors'))
        base = ['data.name=fake', f'data.fake_size=[{updates * 32},64]', 'data.num_classes=100', 'data.img_size=64',
                'data.num_workers=0', 'model.kwargs.patch_size=8', 'model.kwargs.depth=3', 'teacher.name=regnety_160',
                f'teacher.checkpoint={tmp / "teacher.safetensors"}', 'train.batch_size=32', 'train.epochs=1',
                'train.mixed_precision=no', 'eval.batch_size=64', 'train.log_interval=1000', 'aug.mixup=0.8',
                'aug.cutmix=1.0', 'health.teacher=false']  # a random teacher on fake data: at chance by design
        start = time.perf_counter()
        cfg = load_config(None, [*base, f'train.output_dir={tmp / "w"}'])
        manifest = family_of(cfg).cache_teacher(cfg, str(tmp / 'cache'))
        write_s = time.perf_counter() - start
        w = manifest['written']
        live = train(load_config(None, [*base, f'train.output_dir={tmp / "live"}']))
        cached = train(load_config(None, [*base, f'train.output_dir={tmp / "cached"}',
                                          f'teacher.cache={tmp / "cache"}']))
        size = sum(f.stat().st_size for f in (tmp / 'cache').rglob('*.npy'))
    print(f'\n# {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; deit_ratio stand-in, fake data, '
          f'{w["samples"]} images, batch 32, mixup+cutmix, {cf.Format(**manifest["format"]).describe()}')
    print('| run | images/s | ratio to the live run |\n| --- | --- | --- |')
    live_rate = live['train_images_per_sec']
    for label, rate in (('live SHAKE training (student + teacher)', live_rate),
                        ('--cache-teacher (teacher alone, writing)', w['samples'] / w['seconds']),
                        ('SHAKE training from the cache', cached['train_images_per_sec'])):
        print(f'| {label} | {rate:.1f} | {rate / live_rate:.2f} |')
    print(f'\nThe writer invocation took {write_s:.1f} s in all (data, teacher load, its evaluation, the shards); '
          f'the shards hold {size / 1e6:.2f} MB for {w["samples"]} samples.')


def end_to_end(out: Path, fold: int) -> None:
    """The ablation's six methods on one fold and seed at its protocol (benchmarks/ablation.py STUDY): live teachers
    against one shared cache, in one pool of two single-thread workers, the two arms interleaved."""
    import ablation
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
    shutil.rmtree(out, ignore_errors=True)
    study = [*ablation.STUDY, 'train.epochs=20', 'eval.interval=20']
    split = ['data.num_folds=4', f'data.fold={fold}', 'train.seed=0']
    begin = time.perf_counter()
    with mp.get_context('spawn').Pool(2, maxtasksperchild=1) as pool:
        name, path = pool.apply(ablation.teacher_job, (fold, 4, False, out, 12, study))
        live = [(f'live_{m}', [*split, f'teacher.checkpoint={path}', *o], out, study)
                for m, o in ablation.METHODS.items()]
        start = time.perf_counter()
        cached = ablation.with_teacher_caches(pool, [(f'cached_{m}', o, d, st) for (_, o, d, st), m in
                                                     zip(live, ablation.METHODS)])
        cache_s = time.perf_counter() - start
        jobs = [j for pair in zip(live, cached) for j in pair]
        records = {r['name']: r for r in pool.imap_unordered(ablation._run, jobs)}
    total = time.perf_counter() - begin
    cache_dir = next((out / 'caches').iterdir())
    size = sum(f.stat().st_size for f in cache_dir.rglob('*.npy'))
    print(f'\n# {os.cpu_count()} CPU cores, two runs at a time, one thread each; fold {fold} of 4, seed 0, the '
          f'ablation protocol (20 epochs, batch 32, lr 3e-3); {total / 60:.1f} min in all')
    print('| method | live: wall (s) | cached: wall (s) | live top-1 (cls) | cached top-1 (cls) | identical |')
    print('| --- | --- | --- | --- | --- | --- |')
    same_all = True
    for m in ablation.METHODS:
        a, b = records[f'live_{m}'], records[f'cached_{m}']
        same = all(a.get(k) == b.get(k) for k in a if k.startswith(('top1_', 'top5_', 'loss_', 'teacher_')))
        same_all &= same
        print(f"| {m} | {a['wall_s']:.1f} | {b['wall_s']:.1f} | {a['top1_cls']:.2f} | {b['top1_cls']:.2f} | "
              f"{'yes' if same else 'NO'} |")
    live_s = sum(records[f'live_{m}']['wall_s'] for m in ablation.METHODS)
    cached_s = sum(records[f'cached_{m}']['wall_s'] for m in ablation.METHODS)
    print(f'| all six | {live_s:.1f} | {cached_s:.1f} + {cache_s:.1f} writing the cache = {cached_s + cache_s:.1f} '
          f'| | | {"yes" if same_all else "NO"} |')
    print("\nEvery top-1, top-5 and loss of every head, the teacher's included, is compared. The cache: "
          f'{size / 1e6:.2f} MB; the writer ran while nothing else did, so its time is not shared with another run.')
    (out / 'end_to_end.json').write_text(json.dumps({'records': records, 'cache_s': cache_s}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=('sizes', 'reader', 'writer', 'end-to-end'))
    p.add_argument('--batches', type=int, default=200, help='reader: batches read')
    p.add_argument('--updates', type=int, default=40, help='writer: batches of the one epoch')
    p.add_argument('--out', default='runs/teacher_cache_e2e', help='end-to-end: its runs')
    p.add_argument('--fold', type=int, default=0)
    args = p.parse_args()
    if args.what == 'sizes':
        sizes()
    elif args.what == 'reader':
        reader(args.batches)
    elif args.what == 'writer':
        writer(args.updates)
    else:
        end_to_end(Path(args.out).resolve(), args.fold)


if __name__ == '__main__':
    main()
