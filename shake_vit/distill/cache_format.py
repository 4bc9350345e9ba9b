"""The teacher-output cache's on-disk format (`teacher_cache.store`): full logits, top-k with the tail's exact softmax
mass at a few temperatures, or the argmax; encoding and decoding (the layout on disk: shake_vit/distill/cache.py).
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from ..core.config import ConfigError


@dataclass
class Format:
    store: str  # full | topk | argmax
    k: int  # logits kept per sample (topk), else 0
    precision: str  # how values are stored: fp32 | bf16 | fp16
    num_classes: int
    exact: bool = True  # the values are the teacher's own (checked on writing); False: rounded to fp16 on request

    def bytes_per_sample(self, teachers: int) -> int:
        width = 4 if self.precision == 'fp32' else 2
        index = 2 if self.num_classes <= 2 ** 15 else 4
        one = {'full': self.num_classes * width, 'topk': self.k * (width + index) + 4 * len(TAIL_TEMPERATURES),
               'argmax': index}[self.store]
        return 8 + teachers * one  # + the label

    def describe(self) -> str:
        kind = {'full': 'full logits', 'topk': f'top-{self.k} logits and a shared tail', 'argmax': 'the argmax'}
        return f'{kind[self.store]} ({self.precision}, {self.num_classes} classes)'


def choose_format(cfg: DictConfig, num_classes: int, samples: int, teachers: int) -> Format:
    """The format of `teacher_cache` for a schedule of `samples` samples (all epochs, all processes)."""
    c = cfg.teacher_cache
    precision = _output_precision(cfg) if c.precision == 'auto' else c.precision
    exact = c.precision != 'fp16' or _output_precision(cfg) == 'fp16'
    full = Format('full', 0, precision, num_classes, exact)
    store = c.store
    if store == 'auto':
        fits = samples * full.bytes_per_sample(teachers) <= c.max_gb * 2 ** 30
        store = 'full' if fits or c.topk >= num_classes else 'topk'
    if store == 'topk' and c.topk >= num_classes:
        store = 'full'  # k >= K keeps every logit
    return Format(store, c.topk if store == 'topk' else 0, precision, num_classes, exact)


TAIL_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)  # where a top-k cache keeps the tail's exact softmax mass


_NUMPY = {'fp32': np.float32, 'fp16': np.float16, 'bf16': np.uint16}  # bf16 kept as its raw 16 bits


def _to_numpy(values: torch.Tensor, precision: str, exact: bool = True) -> np.ndarray:
    """Values [B, n] float32 -> the stored dtype. Stored in 16 bits because the teacher computes in them (`exact`),
    they must round-trip exactly; fp16 asked for (`exact` False) rounds."""
    low = values.to({'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision, torch.float32))
    if exact and precision != 'fp32' and not torch.equal(low.float(), values):
        raise CacheError(f'The teacher produced logits that are not {precision} values although it runs in '
                         f'{precision}: store them in full precision (teacher_cache.precision=fp32).')
    if precision == 'bf16':
        return low.view(torch.int16).numpy().view(np.uint16)
    return low.numpy().astype(_NUMPY[precision])


def _from_numpy(array: np.ndarray, precision: str) -> torch.Tensor:
    if precision == 'bf16':
        return torch.from_numpy(np.array(array).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the shard is a read-only memory map


def encode(logits: torch.Tensor, fmt: Format) -> Dict[str, np.ndarray]:
    """One teacher's logits [B, K] (float32, CPU) as the arrays `fmt` stores."""
    index = np.int16 if fmt.num_classes <= 2 ** 15 else np.int32
    if fmt.store == 'full':
        return {'values': _to_numpy(logits, fmt.precision, fmt.exact)}
    if fmt.store == 'argmax':
        return {'indices': logits.argmax(dim=1).numpy().astype(index)}
    top, idx = logits.topk(fmt.k, dim=1)
    rest = logits.scatter(1, idx, float('-inf'))  # [B, K] with the top k masked out
    tail = torch.stack([torch.logsumexp(rest / T, dim=1) for T in TAIL_TEMPERATURES], dim=1) \
        - math.log(fmt.num_classes - fmt.k)  # [B, len(TAIL_TEMPERATURES)]: f(T), the tail's log-mean-exp at T
    return {'values': _to_numpy(top, fmt.precision, fmt.exact), 'indices': idx.numpy().astype(index),
            'tail': tail.numpy().astype(np.float32)}


def tail_logit(tail: torch.Tensor, temperature: float) -> torch.Tensor:
    """The shared tail logit [B] for a run at `temperature`: T * f(T), f linear in 1/T between the stored points."""
    betas = [0.0, *sorted(1 / T for T in TAIL_TEMPERATURES)]  # 1/T ascending, with f = 0 at 1/T = 0
    values = torch.cat([torch.zeros(len(tail), 1), tail.flip(1)], dim=1)  # f at those points
    beta = 1 / temperature
    i = min(max(int(np.searchsorted(betas, beta)) - 1, 0), len(betas) - 2)  # the segment, extrapolating past 1/T=1
    w = (beta - betas[i]) / (betas[i + 1] - betas[i])
    return temperature * ((1 - w) * values[:, i] + w * values[:, i + 1])


def decode(arrays: Dict[str, np.ndarray], fmt: Format, temperature: float = 1.0) -> torch.Tensor:
    """The logits [B, K] float32 the stored arrays stand for: exact for `full` at the teacher's precision; for
    `topk`, the tail rebuilt for a run at `temperature` (see the module's docstring)."""
    if fmt.store == 'full':
        return _from_numpy(arrays['values'], fmt.precision)
    idx = torch.from_numpy(np.array(arrays['indices'], dtype=np.int64))
    if fmt.store == 'argmax':  # a one-hot row: its argmax is the teacher's class, all deit_hard reads
        return torch.zeros(len(idx), fmt.num_classes).scatter_(1, idx[:, None], 1.0)
    tail = tail_logit(torch.from_numpy(np.array(arrays['tail'], dtype=np.float32)), temperature)
    full = tail[:, None].expand(len(tail), fmt.num_classes).clone()
    return full.scatter_(1, idx, _from_numpy(arrays['values'], fmt.precision))


def epoch_size(samples_per_epoch: int, fmt: Format, teachers: int = 1) -> int:
    """Bytes one epoch of `samples_per_epoch` samples takes in format `fmt` (the benchmarks' size table)."""
    return samples_per_epoch * fmt.bytes_per_sample(teachers)


class CacheError(ConfigError):
    """A cache that cannot serve this run; the message names what differs and what to do."""


def _output_precision(cfg: DictConfig, t: Optional[DictConfig] = None) -> str:
    """The precision a live teacher's logits come out in: its own (`teacher.precision`), else the autocast's."""
    t = cfg.teacher if t is None else t
    if t.precision != 'auto':
        return t.precision
    return {'no': 'fp32'}.get(cfg.train.mixed_precision, cfg.train.mixed_precision)
