"""SHAKE for object detection (`task: detection`): torchvision Faster R-CNN students with a shadow box predictor.

    data.py       the embedded digit scenes and COCO-format data sets, their transforms and collate
    models.py     detector builders, the student (detector + shadow predictors), the teacher on the student's RoIs
    task.py       the training steps: distillation, and a detector's own losses (teacher fitting)
    evaluation.py COCO mAP of every head (torchmetrics), exact over processes
    family.py     what the one trainer needs (shake_vit/core/family.py): teachers, --eval, --export
"""
from . import config, methods, family  # noqa: F401,I001  (they register the section, the methods, the family)
