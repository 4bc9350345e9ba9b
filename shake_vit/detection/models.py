"""Detectors (torchvision's Faster R-CNN), the student with its shadow box predictor(s), the teacher on the student's
RoIs.

The student's training forward is torchvision's (`GeneralizedRCNN.forward` then `RoIHeads.forward`) opened up, so
that the sampled RoIs, their box features and their labels are at hand: the teacher is run on the same RoIs, row for
row, and the shadow predictor reads the teacher's box features of them (or the student's).
"""
import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torchvision
from omegaconf import DictConfig, OmegaConf
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from ..core.config import ConfigError
from .backbone import is_file_source

Detections = List[Dict[str, torch.Tensor]]  # per image: boxes [N, 4] XYXY, scores [N], labels [N]

TORCHVISION = ('fasterrcnn_resnet50_fpn', 'fasterrcnn_resnet50_fpn_v2', 'fasterrcnn_mobilenet_v3_large_fpn')
SMALL = {'fasterrcnn_resnet18_fpn': 'resnet18', 'fasterrcnn_resnet34_fpn': 'resnet34'}
DETECTORS = (*TORCHVISION, *SMALL)


def _common(det: DictConfig) -> Dict:
    """FasterRCNN keyword arguments every detector here takes from the `det` section."""
    return dict(min_size=det.min_size, max_size=det.max_size, rpn_pre_nms_top_n_train=det.rpn_proposals_train,
                rpn_post_nms_top_n_train=det.rpn_proposals_train, rpn_pre_nms_top_n_test=det.rpn_proposals_test,
                rpn_post_nms_top_n_test=det.rpn_proposals_test, box_batch_size_per_image=det.rois_per_image,
                box_detections_per_img=det.detections_per_image)


def small_detector(arch: str, num_classes: int, det: DictConfig, backbone_weights: Optional[str] = None) -> FasterRCNN:
    """A torchvision ResNet-18/34 with an FPN of `det.fpn_channels` on its last three stages (plus a max-pooled
    level), anchors `det.anchor_sizes` (one per level), a `det.box_head_dim`-wide box head: torchvision's Faster
    R-CNN at a size that trains on a CPU. Pretrained backbone weights freeze its BatchNorm, as torchvision does;
    torchvision's are read here, a file's or the digits pretraining's later (`backbone.load_body`)."""
    local = is_file_source(backbone_weights)  # loaded later, into this skeleton (shake_vit/detection/backbone.py)
    weights = torchvision.models.get_weight(f'{arch.replace("resnet", "ResNet")}_Weights.{backbone_weights}') \
        if backbone_weights and not local else None
    body = getattr(torchvision.models, arch)(weights=weights,
                                             norm_layer=FrozenBatchNorm2d if weights or local else None)
    n = det.trainable_backbone_layers  # as torchvision's _resnet_fpn_extractor: the last n stages train
    trainable = ['layer4', 'layer3', 'layer2', 'layer1', 'conv1'][:n] + (['bn1'] if n == 5 else [])
    for name, p in body.named_parameters():
        if not name.startswith(tuple(trainable)):
            p.requires_grad_(False)
    width = body.inplanes // 8  # 64 for ResNet-18/34: stages 2-4 are 128, 256, 512 wide
    backbone = BackboneWithFPN(body, {'layer2': '0', 'layer3': '1', 'layer4': '2'}, [width * 2, width * 4, width * 8],
                               det.fpn_channels)  # levels '0', '1', '2' and a max-pooled 'pool'
    sizes = tuple(det.anchor_sizes or (32, 64, 128, 256))
    if len(sizes) != 4:
        raise ConfigError(f'det.anchor_sizes is {list(sizes)}: {arch}-FPN has 4 levels, one anchor size each.')
    anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
    return FasterRCNN(backbone, num_classes=None, rpn_anchor_generator=anchors,
                      box_roi_pool=MultiScaleRoIAlign(['0', '1', '2'], output_size=7, sampling_ratio=2),
                      box_head=TwoMLPHead(det.fpn_channels * 7 * 7, det.box_head_dim),
                      box_predictor=FastRCNNPredictor(det.box_head_dim, num_classes), **_common(det))


