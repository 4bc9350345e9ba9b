"""The spine's config sections: `task`, `data`, `model`, `optim`, `train`, `ckpt`, `eval`, and their checks.

A key that one family alone reads is marked `family=` (shake_vit/core/config.py refuses it under the other task).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from . import family  # noqa: F401  (its check of `task` runs before the sections' own)
from .config import CLASSIFICATION, ConfigError, key, register_check, register_section, require

SCHEDULES = ('cosine', 'multistep', 'step', 'constant')


@dataclass
class DataConfig:
    name: str = 'imagefolder'  # imagefolder | digits | cifar10 | cifar100 | fake
    root: Optional[str] = None  # imagefolder: holds train/ and val/; cifar: the torchvision root
    download: bool = False  # cifar: fetch when missing (needs internet)
    img_size: int = key(224, family=CLASSIFICATION, instead='det.min_size / det.max_size')
    # input normalisation; null: the student's timm pretrained_cfg (ImageNet)
    mean: Optional[List[float]] = key(None, family=CLASSIFICATION, instead="the detector's own normalisation")
    std: Optional[List[float]] = key(None, family=CLASSIFICATION, instead="the detector's own normalisation")
    # fake only; every other data set reads its class count from the data
    num_classes: int = key(10, family=CLASSIFICATION)
    fake_size: List[int] = key(factory=lambda: [512, 128], family=CLASSIFICATION)  # fake: train and val image counts
    val_fraction: float = 0.2  # digits: held-out share when num_folds == 0
    # digits: k-fold cross-validation when > 1 (fold picks the held-out fold)
    num_folds: int = key(0, family=CLASSIFICATION)
    fold: int = key(0, family=CLASSIFICATION)
    # digits, num_folds >= 2: train on fold `fold` alone and test on the others (1/k of the images train: the
    # low-data protocol of benchmarks/ablation.py), instead of testing on it
    train_on_fold: bool = key(False, family=CLASSIFICATION)
    # digits: > 0 evaluates on this share of the training split, never the test split
    inner_val_fraction: float = key(0.0, family=CLASSIFICATION)
    split_seed: int = 0  # digits: seeds the split, so teacher and students see the same one
    num_workers: int = 8
    pin_memory: bool = True
    # pil: timm's transforms in the loader workers | dali: NVIDIA DALI decodes and augments, on the GPU when there is
    # one, from parameters the workers draw (pip install -r requirements-dali.txt; docs/data_loading.md)
    loader: str = key('pil', choices=('pil', 'dali'), family=CLASSIFICATION)
    dali_threads: int = key(4, family=CLASSIFICATION)  # DALI's CPU threads per process
    dali_prefetch: int = key(2, family=CLASSIFICATION)  # train batches DALI prepares ahead


# data keys added after teacher records and caches were first written, with the value every earlier one had: left
# out of a record at that value, so that those records still match
DATA_ADDED = {'loader': 'pil', 'train_on_fold': False}


def data_record(data: DictConfig, leave_out: Sequence[str]) -> Dict[str, Any]:
    """The `data` section as a teacher record or a cache identity keeps it: without `leave_out`, DALI's speed
    settings, and the `DATA_ADDED` keys at their old value."""
    return {k: v for k, v in data.items() if k not in (*leave_out, 'dali_threads', 'dali_prefetch')
            and not (k in DATA_ADDED and v == DATA_ADDED[k])}


@dataclass
class ModelConfig:
    """The student: a distilled DeiT (`deit_*_distilled_*`, the shadow head on its distillation token) or any timm
    classifier (the shadow head on its pooled features)."""

    name: str = 'deit_tiny_distilled_patch16_224'
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (img_size, depth, ...)
    drop_path_rate: float = key(0.1, family=CLASSIFICATION)
    # linear | mlp
    shadow_head: str = key('linear', choices=('linear', 'mlp'), family=CLASSIFICATION, instead='det.shadow_box_head')
    shadow_hidden_dim: int = key(0, family=CLASSIFICATION)  # mlp hidden width; 0 = the embedding width
    # eval-mode output: cls | avg (all heads); null: the method's (shake cls, deit avg)
    predict: Optional[str] = key(None, choices=(None, 'avg', 'cls'), family=CLASSIFICATION)
    pretrained: Optional[str] = None  # fine-tune from: a local file (timm / DeiT / .safetensors) or a timm name.tag
    # token (a DeiT's distillation token) | pooled (any classifier's pooled features) | auto
    # | teacher (the authors' proxy teacher on the teacher's feature maps,
    # shake_vit.classification.models.ProxyTeacherHead)
    shadow_on: str = key('auto', choices=('auto', 'token', 'pooled', 'teacher'), family=CLASSIFICATION)
    # shadow_on=teacher: 3 indices into the teacher's feature maps; null:
    # the maps the SHAKE authors fused for CRD's networks, the last three for other timm CNNs
    proxy_features: Optional[List[int]] = key(None, family=CLASSIFICATION)
    # CIFAR form of a timm ResNet/MobileNet (32-px stem) or VGG (CRD's head); docs/cnn.md
    cifar_stem: bool = key(False, family=CLASSIFICATION)


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
    # cosine | multistep (decay_milestones) | step (every decay_epochs) | constant
    sched: str = key('cosine', choices=SCHEDULES)
    decay_milestones: List[int] = field(default_factory=lambda: [30, 60, 90])  # epochs where lr *= decay_rate
    decay_rate: float = 0.1
    decay_epochs: float = 30
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 128  # the micro-batch: what one process computes in one forward
    grad_accum: int = 1  # accumulation steps per update when global_batch is null; set, global_batch decides it
    # images per optimizer update; null: batch_size x processes x grad_accum. Set it to keep the stream (and a
    # teacher cache) across process counts; a resumed run keeps its checkpoint's (shake_vit/core/stream.py)
    global_batch: Optional[int] = None
    mixed_precision: str = key('no', choices=('no', 'bf16', 'fp16'))  # no | bf16 | fp16
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


register_section('task', str, 'classification')  # classification | detection (a family's package registers it)
register_section('data', DataConfig, DataConfig)
register_section('model', ModelConfig, ModelConfig)
register_section('optim', OptimConfig, OptimConfig)
register_section('train', TrainConfig, TrainConfig)
register_section('ckpt', CheckpointConfig, CheckpointConfig)
register_section('eval', EvalConfig, EvalConfig)


@register_check
def check_spine(cfg: DictConfig) -> None:
    t, o, d = cfg.train, cfg.optim, cfg.data
    require(t.epochs >= 1, 'train.epochs', t.epochs, 'at least 1')
    require(t.batch_size >= 1, 'train.batch_size', t.batch_size, 'at least 1')
    require(t.grad_accum >= 1, 'train.grad_accum', t.grad_accum, 'at least 1')
    require(t.global_batch is None or (t.global_batch >= t.batch_size and t.global_batch % t.batch_size == 0),
            'train.global_batch', t.global_batch, f'null or a multiple of train.batch_size={t.batch_size}')
    require(t.log_interval >= 1, 'train.log_interval', t.log_interval, 'at least 1')
    require(cfg.ckpt.interval_updates >= 0, 'ckpt.interval_updates', cfg.ckpt.interval_updates, '0 (off) or positive')
    require(cfg.ckpt.keep_last >= 1, 'ckpt.keep_last', cfg.ckpt.keep_last, 'at least 1')
    require(cfg.ckpt.stop_check_every >= 1, 'ckpt.stop_check_every', cfg.ckpt.stop_check_every, 'at least 1')
    require(0 < t.ema_decay < 1, 'train.ema_decay', t.ema_decay, 'between 0 and 1')
    require(o.lr is None or o.lr > 0, 'optim.lr', o.lr, 'positive (or null for the DeiT scaling rule)')
    require(o.base_lr > 0, 'optim.base_lr', o.base_lr, 'positive')
    require(o.weight_decay >= 0, 'optim.weight_decay', o.weight_decay, 'zero or positive')
    require(o.warmup_epochs >= 0, 'optim.warmup_epochs', o.warmup_epochs, 'zero or positive')
    require(o.clip_grad is None or o.clip_grad > 0, 'optim.clip_grad', o.clip_grad, 'positive or null')
    require(0 < d.val_fraction < 1, 'data.val_fraction', d.val_fraction, 'between 0 and 1')
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    for name in t.log_with:
        if name not in LOGGER_TYPE_TO_CLASS:
            import difflib
            close = difflib.get_close_matches(str(name), list(LOGGER_TYPE_TO_CLASS), n=1)
            raise ConfigError(f"'train.log_with' names {name!r}, which Accelerate does not know; choose from "
                              f"{', '.join(LOGGER_TYPE_TO_CLASS)}." + (f" Did you mean '{close[0]}'?" if close else ''))
