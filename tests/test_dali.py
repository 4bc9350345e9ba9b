"""data.loader=dali (shake_vit/classification/dali.py, augment_plan.py), DALI running CPU-only.

The parameters DALI receives must be the ones the PIL path draws from the same seeds; the images it makes from them
must be close to timm's, within bounds stated per operation with the reason they cannot be equal; its batches must
be a pure function of the stream (two passes, a resumed epoch, the teacher-output cache).
"""
import math
import types

import numpy as np
import pytest
import torch
from helpers import TINY, assert_same_weights, main, results, write_imagefolder
from PIL import Image

pytest.importorskip('nvidia.dali', reason='pip install -r requirements-dali.txt')

from accelerate import Accelerator  # noqa: E402

from shake_vit.classification import augment_plan as ap  # noqa: E402
from shake_vit.classification import dali  # noqa: E402
from shake_vit.classification import data as cdata  # noqa: E402
from shake_vit.core import data as core_data  # noqa: E402
from shake_vit.core.config import ConfigError, load_config  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def scene(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A photo-like test image [h, w, 3]: smooth gradients and a few solid discs (edges, flat areas, all levels)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / rng.uniform(10, 60) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(10, 60)),
                    128 + 100 * np.cos((x + y) / rng.uniform(15, 80)), 40 + 0.4 * x + 0.3 * y], -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.2) * w
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    """An ImageNet-layout folder of JPEGs: 2 classes, 48 train and 3 val images each, 200x150 px."""
    rng = np.random.default_rng(0)
    return write_imagefolder(tmp_path_factory.mktemp('scenes'), {'train': 48, 'val': 3}, 2,
                             lambda c: scene(rng, 200, 150))


def setup(root, *overrides, img_size=96):
    """The config, splits, DeiT's train and eval transforms (RandAugment, erasing: the defaults), and an Accelerator."""
    cfg = load_config(None, ['data.name=imagefolder', f'data.root={root}', 'data.loader=dali', 'data.num_workers=0',
                             f'data.img_size={img_size}', 'train.batch_size=8', 'eval.batch_size=5', 'train.seed=3',
                             'data.dali_threads=2', *overrides])
    splits = cdata.build_splits(cfg)
    train_tf, val_tf = cdata.build_transforms(cfg.aug, img_size, MEAN, STD)
    return cfg, splits, train_tf, val_tf, Accelerator(cpu=True)


class Logged:
    """A DALI loader's record loader that keeps every batch it hands out."""

    def __init__(self, records):
        self.records, self.batches = records, []

    @property
    def batch_sampler(self):
        return self.records.batch_sampler

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        for batch in self.records:
            self.batches.append(batch)
            yield batch


