"""`train.py --export` for a detection student: the torchvision detector alone, with the lines that load it."""
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from ..core.config import ConfigError
from . import data
from .models import SMALL, det_settings


def check_request(head: Optional[str], fmt: str) -> None:
    """What a detection export can be, refused before any weights are read."""
    if fmt != 'timm':
        raise ConfigError(f'--export-format {fmt} is for classification students; a detection student exports '
                          "torchvision's state dict (drop --export-format).")
    if head not in (None, 'cls'):
        raise ConfigError("--export-head: a detection student exports its own box predictor; the shadow predictor "
                          'is not part of the model (drop --export-head).')


def export(family, student, where: Path, cfg: DictConfig, out_dir: Optional[str]) -> Path:
    """The student detector alone (its shadow predictors dropped): `model.safetensors` of a torchvision
    `FasterRCNN`, `detector.json` with what builds it, and the torchvision lines that load it, run here to check
    that the reloaded detector reproduces the student's detections."""
    detector = student.detector.eval()
    num_classes = detector.roi_heads.box_predictor.cls_score.out_features
    out = Path(out_dir or where / 'export_detector')
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in detector.state_dict().items()}, str(out / 'model.safetensors'))
    det = det_settings(cfg, cfg.model.kwargs, 'model.kwargs')
    (out / 'detector.json').write_text(json.dumps({'architecture': cfg.model.name, 'num_classes': num_classes,
                                                   'det': OmegaConf.to_container(det)}, indent=2))
    (out / 'config.yaml').write_text(OmegaConf.to_yaml(cfg))
    code = loading_code(cfg.model.name, num_classes, det, out / 'model.safetensors')
    scope: Dict[str, Any] = {}
    exec(code, scope)  # the printed lines, run: they must rebuild the student's detector
    images = [data.build_transforms(cfg)[1](*family.build_splits(cfg).val[i])[0] for i in range(2)]
    with torch.no_grad():  # every output of the box predictor on the same proposals, and the detections
        expected, got = detector(images), scope['model'].eval()(images)
    same = all(a[k].shape == b[k].shape and torch.allclose(a[k].float(), b[k].float(), atol=1e-4)
               for a, b in zip(expected, got) for k in ('boxes', 'scores', 'labels'))
    same = same and torch.equal(detector.rpn.anchor_generator.cell_anchors[0],
                                scope['model'].rpn.anchor_generator.cell_anchors[0])
    if not same:
        raise RuntimeError('The exported detector differs from the student; please report this.')
    print(f'[shake-vit] exported the student detector to {out} (shadow predictor dropped). Load it with '
          f'torchvision alone:\n{code}')
    return out


def loading_code(name: str, num_classes: int, det: DictConfig, path: Path) -> str:
    """The torchvision lines that build detector `name` as trained here and load its exported weights."""
    common = (f'min_size={det.min_size}, max_size={det.max_size}, rpn_pre_nms_top_n_test={det.rpn_proposals_test}, '
              f'rpn_post_nms_top_n_test={det.rpn_proposals_test}, box_detections_per_img={det.detections_per_image}')
    if name in SMALL:
        sizes = tuple((s,) for s in (det.anchor_sizes or (32, 64, 128, 256)))
        width = 64
        norm = 'torchvision.ops.misc.FrozenBatchNorm2d' if det.backbone_weights else 'None'
        build = (f'from torchvision.models.detection import FasterRCNN\n'
                 f'from torchvision.models.detection.anchor_utils import AnchorGenerator\n'
                 f'from torchvision.models.detection.backbone_utils import BackboneWithFPN\n'
                 f'from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead\n'
                 f'from torchvision.ops import MultiScaleRoIAlign\n'
                 f'body = torchvision.models.{SMALL[name]}(norm_layer={norm})\n'
                 f"backbone = BackboneWithFPN(body, {{'layer2': '0', 'layer3': '1', 'layer4': '2'}}, "
                 f'[{width * 2}, {width * 4}, {width * 8}], {det.fpn_channels})\n'
                 f'model = FasterRCNN(backbone, rpn_anchor_generator=AnchorGenerator({sizes}, '
                 f'((0.5, 1.0, 2.0),) * {len(sizes)}), box_roi_pool=MultiScaleRoIAlign([\'0\', \'1\', \'2\'], 7, 2), '
                 f'box_head=TwoMLPHead({det.fpn_channels} * 7 * 7, {det.box_head_dim}), '
                 f'box_predictor=FastRCNNPredictor({det.box_head_dim}, {num_classes}), {common})\n')
    else:
        build = (f'model = torchvision.models.detection.{name}(weights=None, weights_backbone=None, '
                 f'num_classes={num_classes}, {common})\n')
    # torchvision builds BatchNorm where an ImageNet-initialised backbone trained with FrozenBatchNorm2d, which has no
    # num_batches_tracked: the same numbers in eval mode
    strict = '' if name in SMALL or not det.backbone_weights else ', strict=False'
    return (f'import torchvision\nfrom safetensors.torch import load_file\n{build}'
            f"model.load_state_dict(load_file('{path}'){strict})\nmodel.eval()\n")
