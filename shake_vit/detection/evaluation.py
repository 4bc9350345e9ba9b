"""COCO mAP of every detection head: the student's predictor, the shadow predictor(s), the teacher.

Each process runs its shard of the prepared val loader; `gather_for_metrics`, batch by batch, collects every image's
detections and ground truth once (the padding of the last shard dropped), and torchmetrics' `MeanAveragePrecision`
(pycocotools backend) scores them, on every process alike. Values are percentages, as COCO results are reported.
"""
import time
from typing import Callable, Dict, List

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..core.engine import progress
from .models import Detections

METRICS = {'ap': 'map', 'ap50': 'map_50', 'ap75': 'map_75', 'ap_small': 'map_small', 'ap_medium': 'map_medium',
           'ap_large': 'map_large'}  # our key suffix -> torchmetrics' key
HEADS = ('student', 'shadow', 'teacher')  # table rows, in order (shadow_1, teacher_1, ... follow their first)


def _cpu(d: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in d.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def evaluate_detection(predict: Callable[[List[torch.Tensor]], Dict[str, Detections]], loader: DataLoader,
                       acc: Accelerator, desc: str = 'eval') -> Dict[str, float]:
    """AP, AP50, AP75 and AP by size (COCO's definitions) of every head `predict` returns, as `<head>_<metric>`.

    Args:
        predict: a batch of images -> {head: one detections dict per image}.
        loader: the prepared val loader, yielding (images, targets) lists.
    """
    # imported here: torchmetrics pulls in scipy.signal and matplotlib, about 1.8 s of every run's start (6.1 s -> 4.3)
    from torchmetrics.detection import MeanAveragePrecision
    records, start = [], time.perf_counter()
    with progress(loader, desc=desc, disable=not acc.is_local_main_process) as batches:
        for images, targets in batches:
            heads = predict(images)
            batch = [{'target': {k: target[k].cpu() for k in ('boxes', 'labels', 'iscrowd', 'area') if k in target},
                      'heads': {h: _cpu(dets[i]) for h, dets in heads.items()}} for i, target in enumerate(targets)]
            # per batch: on the last one Accelerate drops the samples its sampler repeated to even out the shards
            records += acc.gather_for_metrics(batch, use_gather_object=True)
    metrics: Dict[str, float] = {}
    for head in (records[0]['heads'] if records else {}):
        meter = MeanAveragePrecision(box_format='xyxy', iou_type='bbox', backend='pycocotools')
        meter.update([r['heads'][head] for r in records], [r['target'] for r in records])
        scores = meter.compute()
        metrics.update({f'{head}_{ours}': 100 * float(scores[theirs]) for ours, theirs in METRICS.items()})
    metrics['num_samples'] = len(records)
    metrics['images_per_sec'] = len(records) / max(time.perf_counter() - start, 1e-9)
    return metrics


def format_table(metrics: Dict[str, float]) -> str:
    """AP / AP50 / AP75 of every head evaluated; the student's predictor is the model (the shadow is dropped)."""
    heads = sorted({k.rsplit('_ap', 1)[0] for k in metrics if k.endswith('_ap') and not k.startswith('best_')},
                   key=lambda h: (HEADS.index(h.split('_')[0]) if h.split('_')[0] in HEADS else 9, h))
    lines = [f"{'head':<20}{'AP':>8}{'AP50':>8}{'AP75':>8}", '-' * 44]
    for head in heads:
        label = {'student': 'student', 'teacher': 'teacher'}.get(head, head.replace('shadow', 'shadow predictor'))
        mark = '  <- the model' if head == 'student' else ''
        lines.append(f"{label:<20}{metrics[f'{head}_ap']:>8.2f}{metrics[f'{head}_ap50']:>8.2f}"
                     f"{metrics[f'{head}_ap75']:>8.2f}{mark}")
    if 'best_epoch' in metrics:
        best = [(k, v) for k, v in metrics.items() if k.startswith('best_') and k != 'best_epoch']
        if best:
            lines.append(f"best {best[0][0][len('best_'):]} {best[0][1]:.2f} at epoch {metrics['best_epoch']}")
    lines.append(f"{metrics['num_samples']} images, {metrics['images_per_sec']:.1f} images/s")
    return '\n'.join(lines)
