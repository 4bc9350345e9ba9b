"""The frozen teacher(s) of a run: where each comes from (a file, timm's hub, or fitted first on the training split)
and the input normalisation it was trained with.

A teacher sees the student's augmented batch re-normalised to its own statistics. Those are the statistics its
weights were trained with, resolved once per teacher (`Normalisation`): `teacher.mean/std` when set; else what a
fitted teacher's file records (this trainer writes them into `teacher.safetensors`); else timm's `pretrained_cfg` for
hub weights; else, for a teacher fitted here or a local file without a record, the data's (what the student gets).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from timm.models import get_pretrained_cfg
from timm.task import ClassificationTask, DistillationTeacher

from ..core.build import Pipeline, downloads_first, log
from ..core.config import ConfigError
from ..core.engine import evaluate
from ..core.weights import offline_unless_reachable, read_state_dict
from ..distill import methods
from ..distill.teacher import fit_or_reuse, fitted_earlier, fitted_path, teacher_record, train_teacher
from ..zoo.crd import CRD_NAMES
from . import data
from .models import build_teacher_architecture, cifar_stem, unknown_model_error

RECORD_KEYS = ('mean', 'std')  # what a fitted teacher's .safetensors records in its metadata


@dataclass(frozen=True)
class Normalisation:
    """The per-channel statistics a teacher's inputs are normalised with, and where they come from."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    source: str
    note: str = ''  # a warning for the log: statistics that may not be what the weights were trained with

    def describe(self) -> str:
        return (f"mean {[round(v, 4) for v in self.mean]}, std {[round(v, 4) for v in self.std]} ({self.source})")


def teacher_configs(cfg: DictConfig) -> List[DictConfig]:
    """`teacher` then every `extra_teachers` entry; none for methods without a teacher."""
    return [cfg.teacher, *cfg.extra_teachers] if methods.of(cfg).needs_teacher else []


def _hub_head_fits(t: DictConfig, num_classes: int) -> bool:
    """Whether timm's pretrained `t.name` already predicts the data's classes (e.g. ImageNet-1k)."""
    pretrained_cfg = get_pretrained_cfg(t.name)
    return pretrained_cfg is not None and pretrained_cfg.num_classes == num_classes


def build_teacher_model(t: DictConfig, num_classes: int, pretrained: bool = False,
                        new_head: bool = False) -> nn.Module:
    """The architecture of teacher config `t` (`teacher` or an `extra_teachers` entry); with `pretrained`, timm's
    hub weights (needs internet), with a fresh head for `num_classes` when `new_head` (to fit it to new classes)."""
    if not pretrained:
        return build_teacher_architecture(t, num_classes)
    if not timm.is_model(t.name):
        raise ConfigError(unknown_model_error(t.name, 'teacher.name'))
    kwargs = OmegaConf.to_container(t.kwargs, resolve=True)
    offline_unless_reachable()
    try:
        model = timm.create_model(t.name, pretrained=True, **(dict(num_classes=num_classes) if new_head else {}),
                                  **kwargs)
    except Exception as err:  # hub errors come as many types: offline, unknown tag, HTTP
        raise ConfigError(f"Could not fetch timm's pretrained weights for teacher.name='{t.name}' "
                          f'({type(err).__name__}: {str(err).splitlines()[0][:200]}). Offline, download them elsewhere '
                          'and set teacher.checkpoint=/path/to/weights instead of teacher.pretrained=true.') from None
    if model.num_classes != num_classes:
        raise ConfigError(f"The pretrained teacher '{t.name}' predicts {model.num_classes} classes but the data has "
                          f'{num_classes}: give a teacher trained on these classes (teacher.checkpoint) or let the '
                          'trainer fit one (teacher.pretrained=false, no checkpoint).')
    return cifar_stem(model) if t.cifar_stem else model


def crd_hint(path: str) -> str:
    """CRD keeps its teachers as save/models/<name>_vanilla/ckpt_epoch_240.pth: name the network registered here."""
    folder = Path(path).parent.name
    crd = folder[:-len('_vanilla')] if folder.endswith('_vanilla') else None
    return f" The file looks like CRD's {crd}: teacher.name={CRD_NAMES[crd]}." if crd in CRD_NAMES else ''


