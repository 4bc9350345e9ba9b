"""Data sets, timm transforms, Mixup, and the train/eval loaders.

Every training sample's augmentation is drawn from its own seed, a pure function of (run seed, epoch, process,
position in the epoch), so the augmented stream does not depend on the number of loader workers and a run resumed
mid-epoch sees exactly the images an uninterrupted run would have seen.
"""
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.transforms import str_to_interp_mode
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info
from torchvision import transforms as T

from .config import ConfigError, mixup_active

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


class ArrayImages(Dataset):
    """Images held in memory as uint8 arrays [N, H, W], served as RGB PIL images."""

    def __init__(self, images: np.ndarray, targets: np.ndarray):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode='L').convert('RGB'), int(self.targets[i])


def digits_splits(cfg: DictConfig) -> Splits:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes): a stratified holdout or k-fold split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold, train_test_split
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # [N, 8, 8], raw values are 0..16
    targets = digits.target
    index = np.arange(len(targets))
    d = cfg.data
    if d.num_folds:
        folds = StratifiedKFold(n_splits=d.num_folds, shuffle=True, random_state=d.split_seed)
        train_idx, val_idx = list(folds.split(index, targets))[d.fold]
    else:
        train_idx, val_idx = train_test_split(index, test_size=d.val_fraction, stratify=targets,
                                              random_state=d.split_seed)
    if d.inner_val_fraction:  # model selection: hold out part of the training split, leave the test split unseen
        train_idx, val_idx = train_test_split(train_idx, test_size=d.inner_val_fraction,
                                              stratify=targets[train_idx], random_state=d.split_seed)
    return Splits(ArrayImages(images[train_idx], targets[train_idx]), ArrayImages(images[val_idx], targets[val_idx]),
                  [str(c) for c in digits.target_names])


def imagefolder_splits(cfg: DictConfig) -> Splits:
    from torchvision.datasets import ImageFolder
    if not cfg.data.root:
        raise ConfigError("data.name is 'imagefolder' but data.root is not set: point it at a folder holding train/ "
                          'and val/, each with one sub-folder of images per class (data.root=/data/imagenet).')
    root = Path(cfg.data.root)
    sets = {}
    for split in ('train', 'val'):
        folder = root / split
        if not folder.is_dir():
            raise ConfigError(f"data.root '{root}' has no '{split}/' folder; the ImageNet layout is "
                              f'{root}/train/<class>/<image> and {root}/val/<class>/<image>.')
        try:
            sets[split] = ImageFolder(str(folder), loader=read_image)
        except (FileNotFoundError, RuntimeError) as err:
            raise ConfigError(f"No images found under '{folder}' ({err}). Each class needs a sub-folder holding "
                              f"files ending in one of {', '.join(IMAGE_SUFFIXES)}.") from None
    train_classes, val_classes = sets['train'].classes, sets['val'].classes
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise ConfigError(f"The class folders of '{root}/train' and '{root}/val' differ (only in train: {only_train}; "
                          f'only in val: {only_val}). Both splits need the same class sub-folders, even if empty.')
    return Splits(sets['train'], sets['val'], train_classes)


def cifar_splits(cfg: DictConfig) -> Splits:
    from torchvision import datasets
    cls = datasets.CIFAR10 if cfg.data.name == 'cifar10' else datasets.CIFAR100
    root = cfg.data.root or 'data'
    try:
        train = cls(root, train=True, download=cfg.data.download)
        val = cls(root, train=False, download=cfg.data.download)
    except (RuntimeError, OSError) as err:  # missing files; offline, a download fails with URLError (an OSError)
        how = ('the download failed; offline, put' if cfg.data.download else
               'either set data.download=true on a machine with internet, or put')
        raise ConfigError(f"{cls.__name__} is not under '{root}' ({type(err).__name__}: {err}): {how} the extracted "
                          f"python-version archive there ('{root}/{cls.base_folder}/').") from None
    return Splits(train, val, list(train.classes))


