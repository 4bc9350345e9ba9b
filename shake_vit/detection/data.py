"""Detection data: the embedded digit scenes, COCO-format data sets, their transforms and collate.

A sample is (image [3, H, W] in [0, 1], target) with target `{'boxes': BoundingBoxes [N, 4] XYXY in pixels,
'labels': int64 [N] (1..K; 0 is the background), 'image_id': int}`: what torchvision's detectors and its v2
transforms take. Training samples go through the shared seeded loader (shake_vit.core.data), so every
scene's augmentation comes from its own seed and a resumed run sees the same stream.
"""
import json
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from accelerate import PartialState
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..core.config import ConfigError
from ..core.data import BadImage, Splits, read_image

Target = Dict[str, object]


class DigitScenes(Dataset):
    """Deterministic scenes of scikit-learn's handwritten digits: on a black `canvas`-pixel square, `per_scene` digits
    (a range) at random sizes (`sizes`, pixels) and positions, none overlapping, with Gaussian pixel noise. Scene `i`
    is a pure function of (`seed`, `i`); its boxes are the tight boxes of each digit's ink.

    Args:
        digits: uint8 images [N, 8, 8] (0..255) to draw from; train and val scenes get disjoint ones.
        labels: their classes [N] (0..9); the scene's labels are these plus one (0 is the background).
    """

    def __init__(self, digits: np.ndarray, labels: np.ndarray, count: int, canvas: int, per_scene: Sequence[int],
                 sizes: Sequence[int], noise: float, seed: int):
        self.digits, self.labels, self.count, self.canvas = digits, labels, count, canvas
        self.per_scene, self.sizes, self.noise, self.seed = tuple(per_scene), tuple(sizes), noise, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Tuple[tv_tensors.Image, Target]:
        rng = np.random.default_rng((self.seed, i))
        c = self.canvas
        canvas = np.zeros((c, c), np.float32)
        taken = np.zeros((c, c), bool)  # covered by a placed digit's square
        boxes, labels = [], []
        for _ in range(rng.integers(self.per_scene[0], self.per_scene[1] + 1)):
            k = int(rng.integers(len(self.digits)))
            size = int(rng.integers(self.sizes[0], self.sizes[1] + 1))
            glyph = np.asarray(Image.fromarray(self.digits[k]).resize((size, size), Image.BILINEAR),
                               np.float32) / 255
            for _attempt in range(30):  # rejection sampling of a free spot
                x, y = (int(v) for v in rng.integers(0, c - size + 1, 2))
                if not taken[y:y + size, x:x + size].any():
                    break
            else:
                continue  # no room left: fewer digits in this scene
            taken[y:y + size, x:x + size] = True
            canvas[y:y + size, x:x + size] = glyph
            ink_rows, ink_cols = np.nonzero(glyph > 0.15)
            boxes.append([x + ink_cols.min(), y + ink_rows.min(), x + ink_cols.max() + 1, y + ink_rows.max() + 1])
            labels.append(int(self.labels[k]) + 1)
        canvas = np.clip(canvas + self.noise * rng.standard_normal((c, c), dtype=np.float32), 0, 1)
        image = tv_tensors.Image(torch.from_numpy(canvas).expand(3, c, c).clone())  # [3, C, C] in [0, 1]
        target = {'boxes': tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                                    format='XYXY', canvas_size=(c, c)),
                  'labels': torch.tensor(labels, dtype=torch.int64), 'image_id': i}
        return image, target