def recorded_normalisation(path: str) -> Optional[Normalisation]:
    """The statistics a teacher file records (a `.safetensors` this trainer wrote when it fitted the teacher)."""
    if not str(path).endswith('.safetensors'):
        return None
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata() or {}
    if not all(k in meta for k in RECORD_KEYS):
        return None
    return Normalisation(tuple(json.loads(meta['mean'])), tuple(json.loads(meta['std'])), f'recorded in {path}')


def freeze(model: nn.Module, norm: Normalisation) -> DistillationTeacher:
    """Wrap a trained classifier as a frozen teacher: eval mode, no gradients, inputs re-normalised to `norm`.

    timm's DistillationTeacher takes the statistics from the model's `pretrained_cfg`, which for a model built
    without hub weights is the architecture's ImageNet default, not what the weights were trained with.
    """
    model.requires_grad_(False)
    teacher = DistillationTeacher(model).eval()
    teacher.mean_kd.copy_(rearrange(torch.tensor(norm.mean), 'c -> 1 c 1 1'))
    teacher.std_kd.copy_(rearrange(torch.tensor(norm.std), 'c -> 1 c 1 1'))
    teacher.normalisation = norm
    return teacher


def _explicit(t: DictConfig) -> Optional[Normalisation]:
    """`teacher.mean/std` (the config checks they come together)."""
    return None if t.mean is None else Normalisation(tuple(t.mean), tuple(t.std), 'teacher.mean / teacher.std')


def load_teacher(t: DictConfig, num_classes: int, data_norm: Sequence[Sequence[float]], path: Optional[str] = None,
                 trusted: bool = False) -> DistillationTeacher:
    """Teacher config `t` from a local file (`path`, else `t.checkpoint`) or timm's hub, frozen, with the input
    normalisation its weights were trained with (see the module docstring).

    Args:
        data_norm: (mean, std) of the data pipeline, the fallback for a file that records none.
    """
    path = path or t.checkpoint
    if path is None:
        if t.class_map:  # the hub head as it is; the class map picks the data's classes from it
            num_classes = get_pretrained_cfg(t.name).num_classes if get_pretrained_cfg(t.name) else num_classes
        model = build_teacher_model(t, num_classes, pretrained=True)
        cfg = model.pretrained_cfg
        hub = Normalisation(tuple(cfg['mean']), tuple(cfg['std']), f"timm's pretrained_cfg of {t.name}")
        return freeze(model, _explicit(t) or hub)
    state = read_state_dict(path, trusted)
    probe = build_teacher_model(t, num_classes)
    classifier = probe.pretrained_cfg.get('classifier', 'head')  # timm names its head here: 'fc', 'head.fc', ...
    head = state.get(f'{classifier}.weight')
    if t.class_map and head is not None:  # the file's own classes; the class map picks the data's from them
        num_classes = head.shape[0]
    model = probe if probe.num_classes == num_classes else build_teacher_model(t, num_classes)
    if head is not None and head.shape[0] != num_classes:
        raise ConfigError(f"The teacher checkpoint '{path}' predicts {head.shape[0]} classes but the data has "
                          f'{num_classes}: give a teacher trained on these classes, map its classes to the data\'s '
                          'by name (teacher.class_map=auto), or drop teacher.checkpoint to let the trainer fit one '
                          'on the training split.')
    misfit = state_dict_misfit(model, state)
    if misfit:
        raise ConfigError(f"The teacher checkpoint '{path}' does not fit teacher.name='{t.name}' ({misfit}): check "
                          f'teacher.name and teacher.kwargs.{fitting_network_hint(state, num_classes, path)}')
    model.load_state_dict(state)
    return freeze(model, _explicit(t) or recorded_normalisation(path) or file_normalisation(t, model, data_norm))


