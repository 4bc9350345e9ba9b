"""Each sample's augmentation parameters, drawn by timm's own samplers, for a loader that applies them elsewhere.

The PIL loader runs timm's transform (`data.build_transforms`) on an image under the sample's seed
(shake_vit/core/data.py). `Planner` runs the same transform objects under the same seed in the same order, with their
image operations replaced by recorders: the random-resized crop's `get_params`, the flips' `torch.rand`, RandAugment's
choice of ops, skip draws, magnitude noise and sign flips, and random erasing's boxes and pixel noise all consume
the RNGs exactly as on the PIL path, so the parameters are the PIL path's (tests/test_dali.py compares a whole epoch).
The DALI loader (shake_vit/classification/dali.py) then applies them on the device; it draws nothing itself.

A plan is a `Plan`: the crop window and output size, the flip, one (code, [2, 3] parameters) entry per RandAugment
layer, and the erasing boxes with their values: data only (numbers and small tensors), which loader workers return.
"""
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation, ToNumpy
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..core.config import ConfigError

# RandAugment's image operations by the name of timm's function, with the DALI layer code each runs as. Every
# geometric op is one affine warp whose 2x3 matrix (PIL's output -> input map) the plan carries.
AFFINE, BRIGHTNESS, COLOR, CONTRAST, SHARPNESS, POSTERIZE, SOLARIZE, SOLARIZE_ADD, INVERT, EQUALIZE, AUTO_CONTRAST, \
    IDENTITY = range(12)
OPS = {'shear_x': AFFINE, 'shear_y': AFFINE, 'translate_x_rel': AFFINE, 'translate_y_rel': AFFINE,
       'translate_x_abs': AFFINE, 'translate_y_abs': AFFINE, 'rotate': AFFINE, 'brightness': BRIGHTNESS,
       'color': COLOR, 'contrast': CONTRAST, 'sharpness': SHARPNESS, 'posterize': POSTERIZE, 'solarize': SOLARIZE,
       'solarize_add': SOLARIZE_ADD, 'invert': INVERT, 'equalize': EQUALIZE, 'auto_contrast': AUTO_CONTRAST}
PARAMS = (2, 3)  # a layer's parameters: the affine matrix, or the op's one or two numbers in its first row

INTERPOLATIONS = {InterpolationMode.BICUBIC: 'bicubic', InterpolationMode.BILINEAR: 'bilinear',
                  InterpolationMode.NEAREST: 'nearest'}


@dataclass
class Erase:
    """One erased box of the normalised [C, H, W] image and the values timm put there ([C, h, w])."""

    top: int
    left: int
    values: torch.Tensor


@dataclass
class Plan:
    """One sample's parameters, in the order they apply.

    train: crop `crop` (top, left, height, width) of the source, resize it to `size` (width, height), flip, then the
    RandAugment `layers` (code, [2, 3] parameters) in order, normalise, erase.
    eval: resize the source to `resize` (width, height), crop `crop` of that, normalise.
    """

    source_size: Tuple[int, int]  # (width, height) of the image read
    crop: Tuple[int, int, int, int]
    size: Tuple[int, int]
    resize: Optional[Tuple[int, int]] = None
    flip: bool = False
    layers: List[Tuple[int, np.ndarray]] = field(default_factory=list)
    erase: List[Erase] = field(default_factory=list)


def _size_stub(width: int, height: int) -> torch.Tensor:
    """Something torchvision's `get_image_size` reads as a width x height image, without allocating one."""
    return torch.empty(1, 1, 1).expand(1, height, width)


