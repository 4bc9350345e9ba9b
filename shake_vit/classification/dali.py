"""`data.loader=dali`: decode and augment with NVIDIA DALI, on the GPU when there is one, with our stream's seeds.

Loader workers (the same torch DataLoader, sampler and per-sample seeds as the PIL loader, shake_vit/core/data.py)
read each file's bytes and draw its parameters with timm's samplers (augment_plan.py); this module's DALI graph
decodes ("mixed" on a GPU: nvJPEG, with the hardware JPEG decoder of an A100/H100/H200) and applies them. DALI draws
nothing itself, so the stream stays a pure function of the seeds: a mid-epoch resume and the teacher-output cache
work as with PIL. Random erasing and mixup stay in torch on the device.

Why not DALI's own `rand_augment` or `random_resized_crop`: they draw their parameters from DALI's generator,
which no resume or cache could replay. The ops below are DALI's building blocks with PIL's formulas (a DALI op of
the same name sometimes follows OpenCV: equalize does; PIL's is not available). What cannot match PIL bit for bit,
and by how much, is stated in tests/test_dali.py.
"""
import collections
import functools
import io
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ..core.config import ConfigError
from ..core.data import eval_loader, read_image, train_loader
from . import augment_plan as ap

INSTALL = 'pip install -r requirements-dali.txt'


def require():
    """DALI's modules, or a ConfigError that says how to install them."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as err:
        raise ConfigError(f'data.loader=dali needs NVIDIA DALI, which is not installed ({err}). Install it with '
                          f'`{INSTALL}` (the build for CUDA 13, as torch==2.14.1 is), or use data.loader=pil.'
                          ) from None
    return dali


@dataclass
class Source:
    """One image as the DALI graph reads it: a file's bytes (`encoded`) or decoded [H, W, 3] uint8 pixels."""

    data: np.ndarray
    encoded: bool
    size: Tuple[int, int]  # (width, height)


class Sources(Dataset):
    """A classification data set's images as `Source`s: an ImageFolder's files undecoded (their size read from the
    header), any other set's PIL images as pixels (the in-memory sets: digits, CIFAR, fake)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.files = getattr(dataset, 'samples', None) if getattr(dataset, 'loader', None) is read_image else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tuple[Source, int]:
        if self.files is None:
            image, target = self.dataset[i]
            pixels = np.asarray(image.convert('RGB'))
            return Source(pixels, False, (pixels.shape[1], pixels.shape[0])), target
        path, target = self.files[i]
        try:
            with open(path, 'rb') as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as image:  # the header: the size, and that PIL knows the format
                size = image.size
        except Exception:  # the same message as the PIL loader's for an unreadable file
            read_image(path)
            raise
        return Source(np.frombuffer(data, np.uint8), True, size), target


class Planned:
    """The transform the loader workers run, under each sample's seed: the source and its parameters."""

    def __init__(self, planner: ap.Planner):
        self.planner = planner

    def __call__(self, source: Source) -> Tuple[Source, ap.Plan]:
        return source, self.planner(source)


@dataclass
class Batch:
    """A collated micro-batch for the DALI graph: what the external source feeds, and what torch applies after."""

    inputs: tuple  # the graph's external-source batches, in `_graph`'s order
    targets: torch.Tensor  # [B]
    erase: List[Tuple[int, ap.Erase]]  # (sample, box) pairs


def collate(samples: List[Tuple[Tuple[Source, ap.Plan], int]], layers: int) -> Batch:
    """Stack one micro-batch's sources and plans into the graph's inputs (`layers`: RandAugment layers, 0 for eval)."""
    sources = [s for (s, _), _ in samples]
    plans = [p for (_, p), _ in samples]
    crop = np.array([[p.crop[1], p.crop[0]] for p in plans], np.int32)  # anchor (x, y)
    crop_shape = np.array([[p.crop[3], p.crop[2]] for p in plans], np.int32)  # (width, height)
    inputs = [[s.data for s in sources], crop, crop_shape]
    if plans[0].resize is not None:  # eval
        inputs.append(np.array([p.resize for p in plans], np.float32))
    else:
        inputs.append(np.array([p.flip for p in plans], np.int32))
        for layer in range(layers):
            inputs.append(np.array([p.layers[layer][0] for p in plans], np.int32))
            inputs.append(np.stack([p.layers[layer][1] for p in plans]))
    erase = [(i, box) for i, p in enumerate(plans) for box in p.erase]
    return Batch(tuple(inputs), torch.tensor([t for _, t in samples], dtype=torch.int64), erase)