def build_detector(name: str, num_classes: int, det: DictConfig, weights: Optional[str] = None,
                   backbone_weights: Optional[str] = None, key: str = 'model.name',
                   new_predictor: bool = False) -> FasterRCNN:
    """A Faster R-CNN by name: torchvision's builders (`weights`: their COCO weights, e.g. 'DEFAULT';
    `backbone_weights`: ImageNet, e.g. 'IMAGENET1K_V1'; downloaded once into $TORCH_HOME, where a copy placed by hand
    serves offline) or the small ResNet-18/34 ones defined here. With `weights` of another class count,
    `new_predictor` replaces the box predictor by a fresh one for `num_classes` (torchvision's fine-tuning recipe)."""
    if name in SMALL:
        if weights:
            raise ConfigError(f'{name} has no published detection weights ({key}={weights!r}): fit it, or give a '
                              'local weights file.')
        return small_detector(SMALL[name], num_classes, det, backbone_weights)
    if name not in TORCHVISION:
        raise ConfigError(f"'{key}' is '{name}', not a detector here: choose one of {', '.join(DETECTORS)}.")
    if is_file_source(backbone_weights):
        raise ConfigError(f"det.backbone_weights='{backbone_weights}' (a file, or the digits pretraining) is for the "
                          f"small ResNet detectors ({', '.join(SMALL)}); {name} takes torchvision's weights names "
                          '(IMAGENET1K_V1), or a whole detector in model.pretrained.')
    try:
        model = getattr(torchvision.models.detection, name)(
            weights=weights, weights_backbone=backbone_weights, num_classes=None if weights else num_classes,
            trainable_backbone_layers=det.trainable_backbone_layers if (weights or backbone_weights) else 5,
            **_common(det))
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # an unknown weights name, a download offline
        raise ConfigError(f'Could not build {name} with weights={weights!r}, backbone weights={backbone_weights!r} '
                          f'({type(err).__name__}: {str(err).splitlines()[0][:200]}). Weights names are '
                          "torchvision's (DEFAULT, COCO_V1; IMAGENET1K_V1 for a backbone). Offline, put the weights "
                          'file in $TORCH_HOME/hub/checkpoints (torchvision reads it from there), or give a local '
                          'state dict.') from None
    predictor = model.roi_heads.box_predictor
    if new_predictor and predictor.cls_score.out_features != num_classes:
        model.roi_heads.box_predictor = FastRCNNPredictor(predictor.cls_score.in_features, num_classes)
    return model