@pytest.mark.parametrize('re_mode', ['pixel', 'rand'])
def test_dali_receives_the_parameters_the_pil_path_draws_for_a_whole_epoch(scenes, monkeypatch, re_mode):
    """A whole epoch of repeated augmentation (3 copies, 96 images): every crop window, flip, RandAugment op and
    magnitude (signs included) and erasing box DALI is fed equals what timm's PIL transform drew for that sample.
    Erasing's 'rand' mode draws one colour per box ([C, 1, 1], which timm broadcasts), 'pixel' a value per pixel."""
    import torchvision.transforms.functional as TF
    from timm.data import random_erasing

    cfg, splits, train_tf, val_tf, acc = setup(scenes, 'aug.re_prob=0.5', f'aug.re_mode={re_mode}')
    pil_tf = cdata.build_transforms(cfg.aug, cfg.data.img_size, MEAN, STD)[0]  # instrumented below; DALI's is not
    drawn = []  # one record per sample, in the PIL loader's order

    def start(img):
        drawn.append({'crop': None, 'flip': False, 'layers': [], 'erase': []})
        return img
    rrc, _, randaug, *_ = pil_tf.transforms
    get_params = rrc.get_params
    rrc.get_params = lambda *a: drawn[-1].__setitem__('crop', get_params(*a)) or drawn[-1]['crop']
    hflip = TF.hflip
    monkeypatch.setattr(TF, 'hflip', lambda img: drawn[-1].__setitem__('flip', True) or hflip(img))
    for op in randaug.ops:
        def recorded(img, *args, _fn=op.aug_fn, **kwargs):
            drawn[-1]['layers'].append(ap.layer_params(_fn.__name__, args, cfg.data.img_size, cfg.data.img_size))
            return _fn(img, *args, **kwargs)
        op.aug_fn = recorded

    class Layer:  # marks a RandAugment layer whose coin said skip
        def __init__(self, op):
            self.op = op

        def __call__(self, img):
            n = len(drawn[-1]['layers'])
            img = self.op(img)
            if len(drawn[-1]['layers']) == n:
                drawn[-1]['layers'].append((ap.IDENTITY, np.zeros(ap.PARAMS, np.float32)))
            return img
    randaug.ops = [Layer(op) for op in randaug.ops]
    get_pixels = random_erasing._get_pixels
    monkeypatch.setattr(random_erasing, '_get_pixels',  # (per_pixel, rand_color, (C, h, w) of the box, ...)
                        lambda *a, **k: drawn[-1]['erase'].append((a[2], get_pixels(*a, **k))) or
                        drawn[-1]['erase'][-1][1])
    pil_tf.transforms.insert(0, start)
    pil = core_data.train_loader(cfg, splits.train, pil_tf, 1, 0, 3)
    pil.batch_sampler.set_epoch(0)
    pil_images = torch.cat([x for x, _ in pil])
    monkeypatch.undo()  # the recorders are the PIL path's alone

    train, _ = dali.loaders(cfg, acc, splits, train_tf, val_tf, 3)
    train.records = logged = Logged(train.records)
    train.batch_sampler.set_epoch(0)
    batches = list(train)
    fed = [(batch.inputs, batch.erase) for batch in logged.batches]  # the external source's inputs, the erasing
    assert len(drawn) == len(pil_images) == sum(len(y) for _, y in batches) == 96  # boxes kept for torch
    layers = train.layers
    assert layers == 2
    erased = 0
    for b, (inputs, _) in enumerate(fed):
        anchor, shape, flip, *per_layer = inputs[1:]
        for i in range(len(anchor)):
            want = drawn[b * 8 + i]
            top, left, h, w = want['crop']
            assert (anchor[i].tolist(), shape[i].tolist()) == ([left, top], [w, h])
            assert bool(flip[i]) == want['flip']
            for layer in range(layers):
                code, params = want['layers'][layer]
                assert per_layer[2 * layer][i] == code
                np.testing.assert_array_equal(per_layer[2 * layer + 1][i], params)
    for b, (_, boxes) in enumerate(fed):
        for i, box in boxes:
            (_, h, w), values = drawn[b * 8 + i]['erase'].pop(0)
            assert box.values.shape == (3, h, w) and values.shape[1:] == ((h, w) if re_mode == 'pixel' else (1, 1))
            values = values.expand(3, h, w)
            assert torch.equal(box.values, values)  # the PIL path wrote those values at that box
            assert torch.equal(pil_images[b * 8 + i, :, box.top:box.top + h, box.left:box.left + w], values)
            erased += 1
    assert all(not d['erase'] for d in drawn) and erased > 20
    # the epoch exercised every kind of layer (skips included) and flips both ways
    assert {int(c) for inputs, _ in fed for layer in range(layers) for c in inputs[4 + 2 * layer]} == set(range(12))
    flips = np.concatenate([inputs[3] for inputs, _ in fed])
    assert 0 < flips.sum() < len(flips)


@pytest.fixture(scope='module')
def photo():
    """A 224x224 photo-like uint8 image, and the graph's loader fed in-memory pixels, 224 px out (no resize)."""
    cfg = load_config(None, ['data.loader=dali'])
    train_tf, _ = cdata.build_transforms(cfg.aug, 224, MEAN, STD)
    planner = ap.planner_of(train_tf, train=True)
    return scene(np.random.default_rng(1), 224, 224), dali.DaliLoader([], planner, torch.device('cpu'), False, 1, 2,
                                                                       1)


