"""The data pieces every family shares: reading images, the splits, the train and eval loaders, and the seeds.

The data sets and transforms are each family's (shake_vit/classification/data.py, shake_vit/detection/data.py).

Every training sample's augmentation is drawn from its own seed, a pure function of (run seed, epoch, process,
position in the epoch), so the augmented stream does not depend on the number of loader workers and a run resumed
mid-epoch sees exactly the images an uninterrupted run would have seen.
"""
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from .config import ConfigError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


class BadImage(ConfigError):
    """An image file that cannot be decoded; the message names the file and how to find every other bad one.

    `detail` (the file and PIL's reason) is kept only in the process that raised it: a DataLoader worker's error
    reaches the main process rebuilt from its message alone, wrapped in the worker's traceback (see `reason`).
    """

    def __init__(self, message: str, detail: str = ''):
        super().__init__(message)
        self.detail = detail

    @staticmethod
    def reason(err: BaseException) -> str:
        """The message alone: a DataLoader worker re-raises it wrapped in the worker's traceback."""
        return str(err).rsplit('BadImage: ', 1)[-1].strip()


def read_image(path: str) -> Image.Image:
    """torchvision's ImageFolder loader (PIL, RGB), with an error that names the file instead of PIL's traceback."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError or DecompressionBombError for bad files
        detail = f"'{path}' ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        raise BadImage(f'Cannot read the image {detail}. Replace or remove the file, then continue with --resume '
                       'auto; `python train.py --config ... --check-data` lists every unreadable image of a data set '
                       'before a long run.', detail) from None


@dataclass
class Splits:
    train: Dataset  # yields (PIL image, class index)
    val: Dataset
    classes: List[str]


class _Probe(Dataset):
    """Reads sample `i` of a data set and returns '' or why it cannot be read (for `find_bad_images`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> str:
        try:
            self.dataset[i]
            return ''
        except BadImage as err:  # raised here, in this worker: its detail is at hand
            return err.detail


def find_bad_images(cfg: DictConfig, splits: Splits) -> List[str]:
    """Decode every image of both splits (on `data.num_workers` loader workers, with a progress bar) and return one
    line per image that cannot be read: what `train.py --check-data` prints."""
    from tqdm.auto import tqdm
    bad = []
    for name, dataset in (('train', splits.train), ('val', splits.val)):
        loader = DataLoader(_Probe(dataset), batch_size=None, num_workers=cfg.data.num_workers)
        bad += [msg for msg in tqdm(loader, desc=f'checking {name}', total=len(dataset)) if msg]
    return bad


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with the python, numpy and torch CPU RNGs seeded.

    In the main process (num_workers=0) the caller's RNG states are put back afterwards, since mixup and drop-path
    draw from the same global RNGs; worker processes own their RNGs and skip that cost. `torch.random.fork_rng`
    would also fork every accelerator's RNG, which these CPU transforms never touch.
    """
    restore = get_worker_info() is None
    if restore:
        states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.default_generator.set_state(states[2])


def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The seed of one batch's mixup/cutmix draws: a pure function of (run seed, epoch, process, batch index), so a
    resumed run and the teacher-output cache (shake_vit/distill/cache.py) replay the same mixing."""
    # SeedSequence hashes any non-negative integers (a product of them would overflow 64 bits for large seeds)
    return int(np.random.SeedSequence([seed, epoch, rank, batch, MIXUP_TAG]).generate_state(1, np.uint64)[0] >> 2)


MIXUP_TAG = 0x6D6978  # keeps the mixup streams apart from any other use of (seed, epoch, rank, batch)


@contextmanager
def seeded_mixup(seed: Optional[int]) -> Iterator[None]:
    """Run timm's Mixup (which draws from numpy's global RNG) with its draws seeded by `seed`; None leaves the
    RNGs alone."""
    if seed is None:
        yield
    else:
        with _seeded(seed):
            yield


class Transformed(Dataset):
    """Applies a transform to an (image, target) data set; a `(index, seed)` key seeds the augmentation.

    `joint`: the transform takes and returns (image, target), as torchvision's v2 transforms do for detection
    targets (boxes move with the image); otherwise it transforms the image alone.
    """

    def __init__(self, dataset: Dataset, transform: Callable, joint: bool = False):
        self.dataset, self.transform, self.joint = dataset, transform, joint

    def __len__(self) -> int:
        return len(self.dataset)

    def _apply(self, image, target):
        return self.transform(image, target) if self.joint else (self.transform(image), target)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
            image, target = self.dataset[index]
            with _seeded(seed):
                return self._apply(image, target)
        return self._apply(*self.dataset[key])


class SeededSampler(Sampler):
    """Wraps a per-process sampler and pairs each index with a seed for that sample's augmentation.

    The seed depends on (seed, epoch, rank, position), so two copies of an image under repeated augmentation get
    different augmentations, and skipping the first batches of an epoch leaves the rest unchanged.
    """

    def __init__(self, sampler: Sampler, seed: int, rank: int):
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # RepeatAugSampler seeds its shuffle with the epoch alone; offsetting by the run seed makes seeds differ.
        self.sampler.set_epoch(epoch + 100_003 * self.seed)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank)
        seeds = torch.randint(0, 2 ** 62, (len(self.sampler),), generator=g).tolist()
        return iter(zip(self.sampler, seeds))


def train_sampler(cfg: DictConfig, dataset: Dataset, num_replicas: int, rank: int, repeats: int) -> SeededSampler:
    """This process's share of every epoch, built here rather than by `accelerator.prepare`.

    Accelerate shards whatever sampler a prepared DataLoader has, so a distributed or repeated-augmentation sampler
    under `prepare` would be sharded twice; the train loader is therefore never prepared. With repeated augmentation
    the copies of one image land on different processes (timm's RepeatAugSampler, DeiT's RASampler epoch length).
    `repeats`: copies of each image per epoch, the family's (`Family.train_repeats`).
    """
    if repeats > 1:
        base = RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=repeats)
    else:
        base = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=cfg.train.seed)
    return SeededSampler(base, seed=cfg.train.seed, rank=rank)


def train_loader(cfg: DictConfig, dataset: Dataset, transform: Callable, num_replicas: int, rank: int, repeats: int,
                 batch_size: Optional[int] = None, joint: bool = False, collate_fn: Optional[Callable] = None
                 ) -> DataLoader:
    """This process's train loader (see `train_sampler`); `joint` and `collate_fn` as detection needs them."""
    workers = cfg.data.num_workers
    return DataLoader(
        Transformed(dataset, transform, joint), batch_size=batch_size or cfg.train.batch_size, collate_fn=collate_fn,
        sampler=train_sampler(cfg, dataset, num_replicas, rank, repeats), drop_last=True, num_workers=workers,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(), persistent_workers=workers > 0,
        # A private generator: creating the iterator must not draw from the global RNG (resume equality).
        generator=torch.Generator())


def eval_loader(cfg: DictConfig, dataset: Dataset, transform: Callable, joint: bool = False,
                collate_fn: Optional[Callable] = None) -> DataLoader:
    """Sequential and unsharded: `accelerator.prepare` shards it and `gather_for_metrics` drops its padding."""
    return DataLoader(Transformed(dataset, transform, joint), batch_size=cfg.eval.batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                      collate_fn=collate_fn)