def digit_scene_splits(cfg: DictConfig) -> Splits:
    """Train and val scenes drawn from disjoint digits (the classification quick start's stratified split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # [N, 8, 8]
    train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=cfg.data.val_fraction,
                                          stratify=digits.target, random_state=cfg.data.split_seed)
    d = cfg.det
    scenes = [DigitScenes(images[idx], digits.target[idx], count, d.canvas, d.digits_per_scene, d.digit_sizes,
                          d.noise, seed=cfg.data.split_seed * 2 + part)
              for part, (idx, count) in enumerate(zip((train_idx, val_idx), d.scenes))]
    return Splits(scenes[0], scenes[1], ['background', *(str(c) for c in digits.target_names)])


class CocoImages(Dataset):
    """A COCO-format data set through torchvision's `CocoDetection` and its v2 wrapper (XYWH -> XYXY boxes), with
    this trainer's image reader (a corrupt file is an error naming it). An image without annotations is kept, with no
    boxes. Crowd annotations are left out of training (`keep_crowd=False`); for evaluation they are kept with their
    `iscrowd` flag, so that COCO's evaluation ignores detections on them instead of counting them false."""

    def __init__(self, images: Path, annotations: Path, keep_crowd: bool = False):
        from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

        class Reader(CocoDetection):
            def _load_image(self, id: int) -> Image.Image:
                try:
                    return read_image(str(Path(self.root) / self.coco.loadImgs(id)[0]['file_name']))
                except BadImage as err:  # COCO data: the fix is in the json, not the folder
                    raise BadImage(f"Cannot read the image {err.detail}. Replace the file, or remove its entry (and "
                                   f"its annotations) from '{annotations}'; then continue with --resume auto.",
                                   err.detail) from None

        self.keep_crowd = keep_crowd
        self.coco = wrap_dataset_for_transforms_v2(Reader(str(images), str(annotations)),
                                                   target_keys=('boxes', 'labels', 'image_id', 'iscrowd', 'area'))

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, i: int) -> Tuple[tv_tensors.Image, Target]:
        image, target = self.coco[i]
        image = v2.functional.to_image(image)
        h, w = image.shape[-2:]
        if 'boxes' not in target:  # the wrapper returns only the id for an image without annotations
            target['boxes'] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format='XYXY', canvas_size=(h, w))
            target['labels'] = torch.zeros(0, dtype=torch.int64)
        crowd = torch.as_tensor(target.pop('iscrowd', torch.zeros(len(target['labels']))), dtype=torch.bool)
        area = target.pop('area', None)
        if self.keep_crowd:  # evaluation: COCO's size ranges read the annotation's own area (a mask's, not its box's)
            extra = {} if area is None else {'area': torch.as_tensor(area, dtype=torch.float32)}
            return image, {**target, 'iscrowd': crowd.long(), **extra}
        boxes = tv_tensors.wrap(target['boxes'][~crowd], like=target['boxes'])  # indexing drops the box type
        return image, {'boxes': boxes, 'labels': target['labels'][~crowd], 'image_id': target['image_id']}


def _check_annotations(path: Path, images: Path, split: str) -> Tuple[Dict[int, str], str]:
    """The categories of a COCO-format annotation file, after checking what would otherwise fail mid-run (every image
    it names must exist, before any teacher is fitted), and one line on what the loader will change in its boxes."""
    if not path.is_file():
        raise ConfigError(f"The annotation file '{path}' does not exist: with data.name=coco, data.root holds "
                          'det.train_annotations / det.val_annotations (COCO\'s annotations/instances_train2017.json) '
                          'and the image folders det.train_images / det.val_images.')
    try:
        coco = json.loads(path.read_text())
        categories = {int(c['id']): str(c['name']) for c in coco['categories']}
        annotations, entries = coco['annotations'], coco['images']
        sizes = {int(e['id']): (float(e['width']), float(e['height'])) for e in entries}
        files = [e['file_name'] for e in entries]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"'{path}' is not a COCO-format annotation file ({type(err).__name__}: {err}): it needs "
                          "'images' (with id, file_name, width, height), 'annotations' and 'categories'.") from None
    if not categories or min(categories) < 1:
        raise ConfigError(f"'{path}': category ids must be 1 or more (0 is the detectors' background); found "
                          f'{sorted(categories)[:5]}.')
    unknown = sorted({a['category_id'] for a in annotations} - set(categories))
    if unknown:
        raise ConfigError(f"'{path}': annotations use category ids {unknown[:10]} that its 'categories' list lacks: "
                          'add them there or remove those annotations.')
    if not entries:
        raise ConfigError(f"'{path}' lists no images.")
    if not images.is_dir():
        raise ConfigError(f"The image folder '{images}' does not exist (det.train_images / det.val_images are "
                          'relative to data.root).')
    missing = [f for f in files if not (images / f).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} of the {len(files)} images that '{path}' lists are not in '{images}' "
                          f"(first: {', '.join(missing[:3])}): restore the files, or remove those images' entries "
                          "(and their annotations) from the json's 'images' list.")
    return categories, _box_report(annotations, sizes, split)