# The teacher on the student's RoIs: (images [B, 3, H, W] as the student's transform left them, proposals, image
# sizes) -> (class scores [R, K + 1], box deltas [R, 4 (K + 1)], pooled RoI features, box features), row for row.
TeacherOnRoIs = Callable[[torch.Tensor, List[torch.Tensor], List[Tuple[int, int]]],
                         Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


class DetectionStudent(nn.Module):
    """A Faster R-CNN (`detector`, what is exported) with shadow box predictors beside its own, one per teacher.

    Each shadow predictor is a `FastRCNNPredictor` like the detector's (class scores [R, K + 1], box deltas
    [R, 4 (K + 1)]) on the same sampled RoIs. `shadow_on='teacher'` (the default, the SHAKE authors' proxy teacher):
    it reads the frozen teacher's box features of those RoIs and starts as a copy of the teacher's predictor
    (`start_from_teacher`); `'student'`: it reads the student's own box features, as the DeiT distillation token
    shares the student's trunk. With `own_box_head` it has its own copy of the box head (the teacher's, or the
    student's) on the pooled RoI features: the paper's stronger shadow head.

    Args:
        shadow_width: the box features' width the shadow reads (the teacher's box head output for 'teacher').
        shadow_box_head: the box head to copy for `own_box_head` (the teacher's for 'teacher').
    """

    def __init__(self, detector: FasterRCNN, num_shadow: int = 1, own_box_head: bool = False,
                 shadow_on: str = 'student', shadow_width: Optional[int] = None,
                 shadow_box_head: Optional[nn.Module] = None):
        super().__init__()
        self.detector, self.shadow_on = detector, shadow_on
        rh = detector.roi_heads
        num_classes = rh.box_predictor.cls_score.out_features
        width = shadow_width or rh.box_predictor.cls_score.in_features
        self.shadow_predictors = nn.ModuleList(FastRCNNPredictor(width, num_classes) for _ in range(num_shadow))
        head = shadow_box_head if shadow_box_head is not None else rh.box_head
        self.shadow_box_heads = nn.ModuleList(copy.deepcopy(head).requires_grad_(True)
                                              for _ in range(num_shadow if own_box_head else 0))

    @property
    def num_classes(self) -> int:
        return self.detector.roi_heads.box_predictor.cls_score.out_features

    @property
    def num_shadow(self) -> int:
        return len(self.shadow_predictors)

    @torch.no_grad()
    def start_from_teacher(self, teacher: FasterRCNN) -> None:
        """A new run's proxy-teacher shadows begin as the teacher's own box predictor (and box head): on the first
        step they predict what the teacher predicts."""
        rh = teacher.roi_heads
        for predictor in self.shadow_predictors:
            predictor.load_state_dict(rh.box_predictor.state_dict())
        for head in self.shadow_box_heads:
            head.load_state_dict(rh.box_head.state_dict())

    def _shadow(self, pooled: torch.Tensor, features: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        heads = self.shadow_box_heads or [None] * self.num_shadow
        return [p(features if h is None else h(pooled)) for p, h in zip(self.shadow_predictors, heads)]

    def forward(self, images: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                teacher: Optional[TeacherOnRoIs] = None) -> Dict:
        """Training: the detector's four losses, and for the distillation terms the student's, the shadows' and
        the teacher's outputs on the sampled RoIs with their labels. The teacher (a callable, never a submodule: it
        stays outside DDP) scores the RoIs inside this forward, so the shadows that read its features train under
        DDP like every other parameter."""
        d = self.detector
        rh = d.roi_heads
        batch, targets = d.transform(images, targets)  # resized and normalised, padded to one tensor
        features = d.backbone(batch.tensors)
        proposals, rpn_losses = d.rpn(batch, features, targets)
        proposals, _, labels, regression_targets = rh.select_training_samples(proposals, targets)
        pooled = rh.box_roi_pool(features, proposals, batch.image_sizes)  # [R, C, 7, 7]
        box_features = rh.box_head(pooled)  # [R, D]
        s_cls, s_box = rh.box_predictor(box_features)  # [R, K + 1], [R, 4 (K + 1)]
        loss_classifier, loss_box_reg = fastrcnn_loss(s_cls, s_box, labels, regression_targets)
        out = {'losses': {**rpn_losses, 'loss_classifier': loss_classifier, 'loss_box_reg': loss_box_reg},
               's_cls': s_cls, 's_box': s_box, 'labels': torch.cat(labels),
               'regression_targets': torch.cat(regression_targets), 'teacher': None, 'shadows': []}
        if teacher is not None:
            t_cls, t_box, t_pooled, t_features = teacher(batch.tensors, proposals, batch.image_sizes)
            out['teacher'] = (t_cls, t_box)
            if self.shadow_on == 'teacher':
                out['shadows'] = self._shadow(t_pooled, t_features)
        if self.shadow_on == 'student':
            out['shadows'] = self._shadow(pooled, box_features)
        return out

    @torch.no_grad()
    def predict(self, images: List[torch.Tensor], with_shadow: bool = True,
                teacher: Optional[TeacherOnRoIs] = None) -> Dict[str, Detections]:
        """Eval: the detections of the student's predictor ('student') and of each shadow predictor ('shadow',
        'shadow_1', ...) on the same proposals, in the original image coordinates. Shadows on the teacher's features
        need `teacher`; without it only the student's predictor is scored."""
        d = self.detector
        rh = d.roi_heads
        sizes = [img.shape[-2:] for img in images]
        batch, _ = d.transform(images)
        features = d.backbone(batch.tensors)
        proposals, _ = d.rpn(batch, features)
        pooled = rh.box_roi_pool(features, proposals, batch.image_sizes)
        box_features = rh.box_head(pooled)
        outputs = {'student': rh.box_predictor(box_features)}
        if with_shadow and self.shadow_on == 'teacher' and teacher is not None:
            pooled, box_features = teacher(batch.tensors, proposals, batch.image_sizes)[2:]
        if with_shadow and (self.shadow_on == 'student' or teacher is not None):
            outputs.update({('shadow' if i == 0 else f'shadow_{i}'): o
                            for i, o in enumerate(self._shadow(pooled, box_features))})
        detections = {}
        for head, (cls, box) in outputs.items():
            boxes, scores, labels = rh.postprocess_detections(cls, box, proposals, batch.image_sizes)
            found = [{'boxes': b, 'scores': s, 'labels': lab} for b, s, lab in zip(boxes, scores, labels)]
            detections[head] = d.transform.postprocess(found, batch.image_sizes, sizes)
        return detections


def check_teacher(teacher: FasterRCNN, student: DetectionStudent, name: str) -> None:
    """A teacher scores the student's RoIs in the student's box coding: class count and box-coder weights must agree."""
    t_classes = teacher.roi_heads.box_predictor.cls_score.out_features
    if t_classes != student.num_classes:
        raise ConfigError(f"The teacher {name} predicts {t_classes} classes (background included) and the student "
                          f'{student.num_classes}: give a teacher of these classes, or let the trainer fit one.')
    t_w, s_w = teacher.roi_heads.box_coder.weights, student.detector.roi_heads.box_coder.weights
    if tuple(t_w) != tuple(s_w):
        raise ConfigError(f'The teacher {name} codes boxes with weights {tuple(t_w)} and the student with '
                          f'{tuple(s_w)}: their box deltas cannot be compared.')


@torch.no_grad()
def teacher_on_rois(teacher: FasterRCNN, images: torch.Tensor, proposals: List[torch.Tensor],
                    image_sizes: List[Tuple[int, int]]) -> Tuple[torch.Tensor, ...]:
    """The teacher's class scores [R, K + 1], box deltas [R, 4 (K + 1)], pooled RoI features and box features for
    the student's sampled RoIs, row for row: its backbone on the student's resized batch (`images`, normalised as the
    teacher expects), then its RoI pooling, box head and predictor on the same proposals."""
    rh = teacher.roi_heads
    pooled = rh.box_roi_pool(teacher.backbone(images), proposals, image_sizes)
    features = rh.box_head(pooled)
    return (*rh.box_predictor(features), pooled, features)


def det_settings(cfg: DictConfig, kwargs: DictConfig, key: str) -> DictConfig:
    """The `det` section with a detector's own `kwargs` (model.kwargs, teacher.kwargs) over it: how a teacher gets
    a wider FPN or box head than its student."""
    extra = OmegaConf.to_container(kwargs, resolve=True)
    unknown = sorted(set(extra) - set(cfg.det))
    if unknown:
        raise ConfigError(f'{key} has {unknown}, which are not detector settings: with task detection it may set any '
                          f"of the det section's keys ({', '.join(cfg.det)}).")
    return OmegaConf.merge(cfg.det, extra)