def file_normalisation(t: DictConfig, model: nn.Module, data_norm: Sequence[Sequence[float]]) -> Normalisation:
    """The statistics for a teacher file that records none, with `teacher.mean/std` unset. CRD's CIFAR networks were
    all trained with CRD's CIFAR-100 statistics, which their `cifar_*` registration holds: those. Any other file gets
    the data's; where its architecture's own `pretrained_cfg` says otherwise, the note says so (the caller warns)."""
    data = Normalisation(tuple(data_norm[0]), tuple(data_norm[1]),
                         "the data's, as the file records none; set teacher.mean/std if it was trained with others")
    own = getattr(model, 'pretrained_cfg', None) or {}
    if 'mean' not in own or 'std' not in own:
        return data
    own_mean, own_std = tuple(float(v) for v in own['mean']), tuple(float(v) for v in own['std'])
    if t.name in CRD_NAMES.values():
        return Normalisation(own_mean, own_std, f"CRD's CIFAR-100 statistics, which every CRD network was trained with "
                             f"({t.name}'s pretrained_cfg; the file records none; teacher.mean/std override them)")
    if (own_mean, own_std) != (data.mean, data.std):
        return Normalisation(data.mean, data.std, data.source, note=(
            f"the teacher file records no input statistics, so it gets the data's (mean {list(data.mean)}, std "
            f"{list(data.std)}), while {t.name}'s pretrained_cfg has mean {list(own_mean)}, std {list(own_std)}; if it "
            f'was trained with those, set teacher.mean={list(own_mean)} teacher.std={list(own_std)}'))
    return data


def state_dict_misfit(model: nn.Module, state: Dict[str, torch.Tensor]) -> str:
    """'' when `state` fits `model` key for key and shape for shape, else the first missing, unexpected and
    other-shaped keys (torch's own message lists them all and is cut off where it is read)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in state
              if k in own and state[k].shape != own[k].shape]
    parts = [f'{name} {keys[:4]}' + (f' and {len(keys) - 4} more' if len(keys) > 4 else '')
             for name, keys in (('missing', missing), ('unexpected', unexpected), ('other shapes', shapes)) if keys]
    return '; '.join(parts)


def fitting_network_hint(state: Dict[str, torch.Tensor], num_classes: int, path: str) -> str:
    """The registered CRD network whose keys and shapes the file has, wherever the file sits (built on the meta
    device: no memory, no time), else CRD's folder name."""
    for crd_name, name in CRD_NAMES.items():
        with torch.device('meta'):
            candidate = timm.create_model(name, num_classes=num_classes)
        if not state_dict_misfit(candidate, state):
            return f" The file holds CRD's {crd_name}: teacher.name={name}."
    return crd_hint(path)


def fit_teacher(cfg: DictConfig, t: DictConfig, index: int, acc: Accelerator, pipe: Pipeline) -> DistillationTeacher:
    """Train `t.name` on the training split (from timm's pretrained weights when `t.pretrained`), save it as
    `teacher[_index].safetensors` in the run directory, and return it frozen.

    Users distilling on their own classes often have no teacher for them. A teacher fitted earlier in the same
    output directory with the same settings is reused.
    """
    if _explicit(t) is not None:
        raise ConfigError('teacher.mean/std name the statistics a teacher was trained with, but this teacher is '
                          'fitted here, on the data as normalised for the student (data.mean/std): drop '
                          'teacher.mean/std, or give the teacher that was trained with them (teacher.checkpoint).')
    start = "timm's pretrained weights, new head" if t.pretrained else 'scratch'
    norm = Normalisation(tuple(pipe.mean), tuple(pipe.std), 'what it was fitted with')

    def fit() -> nn.Module:
        log(acc, f'fitting the teacher {t.name} on the training split for {t.fit.epochs} epochs (from {start})')
        with downloads_first(acc):
            model = build_teacher_model(t, pipe.num_classes, pretrained=t.pretrained, new_head=True)
        task = ClassificationTask(model, criterion=data.criterion(cfg.aug), verbose=False)
        return train_teacher(cfg, t, index, acc, pipe, task, mixup=data.build_mixup(cfg.aug, pipe.num_classes))

    def measure(model: nn.Module) -> Dict:
        return evaluate(lambda x: {'teacher': model(x)}, pipe.val_loader, acc, desc='teacher eval')

    def metadata(metrics: Dict) -> Dict[str, Any]:  # any later run that loads the file feeds it the same inputs
        return {'mean': list(norm.mean), 'std': list(norm.std), 'classes': list(pipe.splits.classes),
                'img_size': cfg.data.img_size, **({'top1': metrics['teacher_top1']} if metrics else {})}
    teacher = fit_or_reuse(cfg, t, index, acc, teacher_record(cfg, t),
                           load=lambda path: load_teacher(t, pipe.num_classes, (pipe.mean, pipe.std), str(path)),
                           fit=fit, measure=measure, describe=lambda m: f"top-1 {m['teacher_top1']:.2f}%",
                           metadata=metadata)
    return teacher if isinstance(teacher, DistillationTeacher) else freeze(teacher, norm)


