"""The data pieces every family shares: reading images, the splits, the train and eval loaders, and the seeds.

The data sets and transforms are each family's (shake_vit/classification/data.py, shake_vit/detection/data.py).

Every training sample's augmentation is drawn from its own seed, a pure function of (run seed, epoch, position in the
global stream, shake_vit/core/stream.py), so the augmented stream depends neither on the number of loader workers nor
on the number of processes, and a resumed run sees exactly the images an uninterrupted run would have seen.
"""
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from . import stream
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


def mixed(mixup: Optional[Callable], x, y, seed: int, epoch: int, micro_batch: int):
    """timm's Mixup (which draws from numpy's global RNG) on one global micro-batch, its draws seeded by (run seed,
    epoch, micro-batch): what the trainer and the teacher-output cache writer both apply. No mixup: (x, y) as given."""
    if mixup is None:
        return x, y
    with _seeded(stream.mix_seed(seed, epoch, micro_batch)):
        return mixup(x, y)


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


def train_loader(cfg: DictConfig, dataset: Dataset, transform: Callable, world: int, rank: int, repeats: int,
                 joint: bool = False, collate_fn: Optional[Callable] = None) -> DataLoader:
    """This process's train loader: its micro-batches of the global stream (shake_vit/core/stream.py), in order.

    Built here rather than by `accelerator.prepare`, which would shard it again. `repeats`: repeated augmentation's
    copies of each image per epoch (`Family.train_repeats`); `joint` and `collate_fn` as detection needs them.
    """
    layout = stream.layout_of(cfg, world, rank)
    sampler = stream.MicroBatchSampler(stream.Stream(len(dataset), repeats, cfg.train.seed, layout.micro_batch,
                                                     layout.global_batch, cfg.train.max_updates_per_epoch), layout)
    workers = cfg.data.num_workers
    return DataLoader(Transformed(dataset, transform, joint), batch_sampler=sampler, collate_fn=collate_fn,
                      num_workers=workers, pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                      persistent_workers=workers > 0,
                      # A private generator: creating the iterator must not draw from the global RNG.
                      generator=torch.Generator())


def eval_loader(cfg: DictConfig, dataset: Dataset, transform: Callable, joint: bool = False,
                collate_fn: Optional[Callable] = None) -> DataLoader:
    """Sequential and unsharded: `accelerator.prepare` shards it and `gather_for_metrics` drops its padding."""
    return DataLoader(Transformed(dataset, transform, joint), batch_size=cfg.eval.batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                      collate_fn=collate_fn)
