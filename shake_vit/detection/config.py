"""Detection's config: its own section, `det` (the detectors' geometry and sampling, the shadow predictor, the data's
files and the embedded digit scenes), and the checks of the keys only detection reads.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig

from ..core.config import DETECTION, check_choice, key, register_check, register_section, require
from .losses import BALANCES, BOX_TERMS


@dataclass
class BackboneFitConfig:
    """det.backbone_weights=digits: the backbone's classification pretraining on the digits of the training scenes."""

    epochs: int = 15
    img_size: int = 32
    lr: float = 2.0e-3  # AdamW
    batch_size: int = 64


@dataclass
class DetectionConfig:
    """`task: detection` only: the detectors' geometry and sampling, the shadow predictor, the data's files and the
    embedded digit scenes. Defaults are torchvision's Faster R-CNN (and its COCO layout)."""

    min_size: int = 800  # the detectors' resize (torchvision's GeneralizedRCNNTransform), shorter side
    max_size: int = 1333  # longer side
    anchor_sizes: Optional[List[int]] = None  # one per FPN level for the small detectors; null: (32, ..., 512)
    fpn_channels: int = 256  # the small detectors' (fasterrcnn_resnet18_fpn, _resnet34_fpn) FPN width
    box_head_dim: int = 1024  # the small detectors' box head width (TwoMLPHead)
    trainable_backbone_layers: int = 5  # backbone stages trained (torchvision's 3 for ImageNet-initialised ones)
    backbone_weights: Optional[str] = None  # the student's backbone: a torchvision weights name (IMAGENET1K_V1,
    # read from $TORCH_HOME/hub/checkpoints when there, downloaded once otherwise); digits (pretrained here on the
    # training scenes' digits, det.backbone_fit); a ResNet state dict file; null: random. A teacher fitted here
    # starts from its own teacher.kwargs.backbone_weights (shake_vit/detection/backbone.py)
    backbone_fit: BackboneFitConfig = field(default_factory=BackboneFitConfig)
    rpn_proposals_train: int = 2000  # RPN proposals kept after NMS per image (torchvision's defaults)
    rpn_proposals_test: int = 1000
    rois_per_image: int = 512  # RoIs sampled per image for the box head in training
    detections_per_image: int = 100
    # the shadow predictor reads the frozen teacher's box features of the student's RoIs and starts as the teacher's
    # predictor (teacher: the SHAKE authors' proxy teacher), or the student's own box features (student)
    shadow_on: str = key('teacher', choices=('teacher', 'student'))
    shadow_box_head: bool = False  # the shadow predictor reads its own copy of the box head (a stronger shadow)
    hflip: float = 0.5  # horizontal flip at train time
    train_annotations: str = 'annotations/instances_train2017.json'  # coco: relative to data.root
    train_images: str = 'train2017'
    val_annotations: str = 'annotations/instances_val2017.json'
    val_images: str = 'val2017'
    scenes: List[int] = field(default_factory=lambda: [1000, 200])  # digit_scenes: train and val scenes
    canvas: int = 128  # digit_scenes: square canvas, pixels
    digits_per_scene: List[int] = field(default_factory=lambda: [1, 4])
    digit_sizes: List[int] = field(default_factory=lambda: [20, 44])  # pixels, the digit's side
    noise: float = 0.05  # digit_scenes: std of the Gaussian pixel noise (images in [0, 1])


register_section('det', DetectionConfig, DetectionConfig, after='eval', family=DETECTION)


@register_check(family=DETECTION)
def check_detection(cfg: DictConfig) -> None:
    check_choice(cfg, 'loss.det_balance', BALANCES)
    check_choice(cfg, 'loss.det_box', BOX_TERMS)
    g, loss = cfg.det, cfg.loss
    for name in ('min_size', 'max_size', 'canvas'):
        require(g[name] >= 16, f'det.{name}', g[name], 'at least 16 pixels')
    require(g.max_size >= g.min_size, 'det.max_size', g.max_size, f'at least det.min_size ({g.min_size})')
    for name in ('fpn_channels', 'box_head_dim', 'rpn_proposals_train', 'rpn_proposals_test', 'rois_per_image',
                'detections_per_image'):
        require(g[name] >= 1, f'det.{name}', g[name], 'at least 1')
    require(0 <= g.trainable_backbone_layers <= 5, 'det.trainable_backbone_layers', g.trainable_backbone_layers,
            '0 to 5 (the backbone stages that train, from the last)')
    require(0 <= g.hflip <= 1, 'det.hflip', g.hflip, 'a probability in [0, 1]')
    require(g.noise >= 0, 'det.noise', g.noise, 'zero or positive')
    require(len(g.scenes) == 2 and min(g.scenes) >= 1, 'det.scenes', list(g.scenes),
            'two counts, [train, val], each at least 1')
    require(len(g.digits_per_scene) == 2 and 1 <= g.digits_per_scene[0] <= g.digits_per_scene[1],
            'det.digits_per_scene', list(g.digits_per_scene), 'two counts lo <= hi, lo at least 1')
    require(len(g.digit_sizes) == 2 and 4 <= g.digit_sizes[0] <= g.digit_sizes[1] <= g.canvas,
            'det.digit_sizes', list(g.digit_sizes), f'two sizes 4 <= lo <= hi <= det.canvas ({g.canvas})')
    require(g.anchor_sizes is None or (len(g.anchor_sizes) == 4 and min(g.anchor_sizes) > 0), 'det.anchor_sizes',
            None if g.anchor_sizes is None else list(g.anchor_sizes), 'null or four positive sizes, one per FPN level')
    require(loss.box_beta > 0, 'loss.box_beta', loss.box_beta, 'positive')
    f = g.backbone_fit
    for name in ('epochs', 'batch_size'):
        require(f[name] >= 1, f'det.backbone_fit.{name}', f[name], 'at least 1')
    require(f.img_size >= 16, 'det.backbone_fit.img_size', f.img_size, 'at least 16 pixels')
    require(f.lr > 0, 'det.backbone_fit.lr', f.lr, 'positive')
    require(0 <= loss.label_weight <= 1, 'loss.label_weight', loss.label_weight, 'a share in [0, 1]')
    for name in ('shadow_anchor', 'bound_margin'):
        require(loss[name] >= 0, f'loss.{name}', loss[name], 'zero or positive')
