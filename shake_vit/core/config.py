"""Typed configuration: defaults, YAML recipes, `section.key=value` overrides, validation, derived values.

The dataclass defaults are the DeiT ImageNet recipe with SHAKE (what `configs/deit_tiny_shake_in1k.yaml` runs); a
recipe YAML holds only its deltas. Unknown keys and wrong types are errors that name the key and the nearest valid one.
"""
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from ..distill import methods
from ..detection.losses import BALANCES, BOX_TERMS
from ..distill.losses import KL_REDUCTIONS


class ConfigError(ValueError):
    """A configuration value the trainer cannot run with; the message says which and how to fix it."""


@dataclass
class DataConfig:
    name: str = 'imagefolder'  # imagefolder | digits | cifar10 | cifar100 | fake
    root: Optional[str] = None  # imagefolder: holds train/ and val/; cifar: the torchvision root
    download: bool = False  # cifar: fetch when missing (needs internet)
    img_size: int = 224
    mean: Optional[List[float]] = None  # input normalisation; null: the student's timm pretrained_cfg (ImageNet)
    std: Optional[List[float]] = None
    num_classes: int = 10  # fake only; every other data set reads its class count from the data
    fake_size: List[int] = field(default_factory=lambda: [512, 128])  # fake: train and val image counts
    val_fraction: float = 0.2  # digits: held-out share when num_folds == 0
    num_folds: int = 0  # digits: k-fold cross-validation when > 1 (fold picks the held-out fold)
    fold: int = 0
    inner_val_fraction: float = 0.0  # digits: > 0 evaluates on this share of the training split, never the test split
    split_seed: int = 0  # digits: seeds the split, so teacher and students see the same one
    num_workers: int = 8
    pin_memory: bool = True


@dataclass
class AugConfig:
    """Train-time augmentation; the defaults are DeiT's, which differ from timm's own (docs/method.md, "DeiT's
    recipe in timm")."""

    auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1'  # timm policy string; null disables
    interpolation: str = 'bicubic'
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    color_jitter: List[float] = field(default_factory=lambda: [0.3, 0.3, 0.3])  # brightness, contrast, saturation
    # [, hue]; timm ignores it whenever auto_augment is set, as DeiT does
    train_crop: str = 'rrc'  # rrc: random resized crop (ImageNet) | pad_crop: pad, random crop (DeiT and CRD at 32 px)
    crop_padding: int = 4  # pad_crop: pixels of zero padding on each side
    re_prob: float = 0.25
    re_mode: str = 'pixel'
    re_count: int = 1
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then centre crop
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    smoothing: float = 0.1
    repeated_aug: int = 3  # copies of each image per epoch, spread over processes; 1 disables


@dataclass
class ModelConfig:
    """The student: a distilled DeiT (`deit_*_distilled_*`, the shadow head on its distillation token) or any timm
    classifier (the shadow head on its pooled features)."""

    name: str = 'deit_tiny_distilled_patch16_224'
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (img_size, depth, ...)
    drop_path_rate: float = 0.1
    shadow_head: str = 'linear'  # linear | mlp
    shadow_hidden_dim: int = 0  # mlp hidden width; 0 = the embedding width
    predict: Optional[str] = None  # eval-mode output: cls | avg (all heads); null: the method's (shake cls, deit avg)
    pretrained: Optional[str] = None  # fine-tune from: a local file (timm / DeiT / .safetensors) or a timm name.tag
    shadow_on: str = 'auto'  # token (a DeiT's distillation token) | pooled (any classifier's pooled features) | auto
    # | teacher (the authors' proxy teacher on the teacher's feature maps, shake_vit.models.ProxyTeacherHead)
    proxy_features: Optional[List[int]] = None  # shadow_on=teacher: 3 indices into the teacher's feature maps; null:
    # the maps the SHAKE authors fused for CRD's networks, the last three for other timm CNNs
    cifar_stem: bool = False  # CIFAR form of a timm ResNet/MobileNet (32-px stem) or VGG (CRD's head); see README


