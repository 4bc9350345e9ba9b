"""The training step of every distillation method as a timm `TrainingTask`: student, frozen teacher, named terms."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from einops import rearrange
from timm.task import DistillationTeacher, TrainingTask

from ..distill.methods import LossFn
from .models import ProxyInput, linear_classifier

Teachers = Union[torch.Tensor, Tuple[torch.Tensor, ...]]  # one teacher's logits [B, K], or one per teacher


class DistillationTask(TrainingTask):
    """Student forward, teachers' forward on the same (augmented, mixed) batch, and the method's named loss terms.

    The teachers stay outside the optimizer and outside DDP: only `trainable_module` is handed to Accelerate.

    Args:
        student: module whose training-mode forward returns (cls logits [B, K], shadow logits [B, K], or a tuple of
            them with several teachers); a `Student` with proxy-teacher heads also takes the teachers' maps.
        teachers: frozen teachers (a single one, a list, or None for methods without one), each holding the
            statistics its inputs are normalised with (`mean_kd`, `std_kd`; see shake_vit/classification/teacher.py).
        loss: the method's loss, `(s, h, t, y, ce) -> {term: weighted value}`; `h` and `t` are tuples with several
            teachers.
        criterion: label loss on class indices or mixup soft targets.
        mean: the student's input normalisation mean, undone for a teacher normalised differently.
        std: likewise the std.
        inference_mode: run the teachers under `torch.inference_mode` rather than `no_grad`.
        teacher_dtype: the teachers' own precision (weights already cast), outside autocast; None follows autocast.
        channels_last: feed the teachers channels-last inputs (their weights already converted).
        cache: a teacher-output cache reader (shake_vit/distill/cache.py) giving every batch's teacher logits in
            place of `teachers` (then empty); the trainer positions it batch by batch.
    """

    def __init__(self, student: nn.Module, teachers, loss: LossFn, criterion: nn.Module, mean, std,
                 inference_mode: bool = True, teacher_dtype: Optional[torch.dtype] = None,
                 channels_last: bool = False, cache=None):
        super().__init__(verbose=False)
        self.cache = cache
        self.inference_mode, self.teacher_dtype, self.channels_last = inference_mode, teacher_dtype, channels_last
        self.trainable_module = student
        if teachers is None:
            teachers = []
        self.teachers = nn.ModuleList([teachers] if isinstance(teachers, DistillationTeacher) else teachers)
        self.loss = loss
        self.criterion = criterion
        mean, std = (rearrange(torch.tensor(v), 'c -> 1 c 1 1') for v in (mean, std))
        self.register_buffer('student_mean', mean, persistent=False)
        self.register_buffer('student_std', std, persistent=False)
        # Decided once here: DistillationTeacher.normalize_input compares the tensors on every call, a host-device
        # synchronisation per step on a GPU.
        self.renormalize = [not (torch.equal(mean, t.mean_kd.cpu()) and torch.equal(std, t.std_kd.cpu()))
                            for t in self.teachers]
        # Which feature maps each teacher's proxy-teacher head fuses (student placement 'teacher'), else None. Fewer
        # teachers than heads (`--eval` without the teacher's file): those heads give no logits.
        heads = getattr(getattr(student, 'module', student), 'shadow_heads', ())  # under DDP, the student is .module
        indices = [getattr(h, 'indices', None) for h in heads]
        self.proxy_indices = (indices + [None] * len(self.teachers))[:len(self.teachers)]

    @property
    def teacher(self) -> Optional[DistillationTeacher]:
        return self.teachers[0] if len(self.teachers) else None

    def train(self, mode: bool = True) -> 'DistillationTask':
        super().train(mode)
        self.teachers.eval()  # BatchNorm statistics of the teachers must never move
        return self

    def _one_teacher(self, teacher: DistillationTeacher, renormalize: bool, x: torch.Tensor,
                     indices: Optional[Sequence[int]]) -> Tuple[torch.Tensor, Optional[ProxyInput]]:
        """One teacher's logits [B, K] and, when its proxy head needs them (`indices`), its feature maps and
        classifier, in one forward."""
        # Maps for the proxy head enter the student's graph: they must not be inference-mode tensors.
        with torch.inference_mode() if self.inference_mode and indices is None else torch.no_grad():
            if renormalize:  # from the student's normalisation to the teacher's
                x = (x * self.student_std + self.student_mean - teacher.mean_kd) / teacher.std_kd
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.teacher_dtype is None:  # under the run's autocast, if any
                t, proxy = self._run(teacher, x, indices)
            else:  # the teacher's own precision, its weights already cast
                with torch.autocast(x.device.type, enabled=False):
                    t, proxy = self._run(teacher, x.to(self.teacher_dtype), indices)
            t = t.float()
        # An inference-mode tensor cannot be saved for the student's backward: a normal copy ([B, K], cheap) can.
        return (t.clone() if self.inference_mode and indices is None else t), proxy

    @staticmethod
    def _run(teacher: DistillationTeacher, x: torch.Tensor,
             indices: Optional[Sequence[int]]) -> Tuple[torch.Tensor, Optional[ProxyInput]]:
        if indices is None:
            logits = teacher(x)
            index = getattr(teacher, 'class_index', None)  # teacher.class_map: the data's classes, in its order
            return (logits if index is None else logits.index_select(1, index)), None
        final, maps = teacher.model.forward_intermediates(x, indices=list(indices))  # maps [B, C_i, H_i, W_i]
        fc = linear_classifier(teacher.model)
        return teacher.model.forward_head(final), ([f.float() for f in maps], fc.weight.float(), fc.bias.float())

    def teacher_outputs(self, x: torch.Tensor) -> Tuple[Optional[Teachers], Optional[List[ProxyInput]]]:
        """For student-normalised images [B, C, H, W]: the teachers' logits [B, K] (a tuple with several teachers,
        None without one) and, for a student with proxy-teacher heads, each teacher's maps and classifier (else
        None); never part of the autograd graph."""
        if self.cache is not None:  # the batch the trainer staged; None in evaluation (no cached teacher there)
            return self.cache.take(x.device), None
        outs = [self._one_teacher(t, r, x, i) for t, r, i in zip(self.teachers, self.renormalize, self.proxy_indices)]
        if not outs:
            return None, None
        logits = tuple(t for t, _ in outs)
        proxy = [p for _, p in outs] if outs[0][1] is not None else None
        return (logits[0] if len(logits) == 1 else logits), proxy

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        t, proxy = self.teacher_outputs(input)
        s, h = self.trainable_module(input) if proxy is None else self.trainable_module(input, proxy)
        terms = self.loss(s, h, t, target, self.criterion)
        # the student's own cross-entropy, unweighted whatever the method: the health checks' yardstick (logged as
        # train/monitor_ce, not a loss term)
        monitor = self.criterion(s.detach().float(), target).detach()
        return {'loss': sum(terms.values()), **terms, 'monitor_ce': monitor, 'logits_cls': s}
