"""One registry entry per distillation method: everything the trainer needs to know about it, in one place.

An entry holds the method's loss (bound to the `loss` config section), its default temperature, whether it needs a
teacher, whether it trains the shadow head(s), whether it takes several teachers, and what the student outputs in
eval mode unless `model.predict` says otherwise. Nothing else in the package branches on a method's name: the config
reads its choices and defaults here, the student its heads, the task its loss. A new method is its loss and one
`register(Method(...))` in its family's methods.py (shake_vit/classification/methods.py,
shake_vit/detection/methods.py); each family has its own entries, under the same names where they mean the same
method.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from omegaconf import DictConfig

from ..core.config import ConfigError, check_choice

LossFn = Callable[..., Dict[str, torch.Tensor]]  # (s, h, t, y, ce) -> {term: weighted value}


@dataclass(frozen=True)
class Method:
    """A distillation method.

    Attributes:
        name: the `loss.method` value.
        build: `(loss config section, temperature) -> loss function` with its weights bound.
        summary: one line for docs and `--print-config`.
        temperature: the published default T (`loss.temperature: null` takes it); None for methods without one.
        needs_teacher: whether a teacher is built (and fitted, when no weights are given).
        trains_shadow: whether the student gets shadow heads and trains them; without, a pooled-feature student has
            none and a distilled DeiT's `head_dist` stays frozen and unreported.
        several_teachers: whether `extra_teachers` may be set (one shadow head per teacher).
        predict: the student's eval-mode output unless `model.predict` is set: 'cls' (the classification head, SHAKE's
            deliverable) or 'avg' (the average of all heads, DeiT's inference).
        family: the task family whose trainer runs it (the config's `task`).
        argmax_only: whether the loss reads the teacher's top class alone.
    """

    name: str
    build: Callable[[DictConfig, Optional[float]], LossFn]
    summary: str
    temperature: Optional[float] = None
    needs_teacher: bool = True
    trains_shadow: bool = True
    several_teachers: bool = False
    predict: str = 'cls'
    family: str = 'classification'
    argmax_only: bool = False  # reads only the teacher's top class (a teacher-output cache may hold just that)


METHODS: Dict[str, Dict[str, Method]] = {}  # family -> name -> method


def register(method: Method) -> Method:
    METHODS.setdefault(method.family, {})[method.name] = method
    return method


def get(name: str, family: str = 'classification') -> Method:
    return METHODS[family][name]


def of(cfg: DictConfig) -> Method:
    """The configured method (`loss.method` of the config's task family)."""
    return get(cfg.loss.method, cfg.task)


def temperature(cfg: DictConfig) -> float:
    """The KD temperature in force: the configured one, else the method's published default (1 without one)."""
    if cfg.loss.temperature is not None:
        return float(cfg.loss.temperature)
    default = of(cfg).temperature
    return 1.0 if default is None else default


def loss_fn(cfg: DictConfig) -> LossFn:
    """The configured method's loss with its weights bound."""
    return of(cfg).build(cfg.loss, temperature(cfg))


def check(cfg: DictConfig) -> None:
    """`loss.method` is one of the task family's methods, and takes the teachers the config gives."""
    check_choice(cfg, 'loss.method', tuple(METHODS.get(cfg.task, ())), f' for task {cfg.task}')
    if cfg.extra_teachers and not of(cfg).several_teachers:
        raise ConfigError(f"extra_teachers is set but loss.method is '{cfg.loss.method}', which takes one teacher: "
                          'several teachers are SHAKE\'s (one shadow head each). Use loss.method=shake, or drop '
                          'extra_teachers.')
