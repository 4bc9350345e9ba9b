"""The config sections of the distillation parts every family shares: `teacher` (and `extra_teachers`), `loss`,
`teacher_cache`, `health`, and their checks.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from ..core.config import CLASSIFICATION, DETECTION, key, register_check, register_section, require
from ..core.schema import SCHEDULES
from . import methods
from .losses import KL_REDUCTIONS


@dataclass
class TeacherFitConfig:
    """Fitting a teacher on the training split when no checkpoint is given."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    # cosine | multistep (optim.decay_milestones, CRD's teachers) | step | constant
    sched: str = key('cosine', choices=SCHEDULES)


@dataclass
class TeacherConfig:
    name: str = 'regnety_160.deit_in1k'  # DeiT's RegNetY-16GF teacher (82.9% top-1), a timm model[.tag] name
    pretrained: bool = False  # download timm's weights for `name` (needs internet); see `checkpoint` for local files
    checkpoint: Optional[str] = None  # a local timm state dict (.pth/.pt/.bin/.safetensors)
    # the teacher's input normalisation; null: what its weights were trained with
    mean: Optional[List[float]] = key(None, family=CLASSIFICATION, instead="the teacher detector's own normalisation")
    # (a fitted teacher's record, timm's pretrained_cfg, else the data's)
    std: Optional[List[float]] = key(None, family=CLASSIFICATION, instead="the teacher detector's own normalisation")
    kwargs: Dict[str, Any] = field(default_factory=dict)
    fit: TeacherFitConfig = field(default_factory=TeacherFitConfig)  # used when neither pretrained nor checkpoint
    inference_mode: bool = True  # run the teacher under torch.inference_mode (else no_grad)
    # auto: follow train.mixed_precision | fp32 | bf16 | fp16 (teacher weights cast)
    precision: str = key('auto', choices=('auto', 'fp32', 'bf16', 'fp16'))
    channels_last: bool = key(False, family=CLASSIFICATION)  # channels-last memory format (CNN teachers on GPUs)
    # CIFAR form of a timm ResNet/MobileNet/VGG (see shake_vit.classification.models.cifar_stem)
    cifar_stem: bool = key(False, family=CLASSIFICATION)
    compile: bool = False  # torch.compile the teacher
    # auto: select and order the teacher's logits as the data's classes, by name |
    # a YAML/JSON file of `data class: teacher class` renamings (shake_vit/classification/classmap.py)
    class_map: Optional[str] = key(None, family=CLASSIFICATION)
    # the teacher's class names in output order (a text file or JSON list), when
    # neither its file nor timm records them
    class_names: Optional[str] = key(None, family=CLASSIFICATION)
    # read every teacher's outputs from a cache written by --cache-teacher (no teacher is
    # built); docs/teacher_cache.md, shake_vit/distill/cache.py
    cache: Optional[str] = key(None, family=CLASSIFICATION)


@dataclass
class LossConfig:
    method: str = 'shake'  # shake | deit_hard | deit_hard_cls | deit_soft | kd | none | none_both_heads
    # (classification; detection: shake | kd | none; shake_vit/distill/methods.py)
    temperature: Optional[float] = None  # null: the method's published default (shake 4, kd 4, deit_soft 1)
    mutual: float = 1.0  # shake: lambda, the weight of both mutual terms
    mutual_student: Optional[float] = None  # shake: the student <- shadow weight; null: loss.mutual
    mutual_shadow: Optional[float] = None  # shake: the shadow <- student weight; null: loss.mutual (classification),
    # 0 (detection: the shadow follows the teacher and the labels alone, the best form measured; docs/detection.md)
    teacher_weight: float = 1.0  # shake: weight of the shadow head's teacher term
    # shake: kl (paper) | mse (authors' code)
    teacher_loss: str = key('kl', choices=('kl', 'mse'), family=CLASSIFICATION)
    standardize: bool = key(False, family=CLASSIFICATION)  # shake: standardise logits first (authors' code)
    shadow_ce: float = key(0.0, family=CLASSIFICATION)  # shake: ground truth on the shadow head (authors' code: 1)
    direct_kd: float = key(0.0, family=CLASSIFICATION)  # shake: direct KL_T(s -> t)
    # deit_hard / deit_hard_cls / deit_soft: weight of the distillation term
    deit_alpha: float = key(0.5, family=CLASSIFICATION)
    # deit_soft's KL: batchmean (timm) | numel (DeiT's sum / numel: / classes)
    deit_soft_reduction: str = key('batchmean', choices=KL_REDUCTIONS, family=CLASSIFICATION)
    # kd: weight of the KL term (CRD protocol)
    kd_alpha: float = key(0.9, family=CLASSIFICATION, instead='loss.teacher_weight')
    # detection: smooth-L1 beta of the box distance, torchvision's (1/9)
    box_beta: float = key(0.1111111111111111, family=DETECTION)
    # detection shake: ramp the student <- shadow weight in over the lr warm-up
    ramp_student: bool = key(False, family=DETECTION)
    ramp_shadow: bool = key(False, family=DETECTION)  # detection shake: ramp the shadow <- student weight in likewise
    # detection shake: torchvision's RoI losses on the labels on the shadow's outputs
    shadow_anchor: float = key(1.0, family=DETECTION)
    # detection kd / shake: the student's class KL beside its CE: none (added at full
    # weight) | chen (label_weight x CE + (1 - label_weight) x KL) | defeat (foreground and background RoIs averaged
    # separately); chen slowed the student on the digit scenes (docs/results/detection.md)
    det_balance: str = key('none', family=DETECTION)
    label_weight: float = key(0.5, family=DETECTION)  # detection, det_balance=chen: mu, the cross-entropy's share
    # detection kd / shake: distil classes only on RoIs whose target's top class is the label
    det_agree: bool = key(False, family=DETECTION)
    # detection kd / shake: the student's box term: distance (smooth-L1 to the target's
    # deltas) | bounded (Chen et al.: only where the student's error exceeds the target's) | none
    det_box: str = key('distance', family=DETECTION)
    bound_margin: float = key(0.0, family=DETECTION)  # detection, det_box=bounded: the margin m


