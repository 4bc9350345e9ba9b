"""The student's (and a fitted teacher's) ResNet backbone before detection: the paper's setting is a backbone
pretrained on classification, then distillation while the detector is fine-tuned.

`det.backbone_weights` names where it comes from:
    IMAGENET1K_V1, ...   torchvision's ImageNet weights (downloaded once into $TORCH_HOME)
    digits               pretrained here, on the embedded digits classification task (only the digits the training
                         scenes are drawn from), by this trainer's own classification run (`det.backbone_fit`), in
                         `<output_dir>/backbone/`, and reused while its settings stay the same
    a file               a ResNet state dict (timm's or torchvision's keys; a classification run's
                         `student.safetensors`), its `fc` dropped
"""
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from ..core.config import ConfigError, load_config
from ..core.weights import read_state_dict

DIGITS = 'digits'


def is_file_source(source: Optional[str]) -> bool:
    """Whether `det.backbone_weights` is a local file or the digits pretraining (rather than a torchvision name)."""
    return bool(source) and (source == DIGITS or '/' in source or Path(source).suffix in ('.safetensors', '.pth',
                                                                                         '.pt', '.bin'))


def digits_folder(cfg: DictConfig) -> Path:
    return Path(cfg.train.output_dir) / 'backbone'


def digits_config(cfg: DictConfig, arch: str) -> DictConfig:
    """The classification run that pretrains `arch` (timm's ResNet, the same keys as torchvision's) on the training
    split's digits: the detection run's split, seed and output folder; no teacher; the quick start's augmentation."""
    f = cfg.det.backbone_fit
    return load_config(None, [
        'task=classification', 'data.name=digits', f'data.img_size={f.img_size}', 'data.num_workers=0',
        f'data.val_fraction={cfg.data.val_fraction}', f'data.split_seed={cfg.data.split_seed}',
        f'model.name={arch}', 'loss.method=none', 'optim.opt=adamw', f'optim.lr={f.lr}', 'optim.weight_decay=0.05',
        'optim.warmup_epochs=1', f'train.epochs={f.epochs}', f'train.batch_size={f.batch_size}',
        f'train.seed={cfg.train.seed}', f'train.output_dir={digits_folder(cfg)}', 'train.log_interval=10',
        f'train.cpu_threads={cfg.train.cpu_threads}', 'train.log_with=[]', 'ckpt.keep_last=1', 'train.overwrite=true',
        f'eval.interval={f.epochs}',
        # the classification quick start's augmentation (configs/quickstart.yaml): DeiT's mixup, cutmix, RandAugment,
        # erasing and repeated augmentation left the ResNet-18 at 74% top-1 after 15 epochs
        'aug.auto_augment=null', 'aug.hflip=0.0', 'aug.scale=[0.75,1.0]', 'aug.ratio=[0.8,1.25]',
        'aug.color_jitter=[0.0,0.0,0.0]', 'aug.re_prob=0.0', 'aug.crop_pct=1.0', 'aug.mixup=0.0', 'aug.cutmix=0.0',
        'aug.smoothing=0.0', 'aug.repeated_aug=1'])


def prerequisites(cfg: DictConfig, arches: List[str]) -> List[DictConfig]:
    """The digits pretraining this detection run still needs (none when a matching one is done). A finished one with
    other settings is cleared (main process), so that the new one starts afresh; an unfinished one is resumed."""
    if not arches:
        return []
    if len(set(arches)) > 1:
        raise ConfigError('det.backbone_weights=digits pretrains one backbone per run folder, and the student and '
                          f'teacher detectors have different ones ({", ".join(dict.fromkeys(arches))}): give the '
                          'teacher a file in teacher.kwargs.backbone_weights, or drop it.')
    folder, run = digits_folder(cfg), digits_config(cfg, arches[0])
    done = folder / 'backbone.json'
    if done.is_file() and json.loads(done.read_text()).get('record') == record_of(run) \
            and (folder / 'student.safetensors').is_file():
        return []
    state = PartialState()
    state.wait_for_everyone()
    if done.is_file() and state.is_main_process:  # another pretraining's: its checkpoints must not be resumed
        shutil.rmtree(folder / 'checkpoints', ignore_errors=True)
        done.unlink()
    state.wait_for_everyone()
    return [run]


def record_of(run: DictConfig) -> Dict:
    """What a pretraining's weights depend on: its config but where it is written and how it runs."""
    from ..core.run_folder import identity
    from ..core.schema import DATA_ADDED
    record = {**identity(run), 'train.epochs': run.train.epochs}  # (a resume may extend a run; a record may not)
    # as records were before train.global_batch existed, so that a pretraining done then is still reused
    if run.train.global_batch is None:
        del record['train.global_batch']
    for added, value in DATA_ADDED.items():  # likewise for data keys added since, at the value they had then
        if record.get(f'data.{added}') == value:
            del record[f'data.{added}']
    record['train.grad_accum'] = run.train.grad_accum
    return record


def record_done(run: DictConfig, results: Dict) -> None:
    """Mark a finished pretraining run as reusable (written by the main process after `runner.train`)."""
    path = Path(run.train.output_dir) / 'backbone.json'
    path.write_text(json.dumps({'record': record_of(run), 'top1': results.get('top1_cls')}, indent=2))


def resnet_state(source: str, cfg: DictConfig) -> Dict[str, torch.Tensor]:
    """The ResNet body's weights from `det.backbone_weights` (a file, or the digits pretraining's output): keys as
    torchvision's `resnet18` has them, the classifier (`fc`) and BatchNorm's step counters dropped."""
    path = digits_folder(cfg) / 'student.safetensors' if source == DIGITS else Path(source)
    if not path.is_file():
        raise ConfigError(f"det.backbone_weights='{source}': '{path}' does not exist"
                          + (' (the digits pretraining has not run in this output folder)' if source == DIGITS else
                             ': give a ResNet state dict, a torchvision weights name (IMAGENET1K_V1) or digits.'))
    state = read_state_dict(str(path), cfg.train.trust_pickled_files)
    if any(k.startswith('model.') for k in state):  # a classification run's student: the timm model under `model.`
        state = {k[len('model.'):]: v for k, v in state.items() if k.startswith('model.')}
    return {k: v for k, v in state.items() if not k.startswith('fc.') and not k.endswith('num_batches_tracked')}


def load_body(body: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Every tensor of the ResNet body (torchvision's, as the FPN backbone holds it: no `fc`) from `state`."""
    own = body.state_dict()
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    unexpected = [k for k in state if k not in own]
    missing, _ = body.load_state_dict({k: v for k, v in state.items() if k in own and k not in wrong}, strict=False)
    missing = [k for k in missing if k not in wrong]
    if missing or unexpected or wrong:
        raise ConfigError(f"det.backbone_weights='{source}' does not fit the detector's ResNet (missing {missing[:4]}, "
                          f'unexpected {unexpected[:4]}, other shapes {wrong[:4]}): give the weights of the same '
                          'ResNet (resnet18 for fasterrcnn_resnet18_fpn).')
