"""Detection (`task: detection`) for the one trainer: Faster R-CNN students with shadow box predictors, COCO mAP."""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from accelerate import Accelerator, PartialState
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from ..core import data as shared_data
from ..core.build import Pipeline, downloads_first, log
from ..core.config import ConfigError
from ..core.family import Family, Metrics, register
from ..core.stream import derive
from ..core.weights import WEIGHT_SUFFIXES, read_state_dict
from ..distill import methods
from ..distill.teacher import fit_or_reuse, fitted_path, teacher_record, train_teacher
from . import backbone, data, export
from .evaluation import evaluate_detection, format_table
from .health import DetectionHealth
from .models import DETECTORS, SMALL, DetectionStudent, build_detector, check_teacher, det_settings
from .task import DetectionTask, DetectorTask


def weights_name(source: Optional[str]) -> Optional[str]:
    """`model.pretrained` when it names torchvision weights (COCO_V1, DEFAULT) rather than a local file."""
    if not source or Path(source).suffix in WEIGHT_SUFFIXES or '/' in source or Path(source).exists():
        return None
    return source


def student_detector(cfg: DictConfig, num_classes: int) -> nn.Module:
    """The configured student detector; with `model.pretrained` naming torchvision's COCO weights, built from them
    as torchvision fine-tunes (frozen BatchNorm, `det.trainable_backbone_layers`, a new predictor for these
    classes)."""
    return build_detector(cfg.model.name, num_classes, det_settings(cfg, cfg.model.kwargs, 'model.kwargs'),
                          weights=weights_name(cfg.model.pretrained), backbone_weights=cfg.det.backbone_weights,
                          key='model.pretrained' if weights_name(cfg.model.pretrained) else 'model.name',
                          new_predictor=True)


def teacher_detector(cfg: DictConfig, num_classes: int, weights: Optional[str] = None) -> nn.Module:
    """The teacher's architecture (`teacher.kwargs` over `det`). `det.backbone_weights` is the student's; a teacher
    starts from a pretrained backbone only when `teacher.kwargs.backbone_weights` names one: torchvision's weights
    (read when it is built), or for a small ResNet a file or the digits pretraining (`fit_teacher` loads it): the same
    skeleton, frozen BatchNorm included, whether it is fitted here or loaded."""
    det = det_settings(cfg, cfg.teacher.kwargs, 'teacher.kwargs')
    return build_detector(cfg.teacher.name, num_classes, det, weights=weights,
                          backbone_weights=cfg.teacher.kwargs.get('backbone_weights'),
                          key='teacher.pretrained' if weights else 'teacher.name')


def load_backbone(cfg: DictConfig, detector: nn.Module, det: DictConfig, log, who: str) -> None:
    """A new detector's ResNet body from `det.backbone_weights` when that is a file or the digits pretraining."""
    source = det.backbone_weights
    if backbone.is_file_source(source):
        backbone.load_body(detector.backbone.body, backbone.resnet_state(source, cfg), source)
        where = f' ({backbone.digits_folder(cfg) / "student.safetensors"})' if source == backbone.DIGITS else ''
        log(f"{who}'s backbone: {source}{where}, BatchNorm frozen")


# the det keys a detector's weights depend on: a resumed run must match them
GEOMETRY = ('min_size', 'max_size', 'anchor_sizes', 'fpn_channels', 'box_head_dim', 'rois_per_image',
            'trainable_backbone_layers')


def frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def _detector_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A `DetectionStudent`'s keys, from our checkpoints (`detector.`, `shadow_...`) or an export (the detector's)."""
    from timm.models import clean_state_dict
    state = clean_state_dict(state)  # DDP's `module.`
    if any(k.startswith('detector.') for k in state):
        return state
    return {f'detector.{k}': v for k, v in state.items()}


def load_weights(student: DetectionStudent, weights: Dict[str, torch.Tensor], path, cfg: DictConfig) -> bool:
    """Load a run's (or an export's) weights into the configured student; every detector tensor must fit. Returns
    whether the weights held the shadow predictors (an export has none)."""
    shadow = ('shadow_predictors', 'shadow_box_heads')
    try:
        missing, unexpected = student.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        missing, unexpected = [str(err).splitlines()[1].strip()], []
    if unexpected or [k for k in missing if not k.startswith(shadow)]:
        raise ConfigError(f"The weights in '{path}' do not fit the configured student {cfg.model.name} (missing "
                          f'{missing[:5]}, unexpected {unexpected[:5]}): pass the config it was trained with.')
    return not any(k.startswith(shadow) for k in missing)


class DetectionFamily(Family):
    name = 'detection'
    data_names = ('digit_scenes', 'coco')
    check_classes = 91  # COCO's category ids

    def before_run(self, cfg: DictConfig, train) -> bool:
        """`det.backbone_weights=digits`: the ResNet's classification pretraining on the training split's digits, a
        classification run of this trainer in `<output_dir>/backbone/`, unless one with the same settings is done (one
        stopped part-way is resumed)."""
        arches = [SMALL[cfg.model.name]] if cfg.model.name in SMALL and cfg.det.backbone_weights == backbone.DIGITS \
            else []
        if (methods.of(cfg).needs_teacher and cfg.teacher.name in SMALL and not cfg.teacher.checkpoint
                and cfg.teacher.kwargs.get('backbone_weights') == backbone.DIGITS):
            arches.append(SMALL[cfg.teacher.name])
        for run in backbone.prerequisites(cfg, arches):
            main = PartialState().is_main_process
            if main:
                print(f'[shake-vit] det.backbone_weights=digits: pretraining {run.model.name} on the digits of the '
                      f'training scenes ({run.train.epochs} epochs at {run.data.img_size} px) in '
                      f'{run.train.output_dir}', flush=True)
            results = train(run)
            if not results:  # stopped by a signal: the detection run stops too; the same command resumes both
                return False
            if main:
                backbone.record_done(run, results)
        return True

    def build_splits(self, cfg: DictConfig):
        return data.build_splits(cfg)

    def build_student(self, cfg: DictConfig, num_classes: int) -> DetectionStudent:
        if cfg.model.name not in DETECTORS:
            raise ConfigError(f"'model.name' is '{cfg.model.name}', not a detector here: with task detection choose "
                              f"one of {', '.join(DETECTORS)}.")
        method, on = methods.of(cfg), cfg.det.shadow_on
        width, head = None, None
        if method.trains_shadow and on == 'teacher':  # the shadow reads the teacher's box features: their width
            with torch.random.fork_rng(devices=[]):  # students of every method start from the same weights
                heads = teacher_detector(cfg, num_classes).roi_heads
            width, head = heads.box_predictor.cls_score.in_features, heads.box_head
        return DetectionStudent(student_detector(cfg, num_classes), num_shadow=int(method.trains_shadow),
                                own_box_head=cfg.det.shadow_box_head, shadow_on=on, shadow_width=width,
                                shadow_box_head=head)

    def check_architectures(self, cfg: DictConfig, num_classes: int) -> None:
        offline = cfg.copy()  # the architectures alone: no torchvision weights are read or downloaded
        offline.det.backbone_weights, offline.model.pretrained = None, None
        offline.teacher.kwargs.pop('backbone_weights', None)
        self.build_student(offline, num_classes)
        if methods.of(cfg).needs_teacher:
            teacher_detector(offline, num_classes)

    def start_from_teachers(self, cfg: DictConfig, student: DetectionStudent, teachers: List[nn.Module]) -> None:
        if student.shadow_on == 'teacher' and teachers:
            check_teacher(teachers[0], student, cfg.teacher.name)  # before its predictor is copied
            student.start_from_teacher(teachers[0])

    def init_student(self, cfg: DictConfig, student: DetectionStudent, log) -> None:
        """`model.pretrained` as a local file: a torchvision detector's state dict, an export, or a run's weights of
        the same detector. A box predictor of another class count starts fresh (fine-tuning on new classes), as do
        shadow predictors the file lacks; every other tensor must fit."""
        load_backbone(cfg, student.detector, cfg.det, log, 'the student')
        source = cfg.model.pretrained
        if not source:
            return
        if weights_name(source):
            log(f"fine-tuning from torchvision's {cfg.model.name} weights {source} (new box predictor for "
                f'{student.num_classes} classes)')
            return
        state = _detector_keys(read_state_dict(source, cfg.train.trust_pickled_files))
        if student.shadow_on == 'teacher':  # proxy-teacher shadows start from this run's teacher instead
            state = {k: v for k, v in state.items() if not k.startswith('shadow_')}
        own = student.state_dict()
        fresh = sorted({k.rsplit('.', 2)[0] for k, v in state.items()
                        if k.startswith('detector.roi_heads.box_predictor.') and k in own and v.shape != own[k].shape})
        state = {k: v for k, v in state.items() if not k.startswith(tuple(fresh))
                 and not (k.endswith('num_batches_tracked') and k not in own)}  # FrozenBatchNorm2d has none
        wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
        missing, unexpected = student.load_state_dict({k: v for k, v in state.items() if k not in wrong},
                                                      strict=False)
        missing = [k for k in missing if k not in wrong and not k.startswith(('shadow_', *fresh))
                   and not k.endswith('num_batches_tracked')]
        unexpected = [k for k in unexpected if not k.startswith('shadow_')]
        if missing or unexpected or wrong:
            raise ConfigError(f"model.pretrained='{source}' does not fit {cfg.model.name} as configured (missing "
                              f'{missing[:4]}, unexpected {unexpected[:4]}, other shapes {wrong[:4]}): name the '
                              'architecture it holds in model.name, and its det.* / model.kwargs settings.')
        notes = ['a new box predictor: the file predicts another class count'] if fresh else []
        if student.num_shadow and student.shadow_on == 'teacher':
            notes.append("shadow predictor: from the teacher's (det.shadow_on=teacher)")
        elif student.num_shadow and not any(k.startswith('shadow_') for k in state):
            notes.append('new shadow predictor')
        log(f'fine-tuning from {source}' + ''.join(f'\n    {note}' for note in notes))

    def run_identity(self, cfg: DictConfig, student: DetectionStudent) -> Dict[str, Any]:
        return {'model': cfg.model.name, 'model_kwargs': OmegaConf.to_container(cfg.model.kwargs),
                'num_shadow': student.num_shadow, 'shadow_box_head': cfg.det.shadow_box_head,
                'shadow_on': cfg.det.shadow_on, 'det': {k: OmegaConf.to_container(cfg.det)[k] for k in GEOMETRY},
                'num_classes': student.num_classes}

    def build_pipeline(self, cfg: DictConfig, acc: Accelerator, splits, student: nn.Module) -> Pipeline:
        train_tf, val_tf = data.build_transforms(cfg)
        train = shared_data.train_loader(cfg, splits.train, train_tf, acc.num_processes, acc.process_index,
                                      self.train_repeats(cfg), joint=True, collate_fn=data.collate)
        val = acc.prepare(shared_data.eval_loader(cfg, splits.val, val_tf, joint=True, collate_fn=data.collate))
        return Pipeline(splits, train, val, None, None)

    def get_teachers(self, cfg: DictConfig, acc: Accelerator, pipe: Pipeline, fit: bool = True) -> List[nn.Module]:
        """The teacher detector, from (in this order) `teacher.checkpoint` (a torchvision state dict), torchvision's
        COCO weights (`teacher.pretrained`), a teacher fitted earlier in the run folder, or a new fit."""
        if not methods.of(cfg).needs_teacher:
            return []
        t, k = cfg.teacher, pipe.num_classes
        fitted = fitted_path(cfg, 0).with_suffix('.safetensors')
        if t.checkpoint:
            teacher = teacher_detector(cfg, k)
            try:
                teacher.load_state_dict(read_state_dict(t.checkpoint, cfg.train.trust_pickled_files))
            except RuntimeError as err:
                raise ConfigError(f"The teacher checkpoint '{t.checkpoint}' does not fit teacher.name='{t.name}' "
                                  f'({str(err).splitlines()[0]} ...): check teacher.name and teacher.kwargs.') from None
        elif t.pretrained:
            with downloads_first(acc):
                teacher = teacher_detector(cfg, k, weights='DEFAULT')
        elif fit:
            teacher = self.fit_teacher(cfg, acc, pipe)
        elif fitted.is_file():
            teacher = teacher_detector(cfg, k)
            teacher.load_state_dict(load_file(str(fitted)))
        else:
            return []
        # the AP its record holds (a teacher fitted here, or a file with its teacher.json beside it): the health check
        record = Path(t.checkpoint or fitted).with_suffix('.json')
        if not t.pretrained and record.is_file():
            teacher.recorded_ap = json.loads(record.read_text()).get('metrics', {}).get('teacher_ap')
        return [frozen(teacher).to(acc.device)]

    def fit_teacher(self, cfg: DictConfig, acc: Accelerator, pipe: Pipeline) -> nn.Module:
        """Train `teacher.name` on the training split with its own four losses, save it as `teacher.safetensors`
        in the run folder (with its mAP in teacher.json) and reuse it when the settings have not changed."""
        t = cfg.teacher
        det = {k: v for k, v in cfg.det.items()  # the student-only keys left out
               if k not in ('shadow_on', 'shadow_box_head', 'backbone_weights', 'backbone_fit')}
        if t.get('kwargs', {}).get('backbone_weights'):  # a teacher pretrained here depends on how
            det['backbone_fit'] = cfg.det.backbone_fit

        def load(path: Path) -> nn.Module:
            teacher = teacher_detector(cfg, pipe.num_classes)
            teacher.load_state_dict(load_file(str(path)))
            return teacher

        def fit() -> nn.Module:
            log(acc, f'fitting the teacher {t.name} on the training split for {t.fit.epochs} epochs')
            skeleton = teacher_detector(cfg, pipe.num_classes)
            if t.name in SMALL and backbone.is_file_source(t.kwargs.get('backbone_weights')):
                load_backbone(cfg, skeleton, det_settings(cfg, t.kwargs, 'teacher.kwargs'), lambda m: log(acc, m),
                              'the teacher')
            return train_teacher(cfg, t, 0, acc, pipe, DetectorTask(skeleton))

        def measure(teacher: nn.Module) -> Dict:
            return evaluate_detection(lambda images: {'teacher': teacher(images)}, pipe.val_loader, acc,
                                      desc='teacher eval')
        return fit_or_reuse(cfg, t, 0, acc, teacher_record(cfg, t, task=cfg.task, det=det), load=load, fit=fit,
                            measure=measure,
                            describe=lambda m: f"AP {m['teacher_ap']:.2f}, AP50 {m['teacher_ap50']:.2f}")

    def health(self, cfg: DictConfig, acc: Accelerator, classes, total_updates: int, log) -> DetectionHealth:
        return DetectionHealth(cfg, acc, classes, total_updates, log)

    def check_teachers(self, health, task: DetectionTask, teachers: List[nn.Module], pipe: Pipeline) -> None:
        """The teacher's AP on `health.teacher_images` validation images (evenly strided) against its record."""
        if not teachers or not health.h.teacher:
            return
        dataset = pipe.val_loader.dataset
        n = min(health.h.teacher_images, len(dataset))
        index = [round(i * len(dataset) / n) for i in range(n)]
        loader = health.acc.prepare(torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, index), batch_size=health.cfg.eval.batch_size, collate_fn=data.collate))
        with torch.random.fork_rng(devices=[]):  # the run's RNG streams stay as they would be without the check
            metrics = evaluate_detection(lambda images: {'teacher': teachers[0](images)}, loader, health.acc,
                                         desc='teacher check')
        health.check_teacher(metrics['teacher_ap'], metrics['teacher_ap50'], getattr(teachers[0], 'recorded_ap', None),
                             metrics['num_samples'])

    def make_task(self, cfg: DictConfig, student: nn.Module, teachers: List[nn.Module], pipe) -> DetectionTask:
        inner = getattr(student, 'module', student)  # under DDP
        for teacher in teachers:
            check_teacher(teacher, inner, cfg.teacher.name)
        transform = inner.detector.transform
        # the ramps' length, in updates; --eval (which trains nothing) may have a training split too small for one
        stream = pipe.train_loader.batch_sampler.stream
        ramp = derive(cfg, 1, pipe.updates_per_epoch).warmup_updates if stream.full_updates else 0
        return DetectionTask(student, teachers[0] if teachers else None, methods.loss_fn(cfg), transform.image_mean,
                             transform.image_std, ramp_updates=ramp)

    def evaluate(self, student: DetectionStudent, ema, task: DetectionTask, loader, acc: Accelerator,
                 with_shadow: bool = True) -> Metrics:
        on_rois = task.teacher_on_rois if task.teacher is not None else None  # for shadows on its features

        def predictor(model: DetectionStudent, teacher: Optional[nn.Module]):
            def predict(images):
                heads = model.predict(images, with_shadow, on_rois)
                if teacher is not None:
                    heads['teacher'] = teacher(images)  # the teacher's own pipeline: its transform, RPN, heads
                return heads
            return predict
        student.eval()
        metrics = evaluate_detection(predictor(student, task.teacher), loader, acc)
        if ema is not None:  # the EMA's heads; the teacher is scored once
            ema_metrics = evaluate_detection(predictor(ema.module, None), loader, acc, desc='eval EMA')
            metrics.update({f'ema_{k}': v for k, v in ema_metrics.items() if k not in ('num_samples',
                                                                                         'images_per_sec')})
        return metrics

    def best_metric(self, student: DetectionStudent) -> str:
        return 'student_ap'

    def headline(self, metrics: Metrics) -> str:
        return 'AP ' + ', '.join(f'{h} {metrics[f"{h}_ap"]:.2f}' for h in ('student', 'shadow', 'teacher')
                                 if f'{h}_ap' in metrics)

    def format_table(self, metrics: Metrics, student: nn.Module) -> str:
        return format_table(metrics)

    def student_keys(self, state):
        return _detector_keys(state)

    def load_weights(self, student: DetectionStudent, weights, path, cfg: DictConfig) -> bool:
        return load_weights(student, weights, path, cfg)

    def classes_in(self, weights, cfg: DictConfig) -> int:
        return weights['detector.roi_heads.box_predictor.cls_score.weight'].shape[0]

    def cache_teacher(self, cfg: DictConfig, root: str) -> Dict[str, Any]:
        raise ConfigError("--cache-teacher serves classification; a detection teacher scores the student's own "
                          'proposals, which no cache can hold.')

    def check_export(self, head: Optional[str], fmt: str) -> None:
        export.check_request(head, fmt)

    def export(self, student: DetectionStudent, with_shadow: bool, where: Path, cfg: DictConfig, head: Optional[str],
               out_dir: Optional[str], fmt: str) -> Path:
        return export.export(self, student, where, cfg, out_dir)


register(DetectionFamily())