@dataclass
class TeacherFitConfig:
    """Fitting a teacher on the training split when no checkpoint is given."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    sched: str = 'cosine'  # cosine | multistep (optim.decay_milestones, CRD's teachers) | step | constant


@dataclass
class TeacherConfig:
    name: str = 'regnety_160.deit_in1k'  # DeiT's RegNetY-16GF teacher (82.9% top-1), a timm model[.tag] name
    pretrained: bool = False  # download timm's weights for `name` (needs internet); see `checkpoint` for local files
    checkpoint: Optional[str] = None  # a local timm state dict (.pth/.pt/.bin/.safetensors)
    mean: Optional[List[float]] = None  # the teacher's input normalisation; null: what its weights were trained with
    std: Optional[List[float]] = None  # (a fitted teacher's record, timm's pretrained_cfg, else the data's)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    fit: TeacherFitConfig = field(default_factory=TeacherFitConfig)  # used when neither pretrained nor checkpoint
    inference_mode: bool = True  # run the teacher under torch.inference_mode (else no_grad)
    precision: str = 'auto'  # auto: follow train.mixed_precision | fp32 | bf16 | fp16 (teacher weights cast)
    channels_last: bool = False  # channels-last memory format (CNN teachers on GPUs)
    cifar_stem: bool = False  # CIFAR form of a timm ResNet/MobileNet/VGG (see shake_vit.models.cifar_stem)
    compile: bool = False  # torch.compile the teacher
    class_map: Optional[str] = None  # auto: select and order the teacher's logits as the data's classes, by name |
    # a YAML/JSON file of `data class: teacher class` renamings (shake_vit/classmap.py)
    class_names: Optional[str] = None  # the teacher's class names in output order (a text file or JSON list), when
    # neither its file nor timm records them
    cache: Optional[str] = None  # read every teacher's outputs from a cache written by --cache-teacher (no teacher is
    # built); README "Teacher-output cache", shake_vit/teacher_cache.py


@dataclass
class HealthConfig:
    """The run's health checks (shake_vit/health.py), each with its own switch."""

    teacher: bool = True  # the teachers' top-1 on the first validation images, before training; stops a broken one
    teacher_images: int = 500  # how many validation images that check scores
    near_chance: float = 2.0  # a teacher with no recorded top-1 fails below near_chance x chance (100 / classes)
    max_drop: float = 20.0  # a teacher fails this many points below the top-1 its file records
    class_order: bool = True  # a teacher whose known class names are the data's in another order stops the run
    stall: bool = True  # warn when the student's cross-entropy is still near chance ...
    stall_after: float = 0.2  # ... after this share of the run's updates ...
    stall_fraction: float = 0.9  # ... i.e. above stall_fraction x ln(classes)
    dominance: bool = True  # warn when, at the first log point, a distillation term is ...
    det_min_ap50: float = 1.0  # detection: a teacher with no recorded AP fails below this AP50
    shadow_drift: float = 0.5  # detection: warn when the shadow predictor's KL from the teacher exceeds this (0: off)
    stall_fg_acc: float = 0.05  # detection: the stall check's floor on the student's foreground-RoI accuracy ...
    stall_after_det: float = 0.4  # ... once this share of the updates is done (a healthy digit-scenes run from a
    # pretrained backbone still calls every RoI background for its first ~100 of 480 updates: 0.3% at update 90)
    dominance_factor: float = 4.5  # ... more than this many times the student's cross-entropy (the quick start: 3.9x;
    # the 20-epoch digits protocol at T = 4, where one run in twelve stalled: 4.9x)


@dataclass
class TeacherCacheConfig:
    """How `train.py --cache-teacher DIR` stores the teachers' outputs (shake_vit/teacher_cache.py)."""

    store: str = 'auto'  # auto: full when the whole schedule fits max_gb, else topk | full | topk | argmax (deit_hard)
    topk: int = 10  # logits kept per sample by 'topk'; the rest share one value that carries their softmax mass
    precision: str = 'auto'  # auto: the teacher's own output precision (exact) | fp32 (exact) | fp16 (half the disk)
    max_gb: float = 50.0  # 'auto' stores full logits when the whole schedule's cache stays under this size


