"""Classification (`task: classification`): DeiT ViTs with SHAKE's shadow head on the distillation token, and CNN
students with the authors' proxy-teacher head.

    config.py      its config section (`aug`) and checks
    data.py        data sets (digits, ImageFolder, CIFAR, fake), DeiT's transforms, mixup, the loaders
    models.py      the student (a timm classifier with shadow heads), the proxy-teacher head, architectures
    methods.py     the methods it runs (registered in shake_vit/distill/methods.py): shake, deit_*, kd, none
    tasks.py       the training step (timm's DistillationTask with the method's loss)
    teacher.py     teachers: a file, timm's hub, or fitted on the training split; normalisation, class names
    classmap.py    a teacher for another class set, mapped by name
    pretrained.py  fine-tuning: reading timm / DeiT / safetensors weights into the student
    health.py      the teachers' top-1 and class order before the first update
    evaluation.py  every head's top-1, `--eval`
    export.py      a plain timm model (or ONNX)
    cache_writer.py  `--cache-teacher`: the teachers' outputs on the run's input stream
    family.py      what the one trainer needs (shake_vit/core/family.py)
"""
from . import config, methods, family  # noqa: F401,I001  (they register the section, the methods, the family)