def describe_classes(teacher: DistillationTeacher, t: DictConfig, path: Optional[str], classes, acc) -> None:
    """Attach to `teacher` what the health checks and the class map need: `class_names` (known names, or None),
    `recorded_top1` (what its file records), and with `t.class_map` the `class_index` buffer that selects and orders
    its logits as the data's classes."""
    from . import classmap
    teacher.class_names = classmap.teacher_names(t, teacher.model, path)
    teacher.recorded_top1 = recorded_top1(path)
    teacher.recorded_img_size = recorded_img_size(path)
    if t.class_map:
        if teacher.class_names is None:
            raise ConfigError('teacher.class_map needs the teacher\'s class names: set teacher.class_names to a file '
                              "listing them in output order (this teacher's file records none and its head is not "
                              "timm's ImageNet one).")
        index = classmap.resolve(t.class_map, teacher.class_names, classes)
        teacher.register_buffer('class_index', torch.tensor(index, dtype=torch.long), persistent=False)
        log(acc, f'teacher {t.name}: {len(index)} of its {len(teacher.class_names["names"])} classes mapped to the '
                 f"data's by name ({teacher.class_names['source']}; teacher.class_map={t.class_map})")


def recorded_top1(path: Optional[str]) -> Optional[float]:
    """The top-1 a teacher file records: a fitted teacher's metadata, or its record beside it."""
    if not path or not str(path).endswith('.safetensors') or not Path(path).is_file():
        return None
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata() or {}
    if 'top1' in meta:
        return float(json.loads(meta['top1']))
    record = Path(path).with_suffix('.json')
    if record.is_file():
        return json.loads(record.read_text()).get('metrics', {}).get('teacher_top1')
    return None


def recorded_img_size(path: Optional[str]) -> Optional[int]:
    """The image size a teacher fitted here was fitted at: its metadata, or the record beside it."""
    if not path or not str(path).endswith('.safetensors') or not Path(path).is_file():
        return None
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata() or {}
    if 'img_size' in meta:
        return int(json.loads(meta['img_size']))
    record = Path(path).with_suffix('.json')
    if record.is_file():
        return json.loads(record.read_text()).get('record', {}).get('data', {}).get('img_size')
    return None


DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def teacher_options(cfg: DictConfig) -> Dict[str, Any]:
    """The DistillationTask arguments that set how the teacher runs."""
    t = cfg.teacher
    return {'inference_mode': t.inference_mode, 'teacher_dtype': DTYPES.get(t.precision),
            'channels_last': t.channels_last}


def speed_up(teacher: DistillationTeacher, t: DictConfig) -> DistillationTeacher:
    """Apply teacher config `t`'s fast path to a frozen teacher: precision, memory format, torch.compile."""
    if t.precision in DTYPES:
        teacher.model.to(DTYPES[t.precision])
    if t.channels_last:
        teacher.model.to(memory_format=torch.channels_last)
    if t.compile:
        teacher.compile()
    return teacher


def _source(t: DictConfig, num_classes: int) -> str:
    """Where `get_teachers` takes teacher `t` from: 'checkpoint', 'hub', or 'fit' (fitted here, or reused)."""
    if t.checkpoint:
        return 'checkpoint'
    return 'hub' if t.pretrained and (t.class_map or _hub_head_fits(t, num_classes)) else 'fit'