@dataclass
class LossConfig:
    method: str = 'shake'  # shake | deit_hard | deit_hard_cls | deit_soft | kd | none | none_both_heads
    # (classification; detection: shake | kd | none; shake_vit/methods.py)
    temperature: Optional[float] = None  # null: the method's published default (shake 4, kd 4, deit_soft 1)
    mutual: float = 1.0  # shake: lambda, the weight of both mutual terms
    mutual_student: Optional[float] = None  # shake: the student <- shadow weight; null: loss.mutual
    mutual_shadow: Optional[float] = None  # shake: the shadow <- student weight; null: loss.mutual (classification),
    # 0.1 (detection: a shadow pulled toward an untrained detector at weight 1 loses the teacher; docs/detection.md)
    teacher_weight: float = 1.0  # shake: weight of the shadow head's teacher term
    teacher_loss: str = 'kl'  # shake: kl (paper) | mse (authors' code)
    standardize: bool = False  # shake: standardise logits first (authors' code)
    shadow_ce: float = 0.0  # shake: ground truth on the shadow head (authors' code: 1)
    direct_kd: float = 0.0  # shake: direct KL_T(s -> t)
    deit_alpha: float = 0.5  # deit_hard / deit_hard_cls / deit_soft: weight of the distillation term
    deit_soft_reduction: str = 'batchmean'  # deit_soft's KL: batchmean (timm) | numel (DeiT's sum / numel: / classes)
    kd_alpha: float = 0.9  # kd: weight of the KL term (CRD protocol)
    box_beta: float = 0.1111111111111111  # detection: smooth-L1 beta of the box distance, torchvision's (1/9)
    ramp_student: bool = False  # detection shake: ramp the student <- shadow weight in over the lr warm-up
    ramp_shadow: bool = False  # detection shake: ramp the shadow <- student weight in likewise
    shadow_anchor: float = 1.0  # detection shake: torchvision's RoI losses on the labels on the shadow's outputs
    det_balance: str = 'none'  # detection kd / shake: the student's class KL beside its CE: none (added at full
    # weight) | chen (label_weight x CE + (1 - label_weight) x KL) | defeat (foreground and background RoIs averaged
    # separately); chen slowed the student on the digit scenes (docs/results/detection.md)
    label_weight: float = 0.5  # detection, det_balance=chen: mu, the cross-entropy's share
    det_agree: bool = False  # detection kd / shake: distil classes only on RoIs whose target's top class is the label
    det_box: str = 'distance'  # detection kd / shake: the student's box term: distance (smooth-L1 to the target's
    # deltas) | bounded (Chen et al.: only where the student's error exceeds the target's) | none
    bound_margin: float = 0.0  # detection, det_box=bounded: the margin m


@dataclass
class OptimConfig:
    opt: str = 'adamw'  # any timm optimizer name
    lr: Optional[float] = None  # absolute lr; null: base_lr * global_batch / lr_base_size (DeiT's rule)
    base_lr: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    filter_bias_and_bn: bool = True  # no weight decay on biases, norms, cls/dist tokens and position embeddings
    # (timm, DeiT); false: on every parameter (CRD's SGD)
    momentum: float = 0.9
    clip_grad: Optional[float] = None
    fused: bool = True  # fused AdamW/Adam kernels when training on CUDA
    sched: str = 'cosine'  # cosine | multistep (decay_milestones) | step (every decay_epochs) | constant
    decay_milestones: List[int] = field(default_factory=lambda: [30, 60, 90])  # epochs where lr *= decay_rate
    decay_rate: float = 0.1
    decay_epochs: float = 30
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 128  # per process
    grad_accum: int = 1
    mixed_precision: str = 'no'  # no | bf16 | fp16
    seed: int = 0
    output_dir: str = 'runs/default'
    log_interval: int = 50  # updates between TensorBoard points (losses are summed on device in between)
    max_updates_per_epoch: int = 0  # > 0 cuts every epoch short (smoke tests)
    ema: bool = False
    ema_decay: float = 0.99996
    compile: bool = False  # torch.compile the student (Accelerate's dynamo backend 'inductor')
    overwrite: bool = False  # a new run into a folder holding another run's checkpoints / results removes them first
    trust_pickled_files: bool = False  # allow checkpoints that need arbitrary unpickling (only for trusted files)
    cpu_threads: int = 0  # CPU-only runs: 0 = the machine's cores shared by its processes, -1 = leave as launched
    log_with: List[str] = field(default_factory=lambda: ['tensorboard'])  # Accelerate's trackers: tensorboard, wandb,
    # comet_ml, aim, mlflow, clearml, dvclive, swanlab, trackio (their packages installed by you); [] logs to none


@dataclass
class CheckpointConfig:
    interval_updates: int = 0  # also save every N updates mid-epoch (0: only at epoch ends)
    keep_last: int = 3  # newest checkpoints kept; the best one is always kept too
    metric: Optional[str] = None  # evaluation entry that picks the best checkpoint (higher is better); null:
    # the top-1 of what the student predicts with (top1_cls for SHAKE, top1_avg for DeiT's methods)
    stop_check_every: int = 10  # updates between the processes' agreement on a SIGTERM/SIGINT stop


@dataclass
class EvalConfig:
    batch_size: int = 256
    interval: int = 1  # evaluate every N epochs (and always after the last)


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
    shadow_on: str = 'teacher'
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


@dataclass
class Config:
    task: str = 'classification'  # classification | detection (Faster R-CNN students, shake_vit/detection/)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    extra_teachers: List[TeacherConfig] = field(default_factory=list)  # SHAKE with several teachers (paper Eq. 6)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    det: DetectionConfig = field(default_factory=DetectionConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    health: HealthConfig = field(default_factory=HealthConfig)


