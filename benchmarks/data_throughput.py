"""Loader throughput of the ImageNet recipe's train pipeline (JPEG decode, DeiT augmentation, repeated augmentation).

Generates an ImageFolder of JPEGs the size of ImageNet's average (500x375) unless --root names a real one, builds the
train loader exactly as the trainer does (configs/deit_tiny_shake_in1k.yaml), and times batches after the first
(worker start-up excluded). Compare the images/s with benchmarks/step_throughput.py on the same machine to see which
one bounds training.

    python -m benchmarks.data_throughput [--workers N] [--batches 20] [--root /data/imagenet]
"""
import argparse
import multiprocessing
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from PIL import Image

from benchmarks.study import ROOT
from shake_vit.classification import data
from shake_vit.classification.models import build_student
from shake_vit.core.config import load_config


def write_jpeg(path: Path) -> None:
    # Smooth noise compresses like a photograph, unlike white noise; seeded by the file name.
    rng = np.random.default_rng(zlib.crc32(f"{path.parent.name}/{path.name}".encode()))
    small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(path, quality=90)


def make_imagefolder(root: Path, images: int, workers: int, classes: int = 8) -> None:
    """`images` training JPEGs over `classes` folders (and 4 per class for val), written by `workers` processes."""
    paths = []
    for split, count in (('train', -(-images // classes)), ('val', 4)):
        for c in range(classes):
            folder = root / split / f'n{c:08d}'
            folder.mkdir(parents=True)
            paths += [folder / f'{i}.JPEG' for i in range(count)]
    with multiprocessing.Pool(max(1, workers)) as pool:
        pool.map(write_jpeg, paths, chunksize=16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', help='an ImageNet-layout folder (default: generate enough JPEGs that every timed batch '
                                  'comes from one epoch, so no epoch restart is timed)')
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--batches', type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        # The first workers x prefetch_factor batches are made while the loader starts up and come out back to back:
        # timing them measures the buffer, not the workers. They are skipped, then `batches` batches are timed.
        skip = max(1, args.workers) * 2 + 1
        if not args.root:  # repeated augmentation rounds an epoch down to a multiple of 256 samples (DeiT's RASampler)
            make_imagefolder(root, -(-(skip + args.batches + 1) * args.batch_size // 256) * 256, args.workers)
        cfg = load_config([str(ROOT / 'configs/deit_tiny_shake_in1k.yaml')],
                          [f'data.root={root}', f'data.num_workers={args.workers}',
                           f'train.batch_size={args.batch_size}'])
        acc = Accelerator(cpu=True)
        splits = data.build_splits(cfg)
        pipe = data.build_pipeline(cfg, acc, splits, build_student(cfg, len(splits.classes)), cfg.aug.repeated_aug)
        loader = pipe.train_loader
        loader.batch_sampler.set_epoch(0)
        seen, start, count = 0, None, 0
        for x, _ in loader:  # one epoch (a --root smaller than the batches asked for ends it early)
            seen += 1
            if seen == skip:
                start = time.perf_counter()
            elif seen > skip:
                count += x.shape[0]
                if seen == skip + args.batches:
                    break
        if start is None or count == 0:
            raise SystemExit(f'the epoch ended after {seen} batches, before {skip} start-up batches and the timed '
                             'ones: use a larger --root or fewer --batches/--workers')
        elapsed = time.perf_counter() - start
    source = root if args.root else 'generated 500x375 JPEGs'
    print(f'# {os.cpu_count()} CPU cores, {args.workers} workers, batch {args.batch_size}, 224 px DeiT train transform '
          f'(RandAugment, random erasing, repeated augmentation x3), {source}')
    print('| loader | images/s | batches timed |\n| --- | --- | --- |')
    print(f'| train pipeline | {count / elapsed:.1f} | {seen - skip} |')


if __name__ == '__main__':
    main()
