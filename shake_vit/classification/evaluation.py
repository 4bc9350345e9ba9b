"""Evaluating a student: every head, its EMA, the teacher; and `train.py --eval` on any saved or exported model."""
from typing import Callable, Dict, Optional

import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from ..core.engine import evaluate
from .models import Student, average_heads
from .tasks import DistillationTask

Predict = Callable[[torch.Tensor], Dict[str, torch.Tensor]]


def head_predictor(student: Student, teacher_outputs: Callable, with_shadow: bool = True) -> Predict:
    """Eval-mode logits of every head: cls, shadow (shadow_1, ... with several teachers), the average of all heads
    (DeiT's inference), and the teachers' (teacher, teacher_1, ...)."""
    def predict(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        t, proxy = teacher_outputs(x)
        s, hs = student.forward_heads(x, proxy)
        heads = {'cls': s}
        if with_shadow and hs:
            heads.update({('shadow' if i == 0 else f'shadow_{i}'): h for i, h in enumerate(hs)})
            heads['avg'] = average_heads(s, hs)
        ts = [] if t is None else [t] if isinstance(t, torch.Tensor) else list(t)
        heads.update({('teacher' if i == 0 else f'teacher_{i}'): ti for i, ti in enumerate(ts)})
        return heads
    return predict


def evaluate_student(student: Student, ema: Optional[ModelEmaV3], task: DistillationTask, loader: DataLoader,
                     acc: Accelerator, with_shadow: bool = True) -> Dict[str, float]:
    """The live student's metrics, plus `ema_`-prefixed ones for its EMA weights."""
    student.eval()
    metrics = evaluate(head_predictor(student, task.teacher_outputs, with_shadow), loader, acc)
    if ema is not None:
        ema_metrics = evaluate(head_predictor(ema.module, task.teacher_outputs, with_shadow), loader, acc,
                               desc='eval EMA')
        metrics.update({f'ema_{k}': v for k, v in ema_metrics.items() if 'teacher' not in k and k != 'num_samples'})
    return metrics


def format_table(metrics: Dict[str, float], predict: Optional[str] = None) -> str:
    """The evaluation as a table; `predict` ('cls' or 'avg') marks the head the student predicts with."""
    rows = [('student cls head', 'cls'), ('shadow head', 'shadow'), ('average of heads', 'avg')]  # DeiT's inference
    lines = [f"{'head':<20}{'top-1':>8}{'top-5':>8}", '-' * 36]
    for label, head in rows:
        for prefix, tag in (('', ''), ('ema_', '  EMA ')):
            if f'{prefix}top1_{head}' in metrics:
                mark = '  <- the model' if head == predict and not prefix else ''
                lines.append(f"{tag + label:<20}{metrics[f'{prefix}top1_{head}']:>8.2f}"
                             f"{metrics[f'{prefix}top5_{head}']:>8.2f}{mark}")
    if 'teacher_top1' in metrics:
        lines.append(f"{'teacher':<20}{metrics['teacher_top1']:>8.2f}{metrics['teacher_top5']:>8.2f}")
    best = [(k, v) for k, v in metrics.items() if k.startswith('best_') and k != 'best_epoch']
    if best and 'best_epoch' in metrics:
        lines.append(f"best {best[0][0][len('best_'):]} {best[0][1]:.2f} at epoch {metrics['best_epoch']}")
    agree = f"; cls/shadow agreement {metrics['agree_cls_shadow']:.2f}%" if 'agree_cls_shadow' in metrics else ''
    lines.append(f"{metrics['num_samples']} images, {metrics['images_per_sec']:.0f} images/s{agree}")
    return '\n'.join(lines)
