"""Data sets and the seeded per-sample augmentation (the stream across processes: tests/test_stream.py)."""

import pytest
import torch

from shake_vit.classification import data
from shake_vit.core import data as shared_data
from shake_vit.core.config import ConfigError, load_config


def test_seeded_augmentation_is_a_function_of_the_key_not_of_call_order():
    cfg = load_config(None, ['data.name=digits', 'data.img_size=32', 'aug.repeated_aug=1'])
    splits = data.build_splits(cfg)
    train_tf, _ = data.build_transforms(cfg.aug, cfg.data.img_size, (0.5,) * 3, (0.5,) * 3)
    ds = shared_data.Transformed(splits.train, train_tf)
    a = ds[(3, 12345)][0]
    torch.rand(10)  # disturb the global RNGs in between
    ds[(4, 999)]
    assert torch.equal(ds[(3, 12345)][0], a)
    assert not torch.equal(ds[(3, 54321)][0], a)
    # The caller's RNG state is untouched (mixup and drop path draw from it in the main process).
    state = torch.get_rng_state()
    ds[(5, 1)]
    assert torch.equal(torch.get_rng_state(), state)


def test_loader_order_and_augmentation_do_not_depend_on_worker_count():
    cfg = load_config(None, ['data.name=digits', 'data.img_size=32', 'aug.repeated_aug=1', 'train.batch_size=32'])
    splits = data.build_splits(cfg)
    train_tf, _ = data.build_transforms(cfg.aug, cfg.data.img_size, (0.5,) * 3, (0.5,) * 3)
    batches = []
    for workers in (0, 2):
        cfg.data.num_workers = workers
        loader = data.train_loader(cfg, splits.train, train_tf, world=1, rank=0, repeats=cfg.aug.repeated_aug)
        loader.batch_sampler.set_epoch(3)
        batches.append([x for x, _ in zip(loader, range(3))])
    for (x0, y0), (x2, y2) in zip(*batches):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_digits_split_is_stratified_fixed_and_kfold_covers_everything():
    cfg = load_config(None, ['data.name=digits'])
    a, b = data.build_splits(cfg), data.build_splits(cfg)
    assert len(a.train) == 1437 and len(a.val) == 360 and a.classes == [str(i) for i in range(10)]
    assert (a.val.targets == b.val.targets).all()
    seen = []
    for fold in range(5):
        s = data.build_splits(load_config(None, ['data.name=digits', 'data.num_folds=5', f'data.fold={fold}']))
        seen += [img.tobytes() for img in s.val.images]
        assert len(s.train) + len(s.val) == 1797
    assert len(seen) == 1797
    test_fold = data.build_splits(load_config(None, ['data.name=digits', 'data.num_folds=5', 'data.fold=0']))
    inner = data.build_splits(load_config(None, ['data.name=digits', 'data.num_folds=5', 'data.fold=0',
                                                 'data.inner_val_fraction=0.2']))
    test_images = {img.tobytes() for img in test_fold.val.images}
    assert len(inner.train) + len(inner.val) == len(test_fold.train)
    assert not test_images & {img.tobytes() for img in [*inner.train.images, *inner.val.images]}


def test_training_on_one_fold_tests_on_the_others_and_every_image_trains_once():
    """data.train_on_fold (the low-data ablation): fold k of 5 trains (20% of the digits), the rest tests."""
    def keys(images):
        return [bytes(images.images[i]) + bytes([images.targets[i]]) for i in range(len(images))]
    seen = []
    for fold in range(5):
        cfg = load_config(None, ['data.name=digits', 'data.num_folds=5', f'data.fold={fold}',
                                 'data.train_on_fold=true'])
        splits = data.digits_splits(cfg)
        assert len(splits.train) in (359, 360) and len(splits.train) + len(splits.val) == 1797
        seen += keys(splits.train)
    everything = data.digits_splits(load_config(None, ['data.name=digits', 'data.val_fraction=0.5']))
    assert sorted(seen) == sorted(keys(everything.train) + keys(everything.val))  # each image trains in one fold
    with pytest.raises(ConfigError, match="'data.train_on_fold' .* unless data.num_folds >= 2"):
        load_config(None, ['data.name=digits', 'data.train_on_fold=true'])
    with pytest.raises(ConfigError, match="'data.fold' is 3; it must be 0 unless data.num_folds >= 2"):
        load_config(None, ['data.name=digits', 'data.fold=3'])
    # the trainer splits the digits alone: on another data set these keys would be ignored, so they are refused
    for key in ('data.num_folds=5', 'data.fold=1', 'data.train_on_fold=true', 'data.inner_val_fraction=0.2'):
        with pytest.raises(ConfigError, match=f"'{key.split('=')[0]}' .* only the digits are split"):
            load_config(None, ['data.name=cifar100', key])


def test_imagefolder_errors_name_the_problem(tmp_path, imagefolder):
    with pytest.raises(ConfigError, match='data.root is not set'):
        data.build_splits(load_config(None, ['data.name=imagefolder']))
    with pytest.raises(ConfigError, match="has no 'train/' folder"):
        data.build_splits(load_config(None, [f'data.root={tmp_path}']))
    splits = data.build_splits(load_config(None, [f'data.root={imagefolder}']))
    assert len(splits.train) == 48 and len(splits.val) == 20 and len(splits.classes) == 4


def test_cifar_offline_without_files_says_where_to_put_them(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match='data.download=true'):
        data.build_splits(load_config(None, ['data.name=cifar100', f'data.root={tmp_path}']))
    from urllib.error import URLError

    from torchvision.datasets import CIFAR100

    def offline(self):  # what torchvision's download raises without a network (name resolution fails)
        raise URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(CIFAR100, 'download', offline)
    with pytest.raises(ConfigError, match=r"URLError.*the download failed; offline, put the extracted python-version "
                                          r"archive there \('.*/cifar-100-python/'\)"):
        data.build_splits(load_config(None, ['data.name=cifar100', f'data.root={tmp_path}', 'data.download=true']))


def test_deit_randaugment_survives_its_strongest_posterize():
    """rand-m9-mstd0.5-inc1 reaches magnitude 10, where PosterizeIncreasing keeps 0 bits (requirements.txt pin)."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    out = op(Image.new('RGB', (8, 8), (200, 100, 50)))
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))  # every bit dropped: black, as in the TF reference
