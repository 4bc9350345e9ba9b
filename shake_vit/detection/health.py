"""Detection's health checks (on the base in shake_vit/distill/health.py), under the same switches where they mean
the same: the teacher's AP on `teacher_images` validation images against the AP its record holds (`teacher`); the
shadow predictor's KL from the teacher above `shadow_drift` (`shadow_drift`, a warning); the student's accuracy on
foreground RoIs below `stall_fg_acc` once `stall_after_det` of the updates are done (`stall`, a warning).
"""
from typing import Dict, Optional

from ..distill.health import Health


class DetectionHealth(Health):
    def check_teacher(self, ap: float, ap50: float, recorded: Optional[float], images: int) -> None:
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

    def observe(self, values: Dict[str, float], update: int) -> None:
        self._observe_detection(values, update)
        super().observe(values, update)

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
