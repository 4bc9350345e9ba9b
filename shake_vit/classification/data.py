"""Classification's data: the data sets (digits, an ImageFolder, CIFAR, fake images), DeiT's transforms and mixup.

The loaders, samplers and per-sample seeding every family shares are shake_vit/core/data.py.
"""
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch.nn as nn
from accelerate import Accelerator
from omegaconf import DictConfig
from PIL import Image
from timm.data import Mixup, create_transform, resolve_model_data_config
from timm.data.transforms import str_to_interp_mode
from timm.loss import create_classification_loss
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..core.build import Pipeline, log
from ..core.config import ConfigError
from ..core.data import IMAGE_SUFFIXES, Splits, eval_loader, read_image, train_loader
from .config import mixup_active


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
        if d.train_on_fold:  # the low-data protocol: the fold trains, the other folds test
            train_idx, val_idx = val_idx, train_idx
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


def build_transforms(a: DictConfig, img_size: int, mean: Sequence[float], std: Sequence[float]
                     ) -> Tuple[Callable, Callable]:
    """timm's train and eval transforms with the configured (DeiT) values, which differ from timm's defaults.

    `aug.train_crop=pad_crop` is DeiT's 32-px path (facebookresearch/deit `datasets.py`, `build_transform` for
    inputs of 32 px): timm's pipeline with its random-resized crop swapped for a random crop after zero padding,
    everything after it (RandAugment, flip, erasing) unchanged. With those off it is CRD's CIFAR protocol. Images of
    another size are first resized to `img_size` (PIL leaves an image of that size untouched).

    Args:
        a: the `aug` section.
    """
    mean, std = tuple(mean), tuple(std)
    train = create_transform(
        img_size, is_training=True, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
        color_jitter=tuple(a.color_jitter) if any(a.color_jitter) else None, auto_augment=a.auto_augment,
        interpolation=a.interpolation, mean=mean, std=std, re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count)
    if a.train_crop == 'pad_crop':  # in place of timm's crop, which comes first; the resize is a no-op at img_size
        size = img_size  # (CIFAR's 32 px) and brings other images to it, as the crop needs
        train.transforms[0:1] = [T.Resize(size, interpolation=str_to_interp_mode(a.interpolation)),
                                 T.RandomCrop(size, padding=a.crop_padding)]
    # 'random' (a per-image filter) is a train-time choice, as in timm's train.py; eval resizes bicubically
    val = create_transform(img_size, is_training=False, mean=mean, std=std,
                           interpolation='bicubic' if a.interpolation == 'random' else a.interpolation,
                           crop_pct=a.crop_pct)
    return train, val


def build_mixup(a: DictConfig, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup with the `aug` section's mixup/cutmix settings; None when both are off."""
    if not mixup_active(a):
        return None
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                 mode=a.mixup_mode, label_smoothing=a.smoothing, num_classes=num_classes)


def build_pipeline(cfg: DictConfig, acc: Accelerator, splits: Splits, student: nn.Module, repeats: int) -> Pipeline:
    """The loaders: this process's micro-batches of the global stream (`repeats`: repeated augmentation's copies)
    and the val loader."""
    model_cfg = resolve_model_data_config(getattr(student, 'model', student))  # a Student wraps its timm model
    mean, std = tuple(cfg.data.mean or model_cfg['mean']), tuple(cfg.data.std or model_cfg['std'])
    train_tf, val_tf = build_transforms(cfg.aug, cfg.data.img_size, mean, std)
    if cfg.data.loader == 'dali':
        from . import dali
        train, val = dali.loaders(cfg, acc, splits, train_tf, val_tf, repeats)
        log(acc, f'data loader: {train.describe}')
    else:
        train = train_loader(cfg, splits.train, train_tf, acc.num_processes, acc.process_index, repeats)
        val = acc.prepare(eval_loader(cfg, splits.val, val_tf))
    return Pipeline(splits, train, val, mean, std)


def criterion(a: DictConfig) -> nn.Module:
    """Label loss: soft-target CE under mixup (which already smooths), else label-smoothing CE (`a`: the `aug`
    section)."""
    return create_classification_loss(smoothing=a.smoothing, soft_targets=mixup_active(a))
