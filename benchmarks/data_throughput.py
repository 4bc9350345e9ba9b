"""Loader throughput of the ImageNet recipe's train pipeline (JPEG decode, DeiT augmentation, repeated augmentation).

Generates an ImageFolder of JPEGs the size of ImageNet's average (500x375) unless --root names a real one, builds the
train loader exactly as the trainer does (configs/deit_tiny_shake_in1k.yaml), and times batches after the first
(worker start-up excluded). Compare the images/s with benchmarks/step_throughput.py on the same machine to see which
one bounds training.

    python benchmarks/data_throughput.py [--workers N] [--batches 20] [--root /data/imagenet]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelerate import Accelerator  # noqa: E402

from shake_vit import data  # noqa: E402
from shake_vit.build import build_pipeline  # noqa: E402
from shake_vit.config import load_config  # noqa: E402
from shake_vit.models import build_student  # noqa: E402


def make_imagefolder(root: Path, classes: int = 8, per_class: int = 64) -> None:
    rng = np.random.default_rng(0)
    for split, count in (('train', per_class), ('val', 4)):
        for c in range(classes):
            folder = root / split / f'n{c:08d}'
            folder.mkdir(parents=True)
            for i in range(count):
                # Smooth noise compresses like a photograph, unlike white noise.
                small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
                Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f'{i}.JPEG', quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', help='an ImageNet-layout folder (default: generate 512 JPEGs)')
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--batches', type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if not args.root:
            make_imagefolder(root)
        cfg = load_config([str(ROOT / 'configs/deit_tiny_shake_in1k.yaml')],
                          [f'data.root={root}', f'data.num_workers={args.workers}',
                           f'train.batch_size={args.batch_size}'])
        acc = Accelerator(cpu=True)
        splits = data.build_splits(cfg)
        pipe = build_pipeline(cfg, acc, splits, build_student(cfg, len(splits.classes)))
        loader = pipe.train_loader
        loader.sampler.set_epoch(0)
        seen, start, count = 0, None, 0
        while seen < args.batches + 1:
            for x, _ in loader:
                if start is None:  # the first batch pays for worker start-up
                    start = time.perf_counter()
                else:
                    count += x.shape[0]
                seen += 1
                if seen > args.batches:
                    break
        elapsed = time.perf_counter() - start
    source = root if args.root else 'generated 500x375 JPEGs'
    print(f'# {os.cpu_count()} CPU cores, {args.workers} workers, batch {args.batch_size}, 224 px DeiT train transform '
          f'(RandAugment, random erasing, repeated augmentation x3), {source}')
    print(f'| loader | images/s |\n| --- | --- |\n| train pipeline | {count / elapsed:.1f} |')


if __name__ == '__main__':
    main()
