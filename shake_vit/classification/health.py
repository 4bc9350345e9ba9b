"""Classification's health checks before the first update (on the base in shake_vit/distill/health.py):

- teacher: the teachers' top-1 on the first `health.teacher_images` validation images, before the first update. A
  teacher far below what its file records, or near chance with no record, stops the run (HealthError).
- class_order: a teacher whose class names are known (a fitted teacher records them; timm's ImageNet teachers have
  them) and are the data's classes in another order stops the run; names that differ are a warning.
"""
from typing import List, Optional

import torch
from torch.utils.data import DataLoader, Subset

from ..distill.health import Health, HealthError


class ClassificationHealth(Health):
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
        if hasattr(val_loader, 'subset'):  # the DALI loader (shake_vit/classification/dali.py): its own records
            loader = val_loader.subset(index, self.acc.prepare)
        else:
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

    def _class_order(self, name: str, teacher) -> None:
        from .classmap import order_finding
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
