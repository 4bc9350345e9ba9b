"""Loader throughput of the ImageNet recipe's pipelines: the PIL loader (timm's transforms in loader workers) and the
DALI loader (data.loader=dali), train (JPEG decode, DeiT augmentation, repeated augmentation) and eval (resize, centre
crop), side by side in one run on the same files.

Generates an ImageFolder of JPEGs the size of ImageNet's average (500x375) unless --root names a real one, builds the
loaders exactly as the trainer does (configs/deit_tiny_shake_in1k.yaml), and times batches after the first ones
(start-up and the buffers they fill excluded). DALI decodes and augments on the GPU when there is one, else on the CPU
with --dali-threads threads. Compare the images/s with benchmarks/step_throughput.py on the same machine to see which
one bounds training.

    python -m benchmarks.data_throughput [--loaders pil dali] [--workers N] [--batches 20] [--root /data/imagenet]
"""
import argparse
import multiprocessing
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
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


def make_imagefolder(root: Path, images: int, workers: int, classes: int = 8, val: int = 32) -> None:
    """`images` training JPEGs and `val` validation JPEGs over `classes` folders, written by `workers` processes."""
    paths = []
    for split, count in (('train', -(-images // classes)), ('val', -(-val // classes))):
        for c in range(classes):
            folder = root / split / f'n{c:08d}'
            folder.mkdir(parents=True)
            paths += [folder / f'{i}.JPEG' for i in range(count)]
    with multiprocessing.Pool(max(1, workers)) as pool:
        pool.map(write_jpeg, paths, chunksize=16)


def timed(loader, skip: int, batches: int) -> Tuple[int, int, float]:
    """(batches timed, images, seconds) over `batches` batches after the first `skip`; a batch's images are on the
    device when it is counted."""
    seen, start, count = 0, None, 0
    for x, _ in loader:  # one epoch (a --root smaller than the batches asked for ends it early)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seen += 1
        if seen == skip:
            start = time.perf_counter()
        elif seen > skip:
            count += x.shape[0]
            if seen == skip + batches:
                break
    if start is None or count == 0:
        raise SystemExit(f'the epoch ended after {seen} batches, before {skip} start-up batches and the timed ones: '
                         'use a larger --root or fewer --batches/--workers')
    return seen - skip, count, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', help='an ImageNet-layout folder (default: generate enough JPEGs that every timed batch '
                                  'comes from one epoch, so no epoch restart is timed)')
    p.add_argument('--loaders', nargs='+', default=['pil'], choices=('pil', 'dali'))
    p.add_argument('--transforms', nargs='+', default=['train'], choices=('train', 'eval'))
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--dali-threads', type=int, default=os.cpu_count())
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--batches', type=int, default=20)
    p.add_argument('--cpu', action='store_true', help='DALI on the CPU even where there is a GPU')
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        # The first workers x prefetch_factor batches (and DALI's prefetch queue) are made while the loader starts up
        # and come out back to back: timing them measures the buffers. They are skipped, then `batches` are timed.
        skip = max(1, args.workers) * 2 + 3
        needed = (skip + args.batches + 1) * args.batch_size
        if not args.root:  # repeated augmentation rounds an epoch down to a multiple of 256 samples (DeiT's RASampler)
            make_imagefolder(root, -(-needed // 256) * 256, args.workers,
                             val=needed if 'eval' in args.transforms else 32)
        for name in args.loaders:
            cfg = load_config([str(ROOT / 'configs/deit_tiny_shake_in1k.yaml')],
                              [f'data.root={root}', f'data.num_workers={args.workers}', f'data.loader={name}',
                               f'data.dali_threads={args.dali_threads}', f'train.batch_size={args.batch_size}',
                               f'eval.batch_size={args.batch_size}'])
            acc = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
            splits = data.build_splits(cfg)
            pipe = data.build_pipeline(cfg, acc, splits, build_student(cfg, len(splits.classes)),
                                       cfg.aug.repeated_aug)
            what = pipe.train_loader.describe if name == 'dali' else f'PIL, {args.workers} workers'
            for transform in args.transforms:
                if transform == 'train':
                    pipe.train_loader.batch_sampler.set_epoch(0)
                    n, count, seconds = timed(pipe.train_loader, skip, args.batches)
                else:
                    n, count, seconds = timed(pipe.val_loader, skip, args.batches)
                rows.append(f'| {name} | {transform} | {count / seconds:.1f} | {n} | {what} |')
    source = root if args.root else 'generated 500x375 JPEGs'
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else 'no GPU'
    print(f'# {os.cpu_count()} CPU cores, {device}; batch {args.batch_size}, 224 px; train: DeiT train transform '
          f'(RandAugment, random erasing, repeated augmentation x3); eval: resize 256, centre crop 224; {source}')
    print('| loader | transform | images/s | batches timed | decoding and augmenting |')
    print('| --- | --- | --- | --- | --- |')
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