def fake_splits(cfg: DictConfig) -> Splits:
    """Random images (torchvision FakeData) for benchmarks and smoke tests: learning nothing is the expected result."""
    from torchvision.datasets import FakeData
    d = cfg.data
    shape = (3, d.img_size, d.img_size)
    train = FakeData(size=d.fake_size[0], image_size=shape, num_classes=d.num_classes, random_offset=0)
    val = FakeData(size=d.fake_size[1], image_size=shape, num_classes=d.num_classes, random_offset=10 ** 6)
    return Splits(train, val, [str(i) for i in range(d.num_classes)])


def build_splits(cfg: DictConfig) -> Splits:
    builders = {'digits': digits_splits, 'imagefolder': imagefolder_splits, 'cifar10': cifar_splits,
                'cifar100': cifar_splits, 'fake': fake_splits}
    splits = builders[cfg.data.name](cfg)
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise ConfigError(f"The {cfg.data.name} data set has an empty split (train {len(splits.train)}, "
                          f'val {len(splits.val)} images).')
    return splits


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


def build_transforms(cfg: DictConfig, mean: Sequence[float], std: Sequence[float]) -> Tuple[Callable, Callable]:
    """timm's train and eval transforms with the configured (DeiT) values, which differ from timm's defaults.

    `aug.train_crop=pad_crop` is DeiT's 32-px path (facebookresearch/deit `datasets.py`, `build_transform` for
    inputs of 32 px): timm's pipeline with its random-resized crop swapped for a random crop after zero padding,
    everything after it (RandAugment, flip, erasing) unchanged. With those off it is CRD's CIFAR protocol. Images of
    another size are first resized to `data.img_size` (PIL leaves an image of that size untouched).
    """
    a = cfg.aug
    mean, std = tuple(mean), tuple(std)
    train = create_transform(
        cfg.data.img_size, is_training=True, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
        color_jitter=tuple(a.color_jitter) if any(a.color_jitter) else None, auto_augment=a.auto_augment,
        interpolation=a.interpolation, mean=mean, std=std, re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count)
    if a.train_crop == 'pad_crop':  # in place of timm's crop, which comes first; the resize is a no-op at img_size
        size = cfg.data.img_size  # (CIFAR's 32 px) and brings other images to it, as the crop needs
        train.transforms[0:1] = [T.Resize(size, interpolation=str_to_interp_mode(a.interpolation)),
                                 T.RandomCrop(size, padding=a.crop_padding)]
    val = create_transform(cfg.data.img_size, is_training=False, interpolation=a.interpolation, mean=mean, std=std,
                           crop_pct=a.crop_pct)
    return train, val


def build_mixup(cfg: DictConfig, num_classes: int) -> Optional[Mixup]:
    if not mixup_active(cfg):
        return None
    a = cfg.aug
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                 mode=a.mixup_mode, label_smoothing=a.smoothing, num_classes=num_classes)


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
    resumed run and the teacher-output cache (shake_vit/teacher_cache.py) replay the same mixing."""
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


def train_sampler(cfg: DictConfig, dataset: Dataset, num_replicas: int, rank: int,
                  repeats: Optional[int] = None) -> SeededSampler:
    """This process's share of every epoch, built here rather than by `accelerator.prepare`.

    Accelerate shards whatever sampler a prepared DataLoader has, so a distributed or repeated-augmentation sampler
    under `prepare` would be sharded twice; the train loader is therefore never prepared. With repeated augmentation
    the copies of one image land on different processes (timm's RepeatAugSampler, DeiT's RASampler epoch length).
    `repeats` overrides `aug.repeated_aug` (detection: 1).
    """
    repeats = cfg.aug.repeated_aug if repeats is None else repeats
    if repeats > 1:
        base = RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=repeats)
    else:
        base = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=cfg.train.seed)
    return SeededSampler(base, seed=cfg.train.seed, rank=rank)


def train_loader(cfg: DictConfig, dataset: Dataset, transform: Callable, num_replicas: int, rank: int,
                 batch_size: Optional[int] = None, joint: bool = False, collate_fn: Optional[Callable] = None,
                 repeats: Optional[int] = None) -> DataLoader:
    """This process's train loader (see `train_sampler`); `joint`, `collate_fn` and `repeats` as detection needs
    them."""
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
