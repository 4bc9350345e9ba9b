"""The detection training steps as timm `TrainingTask`s: distillation into a student, and a detector's own losses."""
from typing import Dict, Optional

import torch
import torch.nn as nn
from einops import rearrange
from timm.task import TrainingTask

from ..distill.methods import LossFn
from .losses import RoIOutputs, monitors, side
from .models import teacher_on_rois


class DetectionTask(TrainingTask):
    """The student's four detector losses plus the method's distillation terms on its sampled RoIs.

    The teacher stays outside the optimizer and outside DDP (only `trainable_module` is prepared), in eval mode, and
    scores the student's RoIs under no_grad; the loop sees named terms only.

    Args:
        student: a `DetectionStudent` (DDP-wrapped or not).
        teacher: the frozen teacher detector, or None for `none`.
        loss: the method's terms, `(s_cls, s_box, h_cls, h_box, t_cls, t_box, labels) -> {term: value}`.
        student_mean: the student's input normalisation (its GeneralizedRCNNTransform's), undone for a teacher
            that expects other statistics.
        student_std: likewise.
        ramp_updates: the lr warm-up's updates, over which ramped weights (loss.ramp_*) grow from 0 to theirs.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], loss: LossFn, student_mean, student_std,
                 ramp_updates: int = 0):
        super().__init__(verbose=False)
        self.trainable_module, self.teacher, self.loss = student, teacher, loss
        self.ramp_updates = ramp_updates
        self.update = 0  # optimizer updates done: the trainer sets it before each step (shake_vit/core/engine.py)
        mean, std = (rearrange(torch.tensor(v, dtype=torch.float32), 'c -> c 1 1') for v in (student_mean,
                                                                                              student_std))
        self.register_buffer('student_mean', mean, persistent=False)
        self.register_buffer('student_std', std, persistent=False)
        if teacher is not None:
            t_mean, t_std = (rearrange(torch.tensor(v, dtype=torch.float32), 'c -> c 1 1')
                             for v in (teacher.transform.image_mean, teacher.transform.image_std))
            self.register_buffer('teacher_mean', t_mean, persistent=False)
            self.register_buffer('teacher_std', t_std, persistent=False)
            # decided once: comparing on every step would synchronise host and device
            self.renormalize = not (torch.equal(mean, t_mean) and torch.equal(std, t_std))

    def train(self, mode: bool = True) -> 'DetectionTask':
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm statistics and RPN/box-head modes of the teacher never change
        return self

    @torch.no_grad()
    def teacher_on_rois(self, x: torch.Tensor, proposals, image_sizes):
        """The frozen teacher on the student's batch `x` (as the student's transform left it) and RoIs."""
        if self.renormalize:
            x = (x * self.student_std + self.student_mean - self.teacher_mean) / self.teacher_std
            for i, (h, w) in enumerate(image_sizes):  # the batch padding stays 0, as the teacher's own transform pads
                x[i, :, h:, :] = 0
                x[i, :, :, w:] = 0
        return teacher_on_rois(self.teacher, x, proposals, image_sizes)

    def forward(self, images, targets) -> Dict[str, torch.Tensor]:
        """The loss, its named terms, their sums per side (`sum_student`, `sum_shadow`: what the student's and the
        shadow's parameters are trained on, exactly so with the shadow on the teacher's features; see
        `detection_losses.side`) and the monitors the health checks read; only the terms add up to `loss`."""
        teacher = self.teacher_on_rois if self.teacher is not None else None
        out = self.trainable_module(images, targets, teacher)
        terms = dict(out['losses'])
        o = RoIOutputs(out['s_cls'], out['s_box'], out['labels'], out['regression_targets'],
                       out['losses']['loss_classifier'])
        if self.teacher is not None:
            o.t_cls, o.t_box = out['teacher']
            o.h_cls, o.h_box = out['shadows'][0] if out['shadows'] else (None, None)
            terms.update(self.loss(o, ramp=self.ramp()))
        sums = {f'sum_{who}': sum((v for k, v in terms.items() if side(k) == who), o.s_cls.new_zeros(()))
                for who in ('student', 'shadow')}
        return {'loss': sum(terms.values()), **terms, **{k: v.detach() for k, v in sums.items()}, **monitors(o)}

    def ramp(self) -> float:
        """The share of the lr warm-up done (1 without a warm-up): ramped weights grow with it."""
        return min(1.0, self.update / self.ramp_updates) if self.ramp_updates else 1.0


class DetectorTask(TrainingTask):
    """A detector trained on its own four losses (torchvision's training forward): fitting a teacher."""

    def __init__(self, detector: nn.Module):
        super().__init__(verbose=False)
        self.trainable_module = detector

    def forward(self, images, targets) -> Dict[str, torch.Tensor]:
        terms = self.trainable_module(images, targets)
        return {'loss': sum(terms.values()), **terms}
