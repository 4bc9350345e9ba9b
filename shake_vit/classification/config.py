"""Classification's config: its own section, `aug` (DeiT's train-time augmentation), and the checks of the keys
only classification reads (marked `family=CLASSIFICATION` in the shared sections).
"""
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from ..core.config import CLASSIFICATION, ConfigError, key, register_check, register_section, require


@dataclass
class AugConfig:
    """Train-time augmentation; the defaults are DeiT's, which differ from timm's own (docs/method.md, "DeiT's
    recipe in timm")."""

    auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1'  # timm policy string; null disables
    interpolation: str = 'bicubic'
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = key(0.5, instead='det.hflip')
    color_jitter: List[float] = field(default_factory=lambda: [0.3, 0.3, 0.3])  # brightness, contrast, saturation
    # [, hue]; timm ignores it whenever auto_augment is set, as DeiT does
    # rrc: random resized crop (ImageNet) | pad_crop: pad, random crop (DeiT and CRD at 32 px)
    train_crop: str = key('rrc', choices=('rrc', 'pad_crop'))
    crop_padding: int = 4  # pad_crop: pixels of zero padding on each side
    re_prob: float = 0.25
    re_mode: str = key('pixel', choices=('pixel', 'const', 'rand'))
    re_count: int = 1
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then centre crop
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = key('batch', choices=('batch', 'pair', 'elem'))
    smoothing: float = 0.1
    repeated_aug: int = 3  # copies of each image per epoch, spread over processes; 1 disables


register_section('aug', AugConfig, AugConfig, after='data', family=CLASSIFICATION)


def mixup_active(a: DictConfig) -> bool:
    """Whether the `aug` section mixes samples (mixup or cutmix)."""
    return a.mixup_prob > 0 and (a.mixup > 0 or a.cutmix > 0)


@register_check(family=CLASSIFICATION)
def check_classification(cfg: DictConfig) -> None:
    for who in ('data', 'teacher', *(f'extra_teachers.{i}' for i in range(len(cfg.extra_teachers)))):
        mean, std = OmegaConf.select(cfg, f'{who}.mean'), OmegaConf.select(cfg, f'{who}.std')
        for stat, value in (('mean', mean), ('std', std)):
            require(value is None or (len(value) == 3 and (stat == 'mean' or min(value) > 0)), f'{who}.{stat}',
                    value if value is None else list(value), 'null or three per-channel values (std positive)')
        if (mean is None) != (std is None):
            raise ConfigError(f"Set {who}.mean and {who}.std together (per-channel input statistics); only "
                              f"{who}.{'mean' if std is None else 'std'} is set.")
    a, d, t = cfg.aug, cfg.data, cfg.train
    require(d.img_size >= 8, 'data.img_size', d.img_size, 'at least 8 pixels')
    if d.name != 'digits':  # the other data sets keep their own train and val splits: these keys would not touch them
        for k, unset in (('num_folds', 0), ('fold', 0), ('train_on_fold', 'false'), ('inner_val_fraction', 0.0)):
            require(str(d[k]).lower() == str(unset), f'data.{k}', d[k], f"{unset} with data.name={d.name!r}: only the "
                    "digits are split by the trainer (data.name='digits'); other data sets keep their own train and "
                    'val splits')
    require(d.num_folds == 0 or d.num_folds >= 2, 'data.num_folds', d.num_folds, '0 (a holdout split) or >= 2')
    require(0 <= d.inner_val_fraction < 1, 'data.inner_val_fraction', d.inner_val_fraction, 'in [0, 1)')
    require(0 <= d.fold < d.num_folds if d.num_folds else d.fold == 0, 'data.fold', d.fold,
            f'in [0, data.num_folds={d.num_folds})' if d.num_folds else '0 unless data.num_folds >= 2 (a k-fold split)')
    require(d.dali_threads >= 1, 'data.dali_threads', d.dali_threads, 'at least 1')
    require(d.dali_prefetch >= 1, 'data.dali_prefetch', d.dali_prefetch, 'at least 1')
    require(not d.train_on_fold or d.num_folds >= 2, 'data.train_on_fold', d.train_on_fold,
            'false unless data.num_folds >= 2 (it trains on fold data.fold of a k-fold split)')
    require(len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1, 'aug.scale', list(a.scale),
            'two fractions lo <= hi in (0, 1]')
    require(0 < a.crop_pct <= 1, 'aug.crop_pct', a.crop_pct, 'in (0, 1]')
    require(len(a.color_jitter) in (3, 4), 'aug.color_jitter', list(a.color_jitter),
            '3 or 4 strengths: brightness, contrast, saturation[, hue]')
    require(a.repeated_aug >= 1, 'aug.repeated_aug', a.repeated_aug, 'at least 1 (1 disables it)')
    require(0 <= a.smoothing < 1, 'aug.smoothing', a.smoothing, 'in [0, 1)')
    for who, teacher in (('teacher', cfg.teacher),
                         *((f'extra_teachers.{i}', e) for i, e in enumerate(cfg.extra_teachers))):
        if teacher.class_map and cfg.model.shadow_on == 'teacher':
            raise ConfigError(f"{who}.class_map selects the teacher's logits, but model.shadow_on=teacher fuses its "
                              'feature maps through its own classifier: use a teacher trained on your classes.')
    from ..distill import methods
    if cfg.teacher.cache and cfg.model.shadow_on == 'teacher' and methods.of(cfg).needs_teacher:
        raise ConfigError("teacher.cache holds the teachers' logits, but model.shadow_on=teacher makes the shadow "
                          "head read the teacher's feature maps on every step: run the live teacher (drop "
                          'teacher.cache) or put the shadow head on the student (model.shadow_on=auto).')
    if mixup_active(a):
        require(t.batch_size % 2 == 0, 'train.batch_size', t.batch_size,
                'even when mixup or cutmix is on (timm Mixup pairs each sample with its mirror in the batch); '
                'set aug.mixup=0 aug.cutmix=0 to train with an odd batch')