def cache_claims(cfg: DictConfig, pipe: Pipeline, teachers: Optional[List[DistillationTeacher]] = None
                 ) -> List[Dict[str, Any]]:
    """How this run identifies each teacher to a teacher-output cache (shake_vit/distill/cache.py).

    The writer (`teachers` given) records every teacher's weights' sha256, with the hub name or the fit settings it
    came from. A reader builds no teacher: a teacher whose weights are at hand without fitting (a file, or one fitted
    earlier in the run folder) is hashed as loaded; a hub teacher is named; a teacher still to be fitted is known by
    its fit settings alone.
    """
    from ..distill.cache import weights_hash
    claims = []
    for index, t in enumerate(teacher_configs(cfg)):
        source = _source(t, pipe.num_classes)
        fitted = fitted_earlier(cfg, index, teacher_record(cfg, t)) if source == 'fit' else None
        if teachers is not None:
            claim = {'sha256': weights_hash(teachers[index].model)}
            if source != 'checkpoint':
                claim[source] = t.name if source == 'hub' else teacher_record(cfg, t)
        elif source == 'hub':
            claim = {'hub': t.name}
        elif source == 'fit' and fitted is None:
            claim = {'fit': teacher_record(cfg, t)}
        else:  # the weights are here: the ones the run would load, at the precision it would run them
            model = load_teacher(t, pipe.num_classes, (pipe.mean, pipe.std), str(t.checkpoint or fitted),
                                 cfg.train.trust_pickled_files)
            claim = {'sha256': weights_hash(speed_up(model, t).model)}  # (the hash looks through torch.compile)
        claims.append(claim)
    return claims


def get_teachers(cfg: DictConfig, acc: Accelerator, pipe: Pipeline, fit: bool = True) -> List[DistillationTeacher]:
    """Every teacher the config asks for, each from, in this order: its `checkpoint`; timm's pretrained weights when
    their head fits the classes; a teacher fitted earlier in the run directory; a new fit (only when `fit`; without
    it a teacher that cannot be had is left out)."""
    teachers, data_norm = [], (pipe.mean, pipe.std)
    for index, t in enumerate(teacher_configs(cfg)):
        fitted = fitted_path(cfg, index).with_suffix('.safetensors')
        source = None  # the file the teacher's weights come from (its record: classes, top-1)
        if t.checkpoint:
            teacher, source = load_teacher(t, pipe.num_classes, data_norm, trusted=cfg.train.trust_pickled_files), \
                t.checkpoint
        elif _source(t, pipe.num_classes) == 'hub':
            with downloads_first(acc):
                teacher = load_teacher(t, pipe.num_classes, data_norm)
        elif fit:
            if t.class_map:
                raise ConfigError('teacher.class_map maps the classes of a given teacher (teacher.checkpoint or '
                                  'teacher.pretrained) to the data\'s; a teacher fitted here already predicts the '
                                  "data's classes: drop teacher.class_map.")
            teacher, source = fit_teacher(cfg, t, index, acc, pipe), str(fitted)
        elif fitted.is_file():
            teacher, source = load_teacher(t, pipe.num_classes, data_norm, str(fitted)), str(fitted)
        else:
            break
        describe_classes(teacher, t, source, pipe.splits.classes, acc)
        if teacher.normalisation.note:
            log(acc, f"warning: teacher{f' {index}' if index else ''} {t.name}: {teacher.normalisation.note}")
        same = tuple(teacher.normalisation.mean) == tuple(pipe.mean) and tuple(teacher.normalisation.std) == \
            tuple(pipe.std)
        log(acc, f"teacher{f' {index}' if index else ''} {t.name} receives inputs normalised with "
                 f"{teacher.normalisation.describe()}: "
                 + ("the student's, passed through" if same else "re-normalised from the student's "
                    f'(mean {[round(v, 4) for v in pipe.mean]}, std {[round(v, 4) for v in pipe.std]})'))
        teachers.append(speed_up(teacher.to(acc.device), t))
    return teachers
