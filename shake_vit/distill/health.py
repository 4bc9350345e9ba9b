"""Health checks: the run says when the teacher or the loss is wrong, before the hours are spent.

Each check has its own switch under `health.*` and reports in the log (one paragraph: what was seen, the likely
causes, what to try), in TensorBoard (`health/<check>`: 0 ok, 1 warning, 2 failed) and in the `health` section of
results.json. This is the base every family's checks build on (`Family.health`), with the checks on the logged loss
terms:

- stall: the student's cross-entropy (unweighted, `monitor_ce`) not below `stall_fraction` x ln(K) once
  `stall_after` of the run's updates are done: a warning with the terms' sizes.
- dominance: at the first log point, a distillation term more than `dominance_factor` times the student's
  cross-entropy: a warning.

The teacher checks before the first update are each family's: shake_vit/classification/health.py (top-1, class
order), shake_vit/detection/health.py (AP, and the shadow predictor's drift).
"""
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Sequence

from accelerate import Accelerator
from omegaconf import DictConfig

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

    # during training --------------------------------------------------------------------------------------------

    def observe(self, values: Dict[str, float], update: int) -> None:
        """A log point's averaged terms (Trainer.flush): the dominance check at the first, the stall check once
        (where the student's cross-entropy is logged); a family adds its own."""
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

    def summary(self) -> Dict[str, Dict[str, Any]]:
        """The `health` section of results.json."""
        return dict(self.findings)