DATA = {'classification': ('imagefolder', 'digits', 'cifar10', 'cifar100', 'fake'),
        'detection': ('digit_scenes', 'coco')}
CHOICES = {
    'task': tuple(DATA),
    'loss.teacher_loss': ('kl', 'mse'),
    'det.shadow_on': ('teacher', 'student'),
    'loss.det_balance': BALANCES,
    'loss.det_box': BOX_TERMS,
    'loss.deit_soft_reduction': KL_REDUCTIONS,
    'model.shadow_head': ('linear', 'mlp'),
    'model.predict': (None, 'avg', 'cls'),
    'model.shadow_on': ('auto', 'token', 'pooled', 'teacher'),
    'optim.sched': ('cosine', 'multistep', 'step', 'constant'),
    'teacher.fit.sched': ('cosine', 'multistep', 'step', 'constant'),
    'train.mixed_precision': ('no', 'bf16', 'fp16'),
    'teacher.precision': ('auto', 'fp32', 'bf16', 'fp16'),
    'aug.re_mode': ('pixel', 'const', 'rand'),
    'aug.mixup_mode': ('batch', 'pair', 'elem'),
    'aug.train_crop': ('rrc', 'pad_crop'),
    'teacher_cache.store': ('auto', 'full', 'topk', 'argmax'),
    'teacher_cache.precision': ('auto', 'fp32', 'fp16'),
}


def _all_keys(node: Any, prefix: str = '') -> List[str]:
    keys = []
    for k, v in node.items():
        full = f'{prefix}{k}'
        keys.append(full)
        if isinstance(v, DictConfig) and OmegaConf.get_type(v) not in (dict, None):
            keys.extend(_all_keys(v, full + '.'))
    return keys