def through_dali(photo, layers, flip=False):
    """The photo through the graph with these RandAugment `layers`, back in uint8 levels [224, 224, 3]."""
    pixels, loader = photo
    plan = ap.Plan((224, 224), (0, 0, 224, 224), (224, 224), flip=flip, layers=layers)
    loader.records = [dali.collate([((dali.Source(pixels, False, (224, 224)), plan), 0)], 2)]
    (x, _), = list(loader)
    x = x[0] * torch.tensor(STD)[:, None, None] * 255 + torch.tensor(MEAN)[:, None, None] * 255
    return x.permute(1, 2, 0).numpy().round()  # (the normalisation's float round trip is off by < 1e-4)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


IDENTITY = (ap.IDENTITY, np.zeros(ap.PARAMS, np.float32))
# Per timm op: the PSNR (dB) DALI's result must reach against timm's PIL result on the same uint8 image, with why it
# is not exact (inf: bit-equal). Measured on `photo` at magnitude 9 (DeiT's), both signs, on 2026-12-05 (in brackets);
# each bound sits a few dB below. Every op must also land at least 10 dB closer to timm's result than the untouched
# image is (untouched: 7-18 dB; Sharpness 39), so an op that did nothing fails.
OP_BOUNDS = {
    'Invert': (math.inf, 'the same integer formula [inf]'),
    'PosterizeIncreasing': (math.inf, 'the same bit mask [inf]'),
    'SolarizeIncreasing': (math.inf, 'the same threshold [inf]'),
    'SolarizeAdd': (math.inf, 'the same lookup [inf]'),
    'BrightnessIncreasing': (60, "PIL's blend in C float, ours in float32: a level apart where x.5 rounds apart [inf]"),
    'ContrastIncreasing': (60, 'as Brightness, around the rounded grey mean [inf]'),
    'ColorIncreasing': (70, "the grey image by float weights here, PIL's 16-bit fixed point: a level apart [81.5]"),
    'AutoContrast': (70, "PIL's lookup table truncates the float scale; DALI's float path a level apart [76.7]"),
    'SharpnessIncreasing': (52, "PIL leaves the 1-px border unfiltered; DALI's filter clamps at the border [58.8]"),
    'Rotate': (38, "DALI's warp interpolates bilinearly (it has no cubic warp), timm bicubically; PIL fills whole "
                   'border pixels where DALI blends them with the fill colour [41.3]'),
    'ShearX': (40, 'as Rotate [43.8]'), 'ShearY': (40, 'as Rotate [43.5]'),
    'TranslateXRel': (40, 'as Rotate (a fractional shift interpolates) [44.4]'),
    'TranslateYRel': (40, 'as Rotate [43.9]'),
    'Equalize': (38, "DALI's equalize is OpenCV's formula (the cumulative histogram up to and including a level, "
                     "scaled by 255/(N - h_min)); PIL's takes the count below a level in steps of (N - h_last)//255. "
                     'Neither library offers the other; both are monotone lookups of the same histogram [42.8]'),
}


@pytest.mark.parametrize('name', sorted(OP_BOUNDS))
def test_each_randaugment_op_matches_timm_within_its_stated_bound(photo, name, monkeypatch):
    from timm.data import auto_augment
    from timm.data.transforms_factory import create_transform
    ra = create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
                          mean=MEAN, std=STD).transforms[2]
    hparams = {**ra.ops[0].hparams, 'magnitude_std': 0}
    pixels, _ = photo
    bound, why = OP_BOUNDS[name]
    for coin in (0.1, 0.9):  # timm's _randomly_negate flips the sign when random() > 0.5: both signs
        monkeypatch.setattr(auto_augment, 'random', types.SimpleNamespace(random=lambda: coin))
        op = auto_augment.AugmentOp(name, prob=1.0, magnitude=9, hparams=hparams)
        called = []
        fn = op.aug_fn
        op.aug_fn = lambda img, *args, **kw: called.append(args) or fn(img, *args, **kw)
        want = np.asarray(op(Image.fromarray(pixels))).astype(np.float32)
        got = through_dali(photo, [ap.layer_params(fn.__name__, called[0], 224, 224), IDENTITY])
        assert psnr(got, want) >= bound, f'{name}{called[0]}: {psnr(got, want):.1f} dB < {bound} ({why})'
        # and the op did something: far closer to timm's result than the image it started from
        assert psnr(got, want) >= psnr(pixels, want) + 10, f'{name}: {psnr(got, want):.1f} dB'
    if name == 'Equalize':  # still an equalisation: a monotone lookup per channel, as PIL's
        for c in range(3):
            order = np.argsort(pixels[..., c].ravel(), kind='stable')
            assert (np.diff(got[..., c].ravel()[order]) >= -1e-3).all()