# PIL's SMOOTH filter, which ImageEnhance.Sharpness blends with (PIL keeps a 1-px border unfiltered; DALI filters it)
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
INTERP = {'bicubic': 'INTERP_CUBIC', 'bilinear': 'INTERP_LINEAR', 'nearest': 'INTERP_NN'}


def _graph(planner: ap.Planner, source: Callable, encoded: bool, gpu: bool, layers: int):
    """The per-sample graph (a DALI pipeline function): decode, crop and resize (train) or resize and crop (eval),
    flip, the RandAugment layers, normalise to [3, H, W] float. Every parameter comes from `source`, which returns
    a `Batch`'s inputs."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    device = 'gpu' if gpu else 'cpu'
    interp = getattr(types, INTERP[planner.interpolation])
    fill_colour = np.array(getattr(planner, 'fill', (128.0,) * 3), np.float32)

    def on_device(x):  # a per-sample CPU parameter used in arithmetic with the image
        return x.gpu() if gpu else x

    def as_float(img):
        return fn.cast(img, dtype=types.FLOAT)

    def to_u8(x):  # PIL truncates a blend's float result to the uint8 range
        return fn.cast(dmath.clamp(dmath.floor(x), 0.0, 255.0), dtype=types.UINT8)

    def rounded(x):
        return fn.cast(dmath.clamp(dmath.floor(x + 0.5), 0.0, 255.0), dtype=types.UINT8)

    def blend(degenerate, img, factor):  # PIL's Image.blend(degenerate, img, factor)
        return to_u8(degenerate + on_device(factor) * (img - degenerate))

    def gray(img):  # PIL's convert('L'): [H, W, 1], rounded
        weights = types.Constant(np.array([0.299, 0.587, 0.114], np.float32), device=device)
        return dmath.floor(fn.reductions.sum(img * weights, axes=[2], keep_dims=True) + 0.5)

    def layer(img, code, p):  # the float copy is made inside the branches that use it, on their samples alone
        if code == ap.AFFINE:  # the fill colour by shifting it to 0 (DALI's fill value is one scalar)
            fill = types.Constant(fill_colour, device=device)
            img = rounded(fn.warp_affine(as_float(img) - fill, matrix=p, fill_value=0.0,
                                         interp_type=types.INTERP_LINEAR, inverse_map=True) + fill)
        elif code == ap.BRIGHTNESS:
            img = blend(0.0, as_float(img), p[0, 0])
        elif code == ap.COLOR:
            f = as_float(img)
            img = blend(gray(f), f, p[0, 0])
        elif code == ap.CONTRAST:  # PIL: the mean of the grey image, rounded to an integer
            f = as_float(img)
            img = blend(dmath.floor(fn.reductions.mean(gray(f), keep_dims=True) + 0.5), f, p[0, 0])
        elif code == ap.SHARPNESS:
            smooth = types.Constant(SMOOTH, device=device)
            img = blend(as_float(fn.filter(img, smooth, border='clamp')), as_float(img), p[0, 0])
        elif code == ap.POSTERIZE:
            img = img & on_device(fn.cast(p[0, 0], dtype=types.UINT8))
        elif code == ap.SOLARIZE:
            f = as_float(img)
            img = to_u8(f + (f >= on_device(p[0, 0])) * (255.0 - 2.0 * f))
        elif code == ap.SOLARIZE_ADD:
            f = as_float(img)
            img = to_u8(f + (f < on_device(p[0, 1])) * (dmath.min(f + on_device(p[0, 0]), 255.0) - f))
        elif code == ap.INVERT:
            img = types.Constant(255, dtype=types.UINT8, device=device) - img
        elif code == ap.EQUALIZE:
            img = fn.equalize(img)
        elif code == ap.AUTO_CONTRAST:  # per channel: stretch [min, max] to [0, 255]; a flat channel stays
            f = as_float(img)
            lo = fn.reductions.min(f, axes=[0, 1], keep_dims=True)
            span = fn.reductions.max(f, axes=[0, 1], keep_dims=True) - lo
            flat = span <= 0.0
            img = to_u8((f - lo * (1.0 - flat)) * (255.0 / dmath.max(span, 1.0) * (1.0 - flat) + flat))
        else:
            img = img
        return img

    # as PIL decodes: EXIF orientation ignored, chroma upsampled as libjpeg does (the GPU decoder's default is not)
    decoding = dict(output_type=types.RGB, adjust_orientation=False, jpeg_fancy_upsampling=True,
                    device='mixed' if gpu else 'cpu')

    def graph():
        inputs = fn.external_source(source=source, num_outputs=4 + 2 * layers, batch=True)
        data, anchor, shape, fourth = inputs[:4]
        if planner.train:
            if encoded:
                img = fn.decoders.image_slice(data, anchor, shape, axis_names='WH', **decoding)
            else:
                img = fn.slice(data, anchor, shape, axis_names='WH')
                img = img.gpu() if gpu else img
            img = fn.resize(img, resize_x=planner.size[0], resize_y=planner.size[1], interp_type=interp,
                            antialias=True)
            img = fn.flip(img, horizontal=fourth)
            for i in range(layers):
                img = layer(img, inputs[4 + 2 * i], inputs[5 + 2 * i])
        else:
            if encoded:
                img = fn.decoders.image(data, **decoding)
            else:
                img = data.gpu() if gpu else data
            img = fn.resize(img, resize_x=fourth[0], resize_y=fourth[1], interp_type=interp, antialias=True)
            img = fn.slice(img, anchor, shape, axis_names='WH')
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout='CHW',
                                        mean=[255 * m for m in planner.mean], std=[255 * s for s in planner.std])

    return graph


class DaliLoader:
    """Iterates (images [B, 3, H, W] on `device`, targets [B]): the record loader's batches through the DALI graph,
    then random erasing in torch. `batch_sampler` and `len` are the record loader's, so the trainer and the cache
    writer drive it as they drive the PIL loader (`set_plan` on the sampler, then iterate).

    Args:
        records: a DataLoader of `Batch`es (the train loader, or the eval loader after `accelerator.prepare`).
        prefetch: batches DALI prepares ahead; an eval loader takes 1, since Accelerate's prepared loader marks its
            last batch when it hands it out and `gather_for_metrics` must see that mark with that batch.
        eval_loader: targets on `device`, as a prepared loader hands them out (the evaluation compares them with the
            logits); a train loader's stay on the CPU, as the PIL train loader's do (the cache reads them there).
    """

    def __init__(self, records, planner: ap.Planner, device: torch.device, encoded: bool, batch_size: int,
                 threads: int, prefetch: int, eval_loader: bool = False):
        self.records, self.device, self.eval_loader = records, device, eval_loader
        self.layers = planner.randaug.num_layers if planner.train and planner.randaug is not None else 0
        self.gpu = device.type == 'cuda'
        self._pending: collections.deque = collections.deque()  # (targets, erase) of each batch fed, in order
        self._batches = iter(())
        self._active = None  # the iteration in progress: a new one closes it first (DALI holds its batches)
        self._build(planner, encoded, batch_size, threads, prefetch)

    def _build(self, planner: ap.Planner, encoded: bool, batch_size: int, threads: int, prefetch: int) -> None:
        dali = require()
        from nvidia.dali import pipeline_def
        self._spec = (planner, encoded, batch_size, threads, prefetch)  # what `_stop` and `subset` build again from
        self.pipe = pipeline_def(_graph(planner, self._next, encoded, self.gpu, self.layers), enable_conditionals=True)(
            batch_size=batch_size, num_threads=threads, device_id=(self.device.index or 0) if self.gpu else None,
            prefetch_queue_depth=prefetch, exec_dynamic=True)
        self.pipe.build()
        self.describe = (f'DALI {dali.__version__}: decoding ' +
                         ('on the GPU (nvJPEG, "mixed")' if encoded and self.gpu
                          else 'on the CPU (libjpeg-turbo)' if encoded else 'nothing (in-memory images)') +
                         f", augmenting on the {'GPU' if self.gpu else 'CPU'}, {threads} threads, prefetch {prefetch}")

    @property
    def batch_sampler(self):
        return self.records.batch_sampler

    @property
    def dataset(self) -> Dataset:
        return self.records.dataset

    def subset(self, index: List[int], prepare: Callable) -> 'DaliLoader':
        """A loader over the images `index` of this loader's data set, in order, its record loader passed through
        `prepare` (`accelerator.prepare`): the teacher health check's few validation images."""
        planner, encoded, batch_size, threads, _ = self._spec
        records = prepare(DataLoader(Subset(self.records.dataset, index), batch_size=batch_size,
                                     collate_fn=self.records.collate_fn, generator=torch.Generator()))
        return DaliLoader(records, planner, self.device, encoded, batch_size, threads, 1, eval_loader=True)

    def __len__(self) -> int:
        return len(self.records)

    def _next(self) -> tuple:
        """DALI's external source: the next batch's inputs (StopIteration at the end of the records ends DALI's
        epoch). DALI calls it ahead of `run` to keep `prefetch` batches in flight."""
        batch: Batch = next(self._batches)
        self._pending.append((batch.targets, batch.erase))
        return batch.inputs

    def __iter__(self):
        if self._active is not None:  # an earlier iteration left open: its batches in DALI are dropped first
            self._active.close()
        self._active = self._epoch()
        return self._active

    def _epoch(self):
        from nvidia.dali.plugin.pytorch import feed_ndarray
        self._batches = iter(self.records)
        self._pending.clear()
        done = False
        try:
            while True:
                try:
                    (images,) = self.pipe.run()
                except StopIteration:
                    done = True
                    return
                targets, erase = self._pending.popleft()
                images = images.as_tensor()
                x = torch.empty(images.shape(), dtype=torch.float32, device=self.device)
                feed_ndarray(images, x, cuda_stream=torch.cuda.current_stream(self.device) if self.gpu else None)
                for i, box in erase:  # timm's erasing values, drawn on the CPU under the sample's seed
                    _, h, w = box.values.shape
                    x[i, :, box.top:box.top + h, box.left:box.left + w] = box.values.to(self.device, non_blocking=True)
                yield x, (targets.to(self.device, non_blocking=True) if self.eval_loader else targets)
        finally:
            self._active = None
            self._stop(done)

    def _stop(self, done: bool) -> None:
        """End DALI's epoch. Stopped early (an error, a stop request), the batches DALI has in flight are dropped;
        if DALI itself failed and cannot be drained, the pipeline is built again, so the next epoch starts clean."""
        self._batches = iter(())
        try:
            if not done:
                try:
                    while True:
                        self.pipe.run()
                except StopIteration:
                    pass
            self.pipe.reset()
        except Exception:  # (the error that stopped the epoch is the one the caller sees)
            self._build(*self._spec)
        self._pending.clear()


def loaders(cfg: DictConfig, acc, splits, train_tf: Callable, val_tf: Callable, repeats: int
            ) -> Tuple[DaliLoader, DaliLoader]:
    """This process's DALI train loader (its micro-batches of the global stream) and the prepared val loader."""
    d = cfg.data
    train_plan, val_plan = ap.planner_of(train_tf, train=True), ap.planner_of(val_tf, train=False)  # refusals first
    require()
    layers = train_plan.randaug.num_layers if train_plan.randaug is not None else 0
    train_sources, val_sources = Sources(splits.train), Sources(splits.val)
    records = train_loader(cfg, train_sources, Planned(train_plan), acc.num_processes, acc.process_index, repeats,
                           collate_fn=functools.partial(collate, layers=layers))
    val_records = acc.prepare(eval_loader(cfg, val_sources, Planned(val_plan),
                                          collate_fn=functools.partial(collate, layers=0)))
    train = DaliLoader(records, train_plan, acc.device, train_sources.files is not None, cfg.train.batch_size,
                       d.dali_threads, d.dali_prefetch)
    val = DaliLoader(val_records, val_plan, acc.device, val_sources.files is not None, cfg.eval.batch_size,
                     d.dali_threads, 1, eval_loader=True)
    return train, val