def _box_report(annotations: List[Dict], sizes: Dict[int, Tuple[float, float]], split: str) -> str:
    """What the loader does to a split's boxes, counted: boxes reaching outside their image are clamped to it, boxes
    left under a pixel wide or high are dropped (torchvision's ClampBoundingBoxes, SanitizeBoundingBoxes), crowd
    boxes are left out of training and kept, flagged, in evaluation (COCO's rule: detections on them are ignored)."""
    clamped = dropped = crowd = 0
    for a in annotations:
        x, y, w, h = (float(v) for v in a['bbox'])
        width, height = sizes.get(int(a['image_id']), (float('inf'), float('inf')))
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        clamped += (x0, y0, x1, y1) != (x, y, x + w, y + h)
        dropped += x1 - x0 < 1 or y1 - y0 < 1
        crowd += bool(a.get('iscrowd', 0))
    use = 'left out of training' if split == 'train' else 'kept, flagged, for evaluation'
    return (f'COCO {split}: {len(annotations)} boxes; {clamped} reach outside their image and are clamped to it, '
            f'{dropped} are under a pixel wide or high and dropped, {crowd} crowd boxes are {use}')


def coco_splits(cfg: DictConfig) -> Splits:
    """`data.root` with COCO's layout (or any COCO-format data at det.*_annotations / det.*_images under it). Labels
    are the category ids, so the class count is the largest id + 1, as torchvision's COCO detectors (91) have it."""
    if not cfg.data.root:
        raise ConfigError('data.name=coco needs data.root, the folder holding the annotation files and image folders '
                          '(data.root=/data/coco).')
    root, d = Path(cfg.data.root), cfg.det
    train_cats, train_note = _check_annotations(root / d.train_annotations, root / d.train_images, 'train')
    val_cats, val_note = _check_annotations(root / d.val_annotations, root / d.val_images, 'val')
    if train_cats != val_cats:
        raise ConfigError(f"The categories of '{root / d.train_annotations}' and '{root / d.val_annotations}' differ: "
                          'both splits need the same category ids and names.')
    if PartialState().is_main_process:
        print(f'[shake-vit] {train_note}\n[shake-vit] {val_note}', flush=True)
    classes = ['background', *(train_cats.get(i, 'N/A') for i in range(1, max(train_cats) + 1))]
    return Splits(CocoImages(root / d.train_images, root / d.train_annotations),
                  CocoImages(root / d.val_images, root / d.val_annotations, keep_crowd=True), classes)


def build_splits(cfg: DictConfig) -> Splits:
    splits = {'digit_scenes': digit_scene_splits, 'coco': coco_splits}[cfg.data.name](cfg)
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise ConfigError(f'The {cfg.data.name} data set has an empty split (train {len(splits.train)}, val '
                          f'{len(splits.val)} images).')
    return splits


def _per_box(sample) -> Tuple[torch.Tensor, ...]:
    """What SanitizeBoundingBoxes drops along with an empty box: its label, and its crowd flag and area where there
    are."""
    target = sample[1]
    extra = tuple(target[k] for k in ('iscrowd', 'area') if k in target)
    return (target['labels'], *extra) if extra else target['labels']


def build_transforms(cfg: DictConfig) -> Tuple[Callable, Callable]:
    """Train: horizontal flip (`det.hflip`); both: float images in [0, 1], boxes clamped to the image and boxes left
    with no area dropped (torchvision's SanitizeBoundingBoxes), with their labels. The detectors resize and
    normalise themselves (their GeneralizedRCNNTransform)."""
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(labels_getter=_per_box)]
    train = [v2.RandomHorizontalFlip(cfg.det.hflip)] if cfg.det.hflip else []
    return v2.Compose([*train, *tail]), v2.Compose(tail)


def collate(batch: List[Tuple[torch.Tensor, Target]]) -> Tuple[List[torch.Tensor], List[Target]]:
    """Images of any size and their targets, as lists (what torchvision's detectors take)."""
    images, targets = zip(*batch)
    plain = [{'boxes': t['boxes'].as_subclass(torch.Tensor), 'labels': t['labels'], 'image_id': t['image_id'],
              **{k: t[k] for k in ('iscrowd', 'area') if k in t}} for t in targets]
    return [i.as_subclass(torch.Tensor) for i in images], plain