def test_crop_resize_flip_and_eval_match_pil_within_bounds(scenes):
    """The train crop + bicubic resize + flip and the eval resize + centre crop, from the JPEG file, against PIL on
    the same file: the two decoders' IDCT and chroma upsampling differ and DALI's antialiased cubic resize is not
    PIL's filter, so a PSNR bound, not equality."""
    cfg, splits, train_tf, val_tf, acc = setup(scenes, 'aug.auto_augment=null', 'aug.color_jitter=[0,0,0]',
                                               'aug.re_prob=0', img_size=64)
    train, val = dali.loaders(cfg, acc, splits, train_tf, val_tf, 1)
    train.batch_sampler.set_epoch(0)
    pil = core_data.train_loader(cfg, splits.train, train_tf, 1, 0, 1)
    pil.batch_sampler.set_epoch(0)
    levels = torch.tensor(STD)[:, None, None] * 255  # normalised units -> levels
    for (a, ya), (b, yb) in zip(train, pil):
        assert torch.equal(ya, yb)
        assert psnr((a * levels).numpy(), (b * levels).numpy()) >= 35
    for (a, ya), (b, yb) in zip(val, cdata.eval_loader(cfg, splits.val, val_tf)):
        assert torch.equal(ya, yb) and a.shape == b.shape == (len(ya), 3, 64, 64)
        assert psnr((a * levels).numpy(), (b * levels).numpy()) >= 35


def test_two_passes_and_a_resumed_epoch_give_identical_batches(scenes):
    cfg, splits, train_tf, val_tf, acc = setup(scenes, 'aug.re_prob=0.5')
    train, _ = dali.loaders(cfg, acc, splits, train_tf, val_tf, 3)
    sampler = train.batch_sampler
    sampler.set_epoch(1)
    first = [(x.clone(), y) for x, y in train]
    sampler.set_epoch(1)
    second = [(x.clone(), y) for x, y in train]
    assert len(first) == 12 and all(torch.equal(a, b) and torch.equal(ya, yb)
                                    for (a, ya), (b, yb) in zip(first, second))
    # a run resumed after 7 micro-batches: the sampler starts there (what Trainer.train_epoch asks of it)
    sampler.set_epoch(1, start=7)
    resumed = [x.clone() for x, _ in train]
    assert len(resumed) == 5 and all(torch.equal(a, b) for a, (b, _) in zip(resumed, first[7:]))
    # stopped early (an error, a stop request): the next pass is whole and the same
    for i, _ in enumerate(train):
        if i == 2:
            break
    sampler.set_epoch(1)
    assert all(torch.equal(x, a) for (x, _), (a, _) in zip(train, first))


