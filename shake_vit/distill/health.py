"""Health checks: the run says when the teacher or the loss is wrong, before the hours are spent.

Each check has its own switch under `health.*` and reports in the log (one paragraph: what was seen, the likely
causes, what to try), in TensorBoard (`health/<check>`: 0 ok, 1 warning, 2 failed; `health/teacher_top1`) and in the
`health` section of results.json.

- teacher: the teachers' top-1 on the first `health.teacher_images` validation images, before the first update. A
  teacher far below what its file records, or near chance with no record, stops the run (HealthError).
- class_order: a teacher whose class names are known (a fitted teacher records them; timm's ImageNet teachers have
  them) and are the data's classes in another order stops the run; names that differ are a warning.
- stall: the student's cross-entropy (unweighted, `monitor_ce`) not below `stall_fraction` x ln(K) once
  `stall_after` of the run's updates are done: a warning with the terms' sizes.
- dominance: at the first log point, a distillation term more than `dominance_factor` times the student's
  cross-entropy: a warning.

Detection (the same switches where they mean the same): the teacher's AP on `teacher_images` validation images
against the AP its record holds (`teacher`); the shadow predictor's KL from the teacher above `shadow_drift`
(`shadow_drift`, a warning); the student's accuracy on foreground RoIs below `stall_fg_acc` once `stall_after_det`
of the updates are done (`stall`, a warning).
"""
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from ..core.config import ConfigError

STATUS = {'ok': 0, 'warning': 1, 'failed': 2}
NOT_TERMS = ('loss', 'lr', 'images_per_sec', 'monitor_ce', 'monitor_fg_acc', 'monitor_shadow_kl', 'sum_student',
             'sum_shadow')


class HealthError(ConfigError):
    """A check that stops the run before its first update; the message says what was seen and what to try."""