def _explain(err: OmegaConfBaseException, base: DictConfig, source: str) -> ConfigError:
    key = getattr(err, 'full_key', None) or getattr(err, 'key', None) or '?'
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        close = difflib.get_close_matches(str(key), _all_keys(base), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ' `python train.py --print-config` lists every key.'
        return ConfigError(f"Unknown config key '{key}' (from {source}).{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"Bad value for '{key}' (from {source}): {msg}.")
    return ConfigError(f'Could not read the configuration from {source}: {str(err).splitlines()[0]}')


def _recipe_chain(path: Path, seen: Sequence[Path] = (), first: bool = False) -> List[tuple]:
    """A recipe and the recipes it builds on, base first: a top-level `_base_: other.yaml` (relative to the file)
    lets a recipe hold only its deltas from another recipe. A file marked `_add_on_: RECIPE` (the smoke overlays) is
    refused as the `first` file: it completes a recipe."""
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist. Recipes live in configs/, e.g. "
                          'configs/quickstart.yaml.')
    if path.resolve() in seen:
        raise ConfigError(f"Config file '{path}' includes itself through _base_.")
    try:
        recipe = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come from the yaml package
        raise ConfigError(f"Could not parse '{path}': {str(err).splitlines()[0]}") from None
    base = recipe.pop('_base_', None) if isinstance(recipe, DictConfig) else None
    add_on = recipe.pop('_add_on_', None) if isinstance(recipe, DictConfig) else None
    if add_on and not seen and first:  # an overlay given where a recipe belongs
        raise ConfigError(f"'{path}' is an add-on to a recipe, not a recipe of its own: give a recipe before it, as "
                          f'in --config {add_on} --config {path}.')
    chain = _recipe_chain(path.parent / base, [*seen, path.resolve()]) if base else []
    return [*chain, (path, recipe)]


def _free_form_keys(cfg: DictConfig) -> List[str]:
    """The dotted keys of the free-form dicts (timm keyword arguments), where any key is allowed."""
    return ['model.kwargs', 'teacher.kwargs', *(f'extra_teachers.{i}.kwargs' for i in range(len(cfg.extra_teachers)))]


def _open_free_form(cfg: DictConfig) -> None:
    """Let the free-form dicts take new keys; a node replaced by a merge or an update inherits struct mode again."""
    for key in _free_form_keys(cfg):
        OmegaConf.set_struct(OmegaConf.select(cfg, key), False)


def _empty_dicts(node: Any, prefix: str = '') -> List[str]:
    """Dotted keys of a recipe layer whose value is `{}`."""
    found = []
    for k, v in node.items() if isinstance(node, DictConfig) else ():
        if isinstance(v, DictConfig):
            found += [f'{prefix}{k}'] if len(v) == 0 else _empty_dicts(v, f'{prefix}{k}.')
    return found


def _clear(cfg: DictConfig, key: str) -> None:
    """`{}` empties a free-form dict (`model.kwargs: {}` in a recipe, `model.kwargs={}` on the command line); on a
    typed section (`aug: {}`) it changes nothing, as merging nothing would."""
    if key in _free_form_keys(cfg):
        OmegaConf.update(cfg, key, {}, merge=False)


def load_config(paths: Union[None, str, Sequence[str]] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then each recipe in `paths` in order (e.g. a recipe, then `configs/smoke.yaml`), then
    `section.key=value` overrides; validated.

    A dict merges into what is there, key by key, except `{}`, which empties a free-form dict (`model.kwargs`,
    `teacher.kwargs`), in a recipe and on the command line alike: how a recipe's ViT arguments go when the student
    becomes a CNN. Dotted keys reach into a free-form dict (`model.kwargs.img_size=32`) whatever came before.
    """
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    _open_free_form(cfg)
    for index, path in enumerate([paths] if isinstance(paths, str) else (paths or [])):
        for source, layer in _recipe_chain(Path(path), first=index == 0):
            try:
                cfg = OmegaConf.merge(cfg, layer)
                _open_free_form(cfg)
                for key in _empty_dicts(layer):
                    _clear(cfg, key)
            except OmegaConfBaseException as err:
                raise _explain(err, cfg, str(source)) from None
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f"Override '{item}' is not of the form section.key=value (e.g. train.epochs=10).")
        key = item.split('=', 1)[0]
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)  # the value, typed by OmegaConf's grammar
            if isinstance(value, (dict, DictConfig)) and len(value) == 0:
                _clear(cfg, key)
            else:  # merge=True handles list indices (extra_teachers.0.checkpoint=...) and adds to a dict
                OmegaConf.update(cfg, key, value, merge=True)
            _open_free_form(cfg)
        except OmegaConfBaseException as err:
            raise _explain(err, cfg, f"override '{item}'") from None
    if cfg.train.mixed_precision in ('False', 'false', 'off'):  # YAML and the command line read a bare `no` as false
        cfg.train.mixed_precision = 'no'
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' is {value!r}; it must be {need}.")


def validate(cfg: DictConfig) -> None:
    """Value checks that types alone cannot express; each failure names the key and the fix."""
    for key, choices in [*CHOICES.items(), ('data.name', DATA.get(cfg.task, ())),
                         ('loss.method', tuple(methods.METHODS.get(cfg.task, ())))]:
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            named = [str(c) for c in choices if c is not None] + (['null'] if None in choices else [])
            close = difflib.get_close_matches(str(value), named, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ''
            task = f' for task {cfg.task}' if key in ('data.name', 'loss.method') else ''
            raise ConfigError(f"'{key}' is {value!r}; choose one of {', '.join(named)}{task}.{hint}")
    if cfg.extra_teachers and not methods.of(cfg).several_teachers:
        raise ConfigError(f"extra_teachers is set but loss.method is '{cfg.loss.method}', which takes one teacher: "
                          'several teachers are SHAKE\'s (one shadow head each). Use loss.method=shake, or drop '
                          'extra_teachers.')
    for who in ('data', 'teacher', *(f'extra_teachers.{i}' for i in range(len(cfg.extra_teachers)))):
        mean, std = OmegaConf.select(cfg, f'{who}.mean'), OmegaConf.select(cfg, f'{who}.std')
        for stat, value in (('mean', mean), ('std', std)):
            _check(value is None or (len(value) == 3 and (stat == 'mean' or min(value) > 0)), f'{who}.{stat}',
                   value if value is None else list(value), 'null or three per-channel values (std positive)')
        if (mean is None) != (std is None):
            raise ConfigError(f"Set {who}.mean and {who}.std together (per-channel input statistics); only "
                              f"{who}.{'mean' if std is None else 'std'} is set.")
    _check_task_sections(cfg)
    t, o, a, d = cfg.train, cfg.optim, cfg.aug, cfg.data
    _check(t.epochs >= 1, 'train.epochs', t.epochs, 'at least 1')
    _check(t.batch_size >= 1, 'train.batch_size', t.batch_size, 'at least 1')
    _check(t.grad_accum >= 1, 'train.grad_accum', t.grad_accum, 'at least 1')
    _check(t.log_interval >= 1, 'train.log_interval', t.log_interval, 'at least 1')
    _check(cfg.ckpt.interval_updates >= 0, 'ckpt.interval_updates', cfg.ckpt.interval_updates, '0 (off) or positive')
    _check(cfg.ckpt.keep_last >= 1, 'ckpt.keep_last', cfg.ckpt.keep_last, 'at least 1')
    _check(cfg.ckpt.stop_check_every >= 1, 'ckpt.stop_check_every', cfg.ckpt.stop_check_every, 'at least 1')
    _check(0 < t.ema_decay < 1, 'train.ema_decay', t.ema_decay, 'between 0 and 1')
    _check(o.lr is None or o.lr > 0, 'optim.lr', o.lr, 'positive (or null for the DeiT scaling rule)')
    _check(o.base_lr > 0, 'optim.base_lr', o.base_lr, 'positive')
    _check(o.weight_decay >= 0, 'optim.weight_decay', o.weight_decay, 'zero or positive')
    _check(o.warmup_epochs >= 0, 'optim.warmup_epochs', o.warmup_epochs, 'zero or positive')
    _check(o.clip_grad is None or o.clip_grad > 0, 'optim.clip_grad', o.clip_grad, 'positive or null')
    _check(cfg.loss.temperature is None or cfg.loss.temperature > 0, 'loss.temperature', cfg.loss.temperature,
           'positive (or null for the method default)')
    for key in ('mutual', 'mutual_student', 'mutual_shadow', 'teacher_weight'):
        value = cfg.loss[key]
        _check(value is None or value >= 0, f'loss.{key}', value, 'zero or positive')
    _check(d.img_size >= 8, 'data.img_size', d.img_size, 'at least 8 pixels')
    _check(0 < d.val_fraction < 1, 'data.val_fraction', d.val_fraction, 'between 0 and 1')
    _check(d.num_folds == 0 or d.num_folds >= 2, 'data.num_folds', d.num_folds, '0 (a holdout split) or >= 2')
    _check(0 <= d.inner_val_fraction < 1, 'data.inner_val_fraction', d.inner_val_fraction, 'in [0, 1)')
    _check(d.num_folds == 0 or 0 <= d.fold < d.num_folds, 'data.fold', d.fold,
           f'in [0, data.num_folds={d.num_folds})')
    _check(len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1, 'aug.scale', list(a.scale),
           'two fractions lo <= hi in (0, 1]')
    _check(0 < a.crop_pct <= 1, 'aug.crop_pct', a.crop_pct, 'in (0, 1]')
    _check(len(a.color_jitter) in (3, 4), 'aug.color_jitter', list(a.color_jitter),
           '3 or 4 strengths: brightness, contrast, saturation[, hue]')
    _check(a.repeated_aug >= 1, 'aug.repeated_aug', a.repeated_aug, 'at least 1 (1 disables it)')
    _check(0 <= a.smoothing < 1, 'aug.smoothing', a.smoothing, 'in [0, 1)')
    if cfg.task == 'detection':
        _check_det(cfg.det, cfg.loss)
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    for name in t.log_with:
        if name not in LOGGER_TYPE_TO_CLASS:
            close = difflib.get_close_matches(str(name), list(LOGGER_TYPE_TO_CLASS), n=1)
            raise ConfigError(f"'train.log_with' names {name!r}, which Accelerate does not know; choose from "
                              f"{', '.join(LOGGER_TYPE_TO_CLASS)}." + (f" Did you mean '{close[0]}'?" if close else ''))
    h = cfg.health
    _check(h.teacher_images >= 1, 'health.teacher_images', h.teacher_images, 'at least 1')
    _check(h.near_chance > 0, 'health.near_chance', h.near_chance, 'positive')
    _check(h.max_drop >= 0, 'health.max_drop', h.max_drop, 'zero or positive (percentage points)')
    _check(0 <= h.stall_after <= 1, 'health.stall_after', h.stall_after, 'a share of the run in [0, 1]')
    _check(0 < h.stall_fraction <= 1, 'health.stall_fraction', h.stall_fraction, 'in (0, 1]')
    _check(h.dominance_factor > 0, 'health.dominance_factor', h.dominance_factor, 'positive')
    _check(cfg.teacher_cache.topk >= 1, 'teacher_cache.topk', cfg.teacher_cache.topk, 'at least 1')
    _check(cfg.teacher_cache.max_gb > 0, 'teacher_cache.max_gb', cfg.teacher_cache.max_gb, 'positive')
    for i, extra in enumerate(cfg.extra_teachers):
        _check(extra.cache is None, f'extra_teachers.{i}.cache', extra.cache,
               'null: the cache that teacher.cache names holds every teacher')
    for who, teacher in (('teacher', cfg.teacher),
                         *((f'extra_teachers.{i}', e) for i, e in enumerate(cfg.extra_teachers))):
        if teacher.class_map and cfg.model.shadow_on == 'teacher':
            raise ConfigError(f"{who}.class_map selects the teacher's logits, but model.shadow_on=teacher fuses its "
                              'feature maps through its own classifier: use a teacher trained on your classes.')
    if cfg.teacher.cache and cfg.model.shadow_on == 'teacher' and methods.of(cfg).needs_teacher:
        raise ConfigError("teacher.cache holds the teachers' logits, but model.shadow_on=teacher makes the shadow "
                          "head read the teacher's feature maps on every step: run the live teacher (drop "
                          'teacher.cache) or put the shadow head on the student (model.shadow_on=auto).')
    if mixup_active(cfg):
        _check(t.batch_size % 2 == 0, 'train.batch_size', t.batch_size,
               'even when mixup or cutmix is on (timm Mixup pairs each sample with its mirror in the batch); '
               'set aug.mixup=0 aug.cutmix=0 to train with an odd batch')


def _check_det(g: DictConfig, loss: DictConfig) -> None:
    for key in ('min_size', 'max_size', 'canvas'):
        _check(g[key] >= 16, f'det.{key}', g[key], 'at least 16 pixels')
    _check(g.max_size >= g.min_size, 'det.max_size', g.max_size, f'at least det.min_size ({g.min_size})')
    for key in ('fpn_channels', 'box_head_dim', 'rpn_proposals_train', 'rpn_proposals_test', 'rois_per_image',
                'detections_per_image'):
        _check(g[key] >= 1, f'det.{key}', g[key], 'at least 1')
    _check(0 <= g.trainable_backbone_layers <= 5, 'det.trainable_backbone_layers', g.trainable_backbone_layers,
           '0 to 5 (the backbone stages that train, from the last)')
    _check(0 <= g.hflip <= 1, 'det.hflip', g.hflip, 'a probability in [0, 1]')
    _check(g.noise >= 0, 'det.noise', g.noise, 'zero or positive')
    _check(len(g.scenes) == 2 and min(g.scenes) >= 1, 'det.scenes', list(g.scenes),
           'two counts, [train, val], each at least 1')
    _check(len(g.digits_per_scene) == 2 and 1 <= g.digits_per_scene[0] <= g.digits_per_scene[1],
           'det.digits_per_scene', list(g.digits_per_scene), 'two counts lo <= hi, lo at least 1')
    _check(len(g.digit_sizes) == 2 and 4 <= g.digit_sizes[0] <= g.digit_sizes[1] <= g.canvas,
           'det.digit_sizes', list(g.digit_sizes), f'two sizes 4 <= lo <= hi <= det.canvas ({g.canvas})')
    _check(g.anchor_sizes is None or (len(g.anchor_sizes) == 4 and min(g.anchor_sizes) > 0), 'det.anchor_sizes',
           None if g.anchor_sizes is None else list(g.anchor_sizes), 'null or four positive sizes, one per FPN level')
    _check(loss.box_beta > 0, 'loss.box_beta', loss.box_beta, 'positive')
    f = g.backbone_fit
    for key in ('epochs', 'batch_size'):
        _check(f[key] >= 1, f'det.backbone_fit.{key}', f[key], 'at least 1')
    _check(f.img_size >= 16, 'det.backbone_fit.img_size', f.img_size, 'at least 16 pixels')
    _check(f.lr > 0, 'det.backbone_fit.lr', f.lr, 'positive')
    _check(0 <= loss.label_weight <= 1, 'loss.label_weight', loss.label_weight, 'a share in [0, 1]')
    for key in ('shadow_anchor', 'bound_margin'):
        _check(loss[key] >= 0, f'loss.{key}', loss[key], 'zero or positive')


# Settings one task family reads and the other does not: set away from their defaults under the other task, they
# would be ignored without a word, so they are refused.
CLASSIFICATION_ONLY = ('aug', 'data.img_size', 'data.mean', 'data.std', 'data.num_classes', 'data.fake_size',
                       'data.num_folds', 'data.fold', 'data.inner_val_fraction', 'model.drop_path_rate',
                       'model.shadow_head', 'model.shadow_hidden_dim', 'model.predict', 'model.shadow_on',
                       'model.proxy_features', 'model.cifar_stem', 'teacher.mean', 'teacher.std', 'teacher.cifar_stem',
                       'teacher.channels_last', 'teacher.cache', 'teacher_cache', 'teacher.class_map',
                       'teacher.class_names', 'loss.teacher_loss',
                       'loss.standardize', 'loss.shadow_ce',
                       'loss.direct_kd', 'loss.deit_alpha', 'loss.deit_soft_reduction', 'loss.kd_alpha')
DETECTION_ONLY = ('det', 'loss.box_beta', 'loss.ramp_student', 'loss.ramp_shadow', 'loss.shadow_anchor',
                  'loss.det_balance', 'loss.label_weight', 'loss.det_agree', 'loss.det_box', 'loss.bound_margin')
INSTEAD = {'aug.hflip': 'det.hflip', 'data.img_size': 'det.min_size / det.max_size',
           'data.mean': "the detector's own normalisation", 'data.std': "the detector's own normalisation",
           'teacher.mean': "the teacher detector's own normalisation", 'teacher.std': "the teacher detector's own "
           'normalisation', 'loss.kd_alpha': 'loss.teacher_weight', 'model.shadow_head': 'det.shadow_box_head'}


def _leaves(node: Any, prefix: str) -> Dict[str, Any]:
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None):
        return {k: v for key in node for k, v in _leaves(node[key], f'{prefix}.{key}').items()}
    return {prefix: OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node}


def _check_task_sections(cfg: DictConfig) -> None:
    """Refuse another task family's settings when they differ from their defaults (see CLASSIFICATION_ONLY)."""
    other = CLASSIFICATION_ONLY if cfg.task == 'detection' else DETECTION_ONLY
    defaults = OmegaConf.structured(Config)
    changed = [key for top in other for key, value in _leaves(OmegaConf.select(cfg, top), top).items()
               if value != _leaves(OmegaConf.select(defaults, key), key)[key]]
    if changed:
        hints = ''.join(f' ({k}: use {INSTEAD[k]})' for k in changed if k in INSTEAD)
        kind, one = ('classification' if cfg.task == 'detection' else 'detection'), len(changed) == 1
        raise ConfigError(f"{', '.join(changed[:6])} {'is a' if one else 'are'} {kind} setting{'' if one else 's'}, "
                          f'which task {cfg.task} does not use: remove {"it" if one else "them"}{hints}.')


def mixup_active(cfg: DictConfig) -> bool:
    return cfg.aug.mixup_prob > 0 and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0)


@dataclass(frozen=True)
class Derived:
    """Values that follow from the config, the process count and (the update counts) the data set size."""

    num_processes: int
    global_batch: int
    lr: float
    updates_per_epoch: Optional[int] = None  # None: the data set size is not known
    total_updates: Optional[int] = None
    warmup_updates: Optional[int] = None

    def describe(self) -> str:
        counts = (f'{self.updates_per_epoch} updates/epoch, {self.total_updates} updates, {self.warmup_updates} warmup '
                  'updates' if self.updates_per_epoch else 'updates per epoch, total and warmup updates need the data')
        return f'processes {self.num_processes}, global batch {self.global_batch}, lr {self.lr:.3g}, {counts}'


def derive(cfg: DictConfig, num_processes: int, batches_per_epoch: Optional[int]) -> Derived:
    """Global batch, the DeiT learning-rate rule and the update counts.

    Args:
        num_processes: data-parallel processes.
        batches_per_epoch: batches each process draws per epoch (the sampler's share, drop_last); None when the data
            is not at hand, which leaves the update counts out.
    """
    t, o = cfg.train, cfg.optim
    global_batch = t.batch_size * num_processes * t.grad_accum
    lr = o.lr if o.lr is not None else o.base_lr * global_batch / o.lr_base_size
    if batches_per_epoch is None:
        return Derived(num_processes, global_batch, lr)
    updates = batches_per_epoch // t.grad_accum
    if t.max_updates_per_epoch > 0:
        updates = min(updates, t.max_updates_per_epoch)
    if updates < 1:
        raise ConfigError(
            f'An epoch holds {batches_per_epoch} batches per process, fewer than one update of train.grad_accum='
            f'{t.grad_accum} x train.batch_size={t.batch_size}: lower the batch size or use more data.')
    return Derived(num_processes, global_batch, lr, updates, updates * t.epochs, math.floor(o.warmup_epochs * updates))


def save_config(cfg: DictConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def flat_hparams(cfg: DictConfig) -> Dict[str, Any]:
    """`section.key -> value` with only bool/str/int/float values, as the TensorBoard tracker requires."""
    flat = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f'{prefix}{k}.')
            elif isinstance(v, (bool, str, int, float)):
                flat[f'{prefix}{k}'] = v
            else:  # None, lists
                flat[f'{prefix}{k}'] = str(v)

    walk(OmegaConf.to_container(cfg, resolve=True), '')
    return flat
