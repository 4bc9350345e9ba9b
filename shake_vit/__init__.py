"""shake-vit: SHAKE (shadow knowledge distillation) on timm, torchvision and Accelerate.

The packages, from the bottom up; a package imports only from the layers below its own (LAYERS, checked by
tests/test_layout.py), and nothing outside a family package branches on the task family:

    core/            the spine: config loading and the shared sections, the input stream in global terms, the
                     engine (Trainer), checkpoints, preemption, optimizer and schedule, the run folder, the runner,
                     the Family interface and its registry
    distill/         what every family shares about distillation: the method registry, the logit losses, teacher
                     fitting and records, the health checks' base, the teacher-output cache's format and store
    zoo/             architectures timm lacks (CRD's CIFAR networks, adapters), registered in timm's registry
    classification/  DeiT and CNN students: data, the student with its shadow heads, the task, teachers,
                     evaluation, export, class maps, its methods, config section and health checks
    detection/       Faster R-CNN students with a shadow box predictor: the same roles
                     (classification and detection never import each other)

Importing the package registers both families (`core.family.register`), their config sections and their methods.
"""
__version__ = '0.1.0'

# The layering, as data: each entry may import the entries before it, never one after it or beside it.
LAYERS = (('core',), ('distill', 'zoo'), ('classification', 'detection'))

from . import classification, detection  # noqa: E402,F401  (each registers its family, sections and methods)