@dataclass
class TeacherCacheConfig:
    """How `train.py --cache-teacher DIR` stores the teachers' outputs (shake_vit/distill/cache.py)."""

    # auto: full when the whole schedule fits max_gb, else topk | full | topk | argmax (deit_hard)
    store: str = key('auto', choices=('auto', 'full', 'topk', 'argmax'))
    topk: int = 10  # logits kept per sample by 'topk'; the rest share one value that carries their softmax mass
    # auto: the teacher's own output precision (exact) | fp32 (exact) | fp16 (half the disk)
    precision: str = key('auto', choices=('auto', 'fp32', 'fp16'))
    max_gb: float = 50.0  # 'auto' stores full logits when the whole schedule's cache stays under this size


@dataclass
class HealthConfig:
    """The run's health checks (shake_vit/distill/health.py), each with its own switch."""

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


register_section('teacher', TeacherConfig, TeacherConfig, after='model')
# SHAKE with several teachers (paper Eq. 6)
register_section('extra_teachers', List[TeacherConfig], list, after='teacher')
register_section('loss', LossConfig, LossConfig, after='extra_teachers')
register_section('teacher_cache', TeacherCacheConfig, TeacherCacheConfig, after='eval', family=CLASSIFICATION)
register_section('health', HealthConfig, HealthConfig, after='teacher_cache')


@register_check
def check_distillation(cfg: DictConfig) -> None:
    methods.check(cfg)
    require(cfg.loss.temperature is None or cfg.loss.temperature > 0, 'loss.temperature', cfg.loss.temperature,
            'positive (or null for the method default)')
    for name in ('mutual', 'mutual_student', 'mutual_shadow', 'teacher_weight'):
        value = cfg.loss[name]
        require(value is None or value >= 0, f'loss.{name}', value, 'zero or positive')
    h = cfg.health
    require(h.teacher_images >= 1, 'health.teacher_images', h.teacher_images, 'at least 1')
    require(h.near_chance > 0, 'health.near_chance', h.near_chance, 'positive')
    require(h.max_drop >= 0, 'health.max_drop', h.max_drop, 'zero or positive (percentage points)')
    require(0 <= h.stall_after <= 1, 'health.stall_after', h.stall_after, 'a share of the run in [0, 1]')
    require(0 < h.stall_fraction <= 1, 'health.stall_fraction', h.stall_fraction, 'in (0, 1]')
    require(h.dominance_factor > 0, 'health.dominance_factor', h.dominance_factor, 'positive')
    require(cfg.teacher_cache.topk >= 1, 'teacher_cache.topk', cfg.teacher_cache.topk, 'at least 1')
    require(cfg.teacher_cache.max_gb > 0, 'teacher_cache.max_gb', cfg.teacher_cache.max_gb, 'positive')
    for i, extra in enumerate(cfg.extra_teachers):
        require(extra.cache is None, f'extra_teachers.{i}.cache', extra.cache,
                'null: the cache that teacher.cache names holds every teacher')