def affine_matrix(name: str, args: Sequence[float], width: int, height: int) -> np.ndarray:
    """PIL's (a, b, c, d, e, f) output -> input map of timm's geometric op `name` on a width x height image:
    input (x, y) = (a x + b y + c, d x + e y + f), in PIL's continuous pixel coordinates (centres at +0.5)."""
    if name == 'shear_x':
        return np.array([1, args[0], 0, 0, 1, 0], np.float32)
    if name == 'shear_y':
        return np.array([1, 0, 0, args[0], 1, 0], np.float32)
    if name in ('translate_x_rel', 'translate_x_abs'):
        pixels = args[0] * width if name == 'translate_x_rel' else args[0]
        return np.array([1, 0, pixels, 0, 1, 0], np.float32)
    if name in ('translate_y_rel', 'translate_y_abs'):
        pixels = args[0] * height if name == 'translate_y_rel' else args[0]
        return np.array([1, 0, 0, 0, 1, pixels], np.float32)
    # rotate: PIL's Image.rotate (expand=False): counter-clockwise by args[0] degrees about the image centre
    angle = -math.radians(args[0] % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = width / 2.0, height / 2.0
    return np.array([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], np.float32)


def layer_params(name: str, args: Sequence[float], width: int, height: int) -> Tuple[int, np.ndarray]:
    """The DALI layer code and parameters of timm's op `name` called with level arguments `args`."""
    code = OPS[name]
    p = np.zeros(PARAMS, np.float32)
    if code == AFFINE:
        p[:] = affine_matrix(name, args, width, height).reshape(PARAMS)
    elif code == POSTERIZE:  # PIL keeps the top `bits` bits (a mask); timm leaves 8 or more bits untouched
        bits = int(args[0])
        p[0, 0] = 255 if bits >= 8 else (0xFF & ~(2 ** (8 - bits) - 1))
    elif code == SOLARIZE_ADD:
        p[0, 0], p[0, 1] = args[0], args[1] if len(args) > 1 else 128
    elif args:
        p[0, 0] = args[0]
    return code, p


class _Recorder:
    """Stands in for one of timm's AugmentOps: the op's own draws (skip, magnitude noise, sign) run, and its image
    operation records (code, parameters) instead of changing an image."""

    def __init__(self, op, log: list, width: int, height: int):
        self.op = copy.copy(op)
        self.op.aug_fn = self._record
        self.name = op.aug_fn.__name__
        self.log, self.width, self.height = log, width, height

    def _record(self, img, *args, **kwargs):
        self.log.append(layer_params(self.name, args, self.width, self.height))
        return img

    def __call__(self, img):
        n = len(self.log)
        self.op(img)
        if len(self.log) == n:  # the op's coin said skip
            self.log.append((IDENTITY, np.zeros(PARAMS, np.float32)))
        return img


class _ErasedImage:
    """Stands in for the normalised [C, H, W] image timm's RandomErasing writes into: it keeps the boxes and values."""

    def __init__(self, channels: int, height: int, width: int):
        self.shape = torch.Size((channels, height, width))
        self.dtype = torch.float32
        self.boxes: List[Erase] = []

    def size(self):
        return self.shape

    def __setitem__(self, key, values):
        _, rows, cols = key  # values: [C, h, w] ('pixel'), or [C, 1, 1] that timm broadcasts ('rand', 'const')
        self.boxes.append(Erase(rows.start, cols.start,
                                values.expand(self.shape[0], rows.stop - rows.start, cols.stop - cols.start)))


def _unsupported(what: str) -> ConfigError:
    return ConfigError(f'data.loader=dali does not apply {what}; it applies DeiT\'s train transform (random-resized '
                       'crop, flips, a timm rand-* RandAugment policy, random erasing) and the centre-crop eval '
                       'transform. Use data.loader=pil for this recipe.')


class Planner:
    """Draws the plans of timm's train or eval transform (`data.build_transforms`); the caller seeds the RNGs as
    the PIL loader does (shake_vit/core/data.py::Transformed)."""

    def __init__(self, transform: T.Compose, train: bool):
        self.train = train
        self.crop = self.flip = self.randaug = self.erasing = self.resize = self.center = None
        self.mean = self.std = None
        for t in transform.transforms:
            if train and isinstance(t, RandomResizedCropAndInterpolation) and self.crop is None:
                if isinstance(t.interpolation, (tuple, list)):
                    raise _unsupported("aug.interpolation=random (a per-image choice of PIL filter)")
                self.crop, self.interpolation = t, INTERPOLATIONS[t.interpolation]
                self.size = (t.size[1], t.size[0])
            elif train and isinstance(t, T.RandomHorizontalFlip) and self.flip is None and self.randaug is None:
                self.flip = t
            elif train and isinstance(t, RandAugment) and self.randaug is None:
                for op in t.ops:
                    if op.aug_fn.__name__ not in OPS:
                        raise _unsupported(f"RandAugment's {op.name} op")
                    if isinstance(op.kwargs.get('resample'), (tuple, list)):
                        raise _unsupported('RandAugment with a random PIL filter (aug.interpolation=random)')
                self.randaug = t
                self.fill = tuple(float(v) for v in t.ops[0].kwargs['fillcolor']) if t.ops else (128.0,) * 3
            elif train and isinstance(t, RandomErasing) and self.erasing is None:
                self.erasing = t
            elif not train and isinstance(t, T.Resize) and self.resize is None:
                if t.max_size is not None:
                    raise _unsupported('a resize with max_size')
                self.resize, self.interpolation = t, INTERPOLATIONS.get(t.interpolation)
                if self.interpolation is None:
                    raise _unsupported(f'the {t.interpolation} resize filter')
            elif not train and isinstance(t, T.CenterCrop) and self.center is None:
                self.center = t
                self.size = (t.size[1], t.size[0])
            elif isinstance(t, T.Normalize):
                self.mean, self.std = [float(v) for v in t.mean], [float(v) for v in t.std]
            elif not isinstance(t, (MaybeToTensor, T.ToTensor, ToNumpy)):
                raise _unsupported(f'{type(t).__name__} (aug.train_crop=pad_crop, aug.color_jitter without '
                                   'auto_augment, or another transform)')
        if (self.crop if train else self.center) is None or self.mean is None:
            raise _unsupported('a transform without a ' + ('random-resized crop' if train else 'centre crop') +
                               ' and a normalisation')

    def __call__(self, image: Image.Image) -> Plan:
        """The plan for `image` (only its size is read: a lazily opened file is not decoded)."""
        w, h = image.size
        return self._train(w, h) if self.train else self._eval(w, h)

    def _train(self, w: int, h: int) -> Plan:
        top, left, ch, cw = self.crop.get_params(_size_stub(w, h), self.crop.scale, self.crop.ratio)
        plan = Plan((w, h), (top, left, ch, cw), self.size)
        if self.flip is not None:
            plan.flip = bool(torch.rand(1) < self.flip.p)  # torchvision's RandomHorizontalFlip draws so
        if self.randaug is not None:
            ra = copy.copy(self.randaug)
            ra.ops = [_Recorder(op, plan.layers, *self.size) for op in self.randaug.ops]
            ra(None)
        if self.erasing is not None:
            erased = _ErasedImage(3, self.size[1], self.size[0])
            self.erasing(erased)
            plan.erase = erased.boxes
        return plan

    def _eval(self, w: int, h: int) -> Plan:
        rw, rh = resized_size(self.resize.size, w, h) if self.resize is not None else (w, h)
        th, tw = self.center.size
        # torchvision's CenterCrop of an image at least the crop's size (timm's eval resize guarantees it)
        if tw > rw or th > rh:
            raise ConfigError(f'An eval image of {w}x{h} resizes to {rw}x{rh}, smaller than the {tw}x{th} crop: '
                              'data.loader=dali does not pad; use data.loader=pil.')
        top, left = int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))
        return Plan((w, h), (top, left, th, tw), self.size, resize=(rw, rh))


def resized_size(size, w: int, h: int) -> Tuple[int, int]:
    """(width, height) out of torchvision's Resize(size) of a w x h image: an int sets the shorter side and scales
    the longer one, truncated, as torchvision computes it; a pair is (height, width)."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[1]), int(size[0])
    short_target = size[0] if isinstance(size, (list, tuple)) else size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = short_target, int(short_target * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def planner_of(transform: Callable, train: bool) -> Planner:
    """A Planner for one of `data.build_transforms`' transforms."""
    if not isinstance(transform, T.Compose):
        raise _unsupported(type(transform).__name__)
    return Planner(transform, train)