def test_a_teacher_cache_written_with_dali_serves_a_dali_run_with_the_live_runs_weights(scenes, tmp_path):
    run = [*TINY, 'data.name=imagefolder', f'data.root={scenes}', 'data.loader=dali', 'data.num_workers=0',
           'data.img_size=32', 'train.batch_size=8', 'train.epochs=2', 'train.max_updates_per_epoch=2',
           'aug.mixup=0.8', 'aug.cutmix=1.0', 'aug.re_prob=0.5', 'data.dali_threads=2']
    live = tmp_path / 'live'
    proc = main([*run, f'train.output_dir={live}'])
    assert 'data loader: DALI' in proc.stdout and 'decoding on the CPU' in proc.stdout
    teacher = f'teacher.checkpoint={live / "teacher.safetensors"}'
    main([*run, teacher, f'train.output_dir={tmp_path / "writer"}', '--cache-teacher', str(tmp_path / 'cache')])
    cached = tmp_path / 'cached'
    proc = main([*run, teacher, f'teacher.cache={tmp_path / "cache"}', f'train.output_dir={cached}'])
    assert 'no teacher is built' in proc.stdout
    assert_same_weights(live / 'student.safetensors', cached / 'student.safetensors')
    # the PIL loader's stream is another stream: its run refuses the cache, naming the loader
    proc = main([*run, teacher, 'data.loader=pil', f'teacher.cache={tmp_path / "cache"}',
                 f'train.output_dir={tmp_path / "pil"}'], check=False)
    assert proc.returncode != 0 and 'data.loader' in proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def digit_jpegs(tmp_path_factory):
    """scikit-learn's digits as an ImageNet-layout folder of 32-px JPEGs, the quick start's split (80/20)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    root = tmp_path_factory.mktemp('digit_jpegs')
    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    train, val = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    for split, index in (('train', train), ('val', val)):
        for i in index:
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert('RGB').resize((32, 32), Image.BICUBIC).save(folder / f'{i}.jpg',
                                                                                        quality=95)
    return root


def test_a_short_dali_run_reaches_the_pil_loaders_accuracy_band(digit_jpegs, tmp_path):
    """A smoke, not a study: the quick start's recipe (no teacher) for 10 epochs on the digits as JPEG files, once
    per loader. Measured: PIL 73.6%, DALI 70.6% (chance 10%)."""
    run = ['--config', 'configs/quickstart.yaml', 'data.name=imagefolder', f'data.root={digit_jpegs}',
           'loss.method=none', 'train.epochs=10', 'eval.interval=10', 'optim.lr=3e-3', 'optim.warmup_epochs=1']
    top1 = {}
    for loader in ('pil', 'dali'):
        main([*run, f'data.loader={loader}', f'train.output_dir={tmp_path / loader}'])
        top1[loader] = results(tmp_path / loader)['best_top1_cls']
    assert min(top1.values()) >= 55 and abs(top1['pil'] - top1['dali']) <= 10, top1


def test_what_dali_cannot_do_is_refused_with_the_fix(scenes, monkeypatch):
    cfg, splits, train_tf, val_tf, acc = setup(scenes, 'aug.train_crop=pad_crop')
    with pytest.raises(ConfigError, match='data.loader=pil'):
        dali.loaders(cfg, acc, splits, train_tf, val_tf, 1)
    cfg, splits, train_tf, val_tf, acc = setup(scenes, 'aug.interpolation=random')
    with pytest.raises(ConfigError, match='interpolation=random'):
        dali.loaders(cfg, acc, splits, train_tf, val_tf, 1)
    import builtins
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith('nvidia.dali'):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_dali)
    with pytest.raises(ConfigError, match='pip install -r requirements-dali.txt'):
        dali.require()


def test_the_cache_identity_and_a_resume_tell_the_loaders_apart():
    from shake_vit.core.run_folder import identity as run_identity
    from shake_vit.distill.cache import identity
    a, b = (load_config(None, [f'data.loader={loader}']) for loader in ('pil', 'dali'))
    assert 'data.loader' not in identity(a, MEAN, STD)  # PIL, as every cache written before the option records it
    assert identity(b, MEAN, STD)['data.loader'] == 'dali'
    faster = load_config(None, ['data.loader=dali', 'data.dali_threads=16', 'data.dali_prefetch=3'])
    assert identity(faster, MEAN, STD) == identity(b, MEAN, STD)  # speed settings are not the stream
    assert run_identity(faster) == run_identity(b) != run_identity(a)
    # a detector's digits pretraining done before these keys existed is still reused (its record lacks them)
    from shake_vit.detection.backbone import record_of
    assert not {'data.loader', 'data.train_on_fold'} & set(record_of(a)) and record_of(b)['data.loader'] == 'dali'
    assert identity(b, MEAN, STD)['versions.dali'] == '2.4.0 on the CPU'