class Health:
    """The findings of one run's checks.

    Args:
        cfg: the run's config (`health.*`).
        acc: the run's Accelerator (TensorBoard).
        classes: the data's class names.
        total_updates: the run's optimizer updates (the stall check waits for a share of them).
        log: prints a line on the main process.
    """

    def __init__(self, cfg: DictConfig, acc: Accelerator, classes: Sequence[str], total_updates: int,
                 log: Callable[[str], None]):
        self.cfg, self.h, self.acc, self.classes, self.log = cfg, cfg.health, acc, list(classes), log
        self.total_updates = total_updates
        self.findings: Dict[str, Dict[str, Any]] = {}
        self._first_log = True

    def _report(self, check: str, status: str, seen: str, causes: str = '', remedy: str = '', **values) -> None:
        self.findings[check] = {'status': status, 'seen': seen, **({'causes': causes} if causes else {}),
                                **({'try': remedy} if remedy else {}), **values}
        self.acc.log({f'health/{check}': STATUS[status],
                      **{f'health/{k}': v for k, v in values.items() if isinstance(v, (int, float))}})
        if status != 'ok':
            self.log(f'health check {check}: {status.upper()}. Seen: {seen}.'
                     + (f' Likely causes: {causes}.' if causes else '') + (f' Try: {remedy}.' if remedy else ''))

    # before training -------------------------------------------------------------------------------------------

    def check_teachers(self, task, teachers: List, val_loader: DataLoader, cache=None):
        """The class-order and teacher-sanity checks (`cache`: a teacher-output cache's reader, which stands in for
        the teachers); raises HealthError on a failure."""
        if not teachers and cache is None:  # a method without a teacher
            return
        names = [self._name(i) for i in range(max(len(teachers), 1))]
        if self.h.class_order:
            for i, t in enumerate(teachers):
                self._class_order(names[i], t)
        if not self.h.teacher:
            return
        chance = 100.0 / len(self.classes)
        if cache is not None:  # a teacher-output cache: what its writer measured on the whole validation set
            scores = [(cache.metrics.get('teacher_top1'), cache.recorded_top1,
                       'the whole validation set, as the cache writer measured it')]
        else:
            scores = self._measure(task, teachers, val_loader)
        for name, (top1, recorded, where, *size) in zip(names, scores):
            if top1 is None:
                continue
            self._teacher(name, top1, recorded, chance, where, *size)

    def _name(self, i: int) -> str:
        return 'teacher' if i == 0 else f'teacher_{i}'

    def _measure(self, task, teachers: List, val_loader: DataLoader):
        from ..core.engine import evaluate
        dataset = val_loader.dataset
        n = min(self.h.teacher_images, len(dataset))
        # evenly strided: an image folder's validation split is sorted by class, so its first images are few classes
        index = [round(i * len(dataset) / n) for i in range(n)]
        loader = self.acc.prepare(DataLoader(Subset(dataset, index), batch_size=self.cfg.eval.batch_size,
                                             generator=torch.Generator()))

        def predict(x):
            t, _ = task.teacher_outputs(x)
            ts = t if isinstance(t, tuple) else (t,)
            return {self._name(i): v for i, v in enumerate(ts)}
        with torch.random.fork_rng(devices=[]):  # the run's RNG streams stay as they would be without the check
            metrics = evaluate(predict, loader, self.acc, desc='teacher check')
        where = f'{metrics["num_samples"]} validation images spread over the split'
        return [(metrics['teacher_top1' if i == 0 else f'top1_teacher_{i}'], getattr(t, 'recorded_top1', None), where,
                 getattr(t, 'recorded_img_size', None)) for i, t in enumerate(teachers)]

    def _teacher(self, name: str, top1: float, recorded: Optional[float], chance: float, where: str,
                 fitted_size: Optional[int] = None) -> None:
        floor = self.h.near_chance * chance
        values = {f'{name}_top1': top1}
        causes = ("its inputs are normalised otherwise than it was trained with (the log line 'teacher ... receives "
                  "inputs normalised with' above says what it gets; teacher.mean/std override it), its classes are "
                  "in another order than the data's (teacher.class_map=auto maps them by name), or the wrong file "
                  '(teacher.checkpoint)')
        remedy = ('check those three; a teacher for other classes can be refitted on yours by dropping '
                  'teacher.checkpoint; health.teacher=false trains anyway')
        size = self.cfg.data.img_size
        if fitted_size is not None and fitted_size != size:  # the likeliest cause, named first
            causes = f'it was fitted at {fitted_size} px and this run feeds it {size} px (data.img_size); or {causes}'
            remedy = (f'run at data.img_size={fitted_size}, or refit the teacher at {size} px (a new train.output_dir, '
                      'or drop teacher.checkpoint); ' + remedy.replace('check those three', 'else check the others'))
        if recorded is not None and top1 < recorded - self.h.max_drop:
            raise self._fail(name, f'{name} scores {top1:.2f}% top-1 on {where}, {recorded - top1:.1f} points below '
                             f'the {recorded:.2f}% its file records (chance: {chance:.2f}%)', causes, remedy, values)
        if recorded is None and top1 < floor:
            raise self._fail(name, f'{name} scores {top1:.2f}% top-1 on {where}, near chance ({chance:.2f}%; the '
                             f'check asks for {floor:.2f}%, health.near_chance x chance)', causes, remedy, values)
        if recorded is not None and recorded < floor:
            self._report(name, 'warning', f'{name} scores {top1:.2f}% top-1 on {where}; it scored {recorded:.2f}% '
                         f'when it was fitted, near chance ({chance:.2f}%)', 'too short a fit (teacher.fit.epochs)',
                         'fit the teacher longer, or give a trained one (teacher.checkpoint)', **values)
            return
        self._report(name, 'ok', f'{name} scores {top1:.2f}% top-1 on {where}'
                     + (f' (its file records {recorded:.2f}%)' if recorded is not None else ''), **values)

    def _fail(self, name: str, seen: str, causes: str, remedy: str, values: Dict[str, float]) -> HealthError:
        self.findings[name] = {'status': 'failed', 'seen': seen, 'causes': causes, 'try': remedy, **values}
        self._record_failure(name, values)
        return HealthError(f'The teacher check stopped the run before its first update. Seen: {seen}. Likely causes: '
                           f'{causes}. Try: {remedy}.')

    def _record_failure(self, check: str, values: Dict[str, float]) -> None:
        """A failure stops the run before results.json exists: TensorBoard gets `health/<check>` = 2 and the output
        folder `health.json`."""
        self.acc.log({f'health/{check}': STATUS['failed'],
                      **{f'health/{k}': v for k, v in values.items() if isinstance(v, (int, float))}})
        if self.acc.is_main_process:
            out = Path(self.cfg.train.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / 'health.json').write_text(json.dumps(self.findings, indent=2))

    def _class_order(self, name: str, teacher) -> None:
        from ..classification.classmap import order_finding
        if getattr(teacher, 'class_index', None) is not None:
            self._report(f'{name}_classes', 'ok', f"{name}'s outputs mapped to the data's classes by name")
            return
        finding = order_finding(getattr(teacher, 'class_names', None), self.classes)
        if finding is None:
            return
        remedy = ('teacher.class_map=auto selects and orders its outputs by class name (or a class-map file for '
                  'renamings); health.class_order=false trains anyway')
        if finding['status'] == 'failed':
            self.findings[f'{name}_classes'] = {**finding, 'try': remedy}
            self._record_failure(f'{name}_classes', {})
            raise HealthError(f"The class-order check stopped the run before its first update. Seen: "
                              f"{finding['seen']}. The teacher's logits would be compared with the wrong classes. "
                              f'Try: {remedy}.')
        self._report(f'{name}_classes', 'warning', finding['seen'], 'a teacher for other classes, or the same '
                     'classes under other names', remedy)

    def check_detection_teacher(self, ap: float, ap50: float, recorded: Optional[float], images: int) -> None:
        """A detection teacher's AP on `images` validation images, before the first update: far below its record, or
        with no record an AP50 under `det_min_ap50`, stops the run."""
        if not self.h.teacher:
            return
        values = {'teacher_ap': ap, 'teacher_ap50': ap50}
        where = f'{images} validation images spread over the split'
        causes = ("its inputs are normalised otherwise than it was trained with (a detector normalises its own "
                  'inputs: the teacher file may come from a detector with other image_mean/std), its classes are in '
                  "another order than the data's category ids, or the wrong file (teacher.checkpoint, teacher.name, "
                  'teacher.kwargs)')
        remedy = 'check those; drop teacher.checkpoint to fit a teacher here; health.teacher=false trains anyway'
        if recorded is not None and ap < recorded - self.h.max_drop:
            raise self._fail('teacher', f'the teacher scores AP {ap:.2f} on {where}, {recorded - ap:.1f} points below '
                             f'the AP {recorded:.2f} its record holds', causes, remedy, values)
        if recorded is None and ap50 < self.h.det_min_ap50:
            raise self._fail('teacher', f'the teacher scores AP50 {ap50:.2f} on {where}, below '
                             f'{self.h.det_min_ap50:g} (health.det_min_ap50): it finds almost nothing', causes, remedy,
                             values)
        self._report('teacher', 'ok', f'the teacher scores AP {ap:.2f} (AP50 {ap50:.2f}) on {where}'
                     + (f' (its record: AP {recorded:.2f})' if recorded is not None else ''), **values)

    # during training --------------------------------------------------------------------------------------------

    def observe(self, values: Dict[str, float], update: int) -> None:
        """A log point's averaged terms (Trainer.flush): the dominance check at the first, the stall check once;
        the detection checks where their monitors are logged."""
        self._observe_detection(values, update)
        ce = values.get('monitor_ce')
        if ce is None:
            return
        # the distillation terms: what compares with a teacher or between heads, not the heads' label losses
        terms = {k: v for k, v in values.items() if k not in NOT_TERMS and k not in ('ce_cls', 'ce_shadow')}
        sizes = ', '.join(f'{k} {v:.3f}' for k, v in sorted(values.items()) if k not in ('lr', 'images_per_sec'))
        if self._first_log and self.h.dominance and terms and update <= 2 * self.cfg.train.log_interval:
            name, biggest = max(terms.items(), key=lambda kv: kv[1])
            ratio = biggest / max(ce, 1e-8)
            if ratio > self.h.dominance_factor:
                self._report('dominance', 'warning', f'at update {update}, {name} is {ratio:.1f}x the student\'s '
                             f'cross-entropy ({sizes})', 'a high temperature (its terms grow with T^2) or a large '
                             'distillation weight', 'a lower loss.temperature, a smaller loss.teacher_weight / '
                             'loss.mutual, or a longer optim.warmup_epochs', dominance_ratio=ratio)
            else:
                self._report('dominance', 'ok', f'at update {update}, the largest distillation term, {name}, is '
                             f"{ratio:.1f}x the student's cross-entropy", dominance_ratio=ratio)
        self._first_log = False
        if self.h.stall and 'stall' not in self.findings and update >= self.h.stall_after * self.total_updates:
            limit = self.h.stall_fraction * math.log(len(self.classes))
            if ce > limit:
                self._report('stall', 'warning', f"after {update} of {self.total_updates} updates the student's "
                             f'cross-entropy is {ce:.3f}, above {limit:.3f} ({self.h.stall_fraction:g} x ln '
                             f'{len(self.classes)}): it is near chance ({sizes})', 'the distillation terms drown '
                             'the labels early on (see their sizes), or the lr is too high or too low',
                             'a lower loss.temperature, a smaller loss.teacher_weight / loss.mutual, a longer '
                             'optim.warmup_epochs, or another optim.lr', student_ce=ce)
            else:
                self._report('stall', 'ok', f"after {update} updates the student's cross-entropy is {ce:.3f} (limit "
                             f'{limit:.3f})', student_ce=ce)

    def _observe_detection(self, values: Dict[str, float], update: int) -> None:
        kl, fg = values.get('monitor_shadow_kl'), values.get('monitor_fg_acc')
        if kl is not None and self.h.shadow_drift and 'shadow_drift' not in self.findings and kl > self.h.shadow_drift:
            sizes = ', '.join(f'{k} {v:.3f}' for k, v in sorted(values.items()) if k.startswith(('kl_', 'box_',
                                                                                                  'anchor_')))
            self._report('shadow_drift', 'warning', f"at update {update} the shadow predictor's KL from the teacher "
                         f'is {kl:.3f}, above {self.h.shadow_drift:g} (health.shadow_drift): it has stopped being a '
                         f'proxy of the teacher ({sizes})', 'its pull toward a student that is still untrained '
                         '(loss.mutual_shadow) outweighs its pull toward the teacher and the labels',
                         'loss.shadow_anchor=1 (its own RoI losses on the labels), a smaller loss.mutual_shadow, '
                         'loss.ramp_shadow=true, or a pretrained backbone (det.backbone_weights)', shadow_kl=kl)
        if (fg is not None and self.h.stall and 'stall' not in self.findings
                and update >= self.h.stall_after_det * self.total_updates):
            if fg < self.h.stall_fg_acc:
                self._report('stall', 'warning', f'after {update} of {self.total_updates} updates the student '
                             f'classifies {100 * fg:.1f}% of the foreground RoIs right, below '
                             f'{100 * self.h.stall_fg_acc:g}% (health.stall_fg_acc): it still calls them background',
                             'a detector trained from scratch on little data, a too short warm-up, or an lr too '
                             'high or too low', 'a pretrained backbone (det.backbone_weights), a longer '
                             'optim.warmup_epochs or another optim.lr', student_fg_acc=fg)
            else:
                self._report('stall', 'ok', f'after {update} updates the student classifies {100 * fg:.1f}% of the '
                             'foreground RoIs right', student_fg_acc=fg)
        if kl is not None:
            self._max_kl = max(kl, getattr(self, '_max_kl', 0.0))
            if 'shadow_drift' not in self.findings and update >= self.total_updates:
                self._report('shadow_drift', 'ok', f"the shadow predictor's KL from the teacher stayed at or below "
                             f'{self.h.shadow_drift:g} at every log point (largest {self._max_kl:.3f})',
                             shadow_kl=self._max_kl)

    def summary(self) -> Dict[str, Dict[str, Any]]:
        """The `health` section of results.json."""
        return dict(self.findings)
