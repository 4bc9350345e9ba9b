"""Export a trained student as a plain timm model: `model.safetensors` + `config.json`, loadable without this package.

Two forms:
    both: the distilled DeiT itself; in eval mode timm averages its two heads (DeiT's inference).
    cls:  SHAKE's deliverable, the classification head alone. The distillation token stays in the sequence (the
          cls token attended to it during training), so the model is a timm `VisionTransformer` with one register
          token in its place: `[cls, reg, patches]` with position embeddings on all of them, the head on cls. Its
          logits are exactly the student's cls-head logits.
"""
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.models import save_for_hf

from ..core.config import ConfigError
from .models import Student, average_heads, build_classifier, build_student, student_kwargs


def registered_here(name: str) -> bool:
    """Whether `name` is an architecture shake_vit adds to timm's registry (shake_vit.zoo), unknown to timm alone."""
    from timm.models import get_arch_name, model_entrypoint
    return model_entrypoint(get_arch_name(name)).__module__.startswith('shake_vit')


def plain_model(cfg: DictConfig, student: Student, head: str) -> nn.Module:
    """The timm model equal to `student` in eval mode (`both`) or to its cls head (`cls`)."""
    kwargs: Dict[str, Any] = dict(student_kwargs(cfg), num_classes=student.num_classes)
    state = student.model.state_dict()
    if student.placement != 'token' or student.num_shadow > 1:
        if head == 'both':
            raise ConfigError('--export-head both exports a distilled DeiT with one shadow head; this student has its '
                              'shadow heads outside timm\'s model. Export the classification head: --export-head cls.')
        if student.placement != 'token':  # the timm classifier itself is SHAKE's deliverable
            model = build_classifier(cfg, student.num_classes, training=False)
            model.load_state_dict(state)
            return model.eval()
    if head == 'both':
        if student.num_shadow == 0:
            raise ConfigError(f"--export-head both averages the distillation head, which loss.method="
                              f"'{cfg.loss.method}' does not train: export the classification head, --export-head cls.")
        if not isinstance(student.model.head_dist, nn.Linear):
            raise ConfigError('The shadow head is an MLP (model.shadow_head=mlp), which plain timm cannot build: '
                              'export the classification head alone with --export-head cls.')
        name = cfg.model.name
    else:
        name = cfg.model.name.replace('_distilled', '')
        if not timm.is_model(name):
            raise ConfigError(f"No single-head timm counterpart of '{cfg.model.name}' (looked for '{name}').")
        kwargs['reg_tokens'] = 1
        state = {('reg_token' if k == 'dist_token' else k): v for k, v in state.items()
                 if not k.startswith('head_dist')}
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(state)
    return model.eval()


def classes_in(weights: Dict[str, torch.Tensor], cfg: DictConfig) -> int:
    """The class count of the saved student: the output rows of its timm classifier, wherever the family keeps it
    (`head` for ViTs, `fc` for ResNets, `classifier` for MobileNets, `head.fc` for VGGs)."""
    probe = build_student(cfg, num_classes=1).model
    classifier = probe.get_classifier()
    classifier = classifier[0] if isinstance(classifier, tuple) else classifier  # a distilled DeiT: (head, head_dist)
    name = {id(p): n for n, p in probe.named_parameters()}[id(classifier.weight)]
    if f'model.{name}' not in weights:
        raise ConfigError(f'The weights hold no {name} for {cfg.model.name}: pass the config they were trained with.')
    return weights[f'model.{name}'].shape[0]


def timm_builds_both(student: Student) -> bool:
    """Whether the student's average of heads is a timm model: a distilled DeiT with one linear shadow head."""
    return student.placement == 'token' and student.num_shadow == 1 and isinstance(student.model.head_dist, nn.Linear)


def export(student: Student, with_shadow: bool, where: Path, cfg: DictConfig, head: Optional[str] = None,
           out_dir: Optional[str] = None, fmt: str = 'timm') -> Path:
    """`train.py --export PATH` for a loaded student (shake_vit/core/runner.py::export): write the plain timm model
    (or, with `fmt='onnx'`, its ONNX graph) beside its weights (`where`) and check it reproduces the student's logits.

    Args:
        with_shadow: whether the weights held the shadow heads.
        head: 'cls' or 'both'; None exports what the student predicts with (`model.predict`, else the method's: the
            cls head for SHAKE, both heads for DeiT's methods), the cls head where plain timm cannot build the average;
            for ONNX, the cls head.
    """
    student.eval()
    num_classes = student.model.num_classes
    if head is None and fmt == 'onnx':
        head = 'cls'  # what is deployed: SHAKE's deliverable; --export-head both for DeiT's two-head average
    if head is None:
        head = 'both' if student.predict == 'avg' and with_shadow and timm_builds_both(student) else 'cls'
        if student.predict == 'avg' and head == 'cls':
            print('[shake-vit] the student predicts with the average of its heads, which plain timm cannot build for '
                  'it: exporting the classification head')
    elif head == 'both' and not with_shadow:
        raise ConfigError(f"--export-head both: the weights in '{where}' hold no shadow head (an export of the cls "
                          'head?): export the classification head, --export-head cls.')
    model = plain_model(cfg, student, head)
    if fmt == 'onnx':
        return export_onnx(model, student, head, cfg, Path(out_dir or where / f'export_{head}_onnx'))
    out = Path(out_dir or where / f'export_{head}')
    if out.exists():
        shutil.rmtree(out)
    data_config = {'interpolation': cfg.aug.interpolation, 'crop_pct': cfg.aug.crop_pct}
    save_for_hf(model, str(out), safe_serialization=True, data_config=data_config)
    (out / 'config.yaml').write_text(OmegaConf.to_yaml(cfg))  # the training config, for `train.py --eval`

    # The export must reproduce the trainer's eval model: reload it the way users will and compare.
    if cfg.model.cifar_stem:  # timm's config.json names the architecture, whose ImageNet form timm would build
        from safetensors.torch import load_file
        reloaded = build_classifier(cfg, num_classes, training=False)
        reloaded.load_state_dict(load_file(str(out / 'model.safetensors')))
        reloaded.eval()
        how = ('shake_vit, since timm alone builds the ImageNet form of the architecture, not this CIFAR form:\n'
               '    from shake_vit.classification.models import cifar_stem\n'
               f"    model = cifar_stem(timm.create_model('{cfg.model.name}', num_classes={num_classes}))\n"
               f"    model.load_state_dict(safetensors.torch.load_file('{out / 'model.safetensors'}'))\n"
               f'or evaluate it with: python train.py --eval {out}')
    else:
        reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
        how = (f'timm once shake_vit has registered {cfg.model.name} in it (import shake_vit first)'
               if registered_here(cfg.model.name) else 'timm alone')
        how += f":\n    timm.create_model('local-dir:{out}', pretrained=True)"
    x = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size)
    with torch.no_grad():
        s, hs = student.forward_heads(x)
        expected = average_heads(s, hs) if head == 'both' else s
        diff = (reloaded(x) - expected).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f'The exported model differs from the student by {diff:.2e}; please report this.')
    what = 'timm classifier' if student.placement != 'token' else 'two-head DeiT' if head == 'both' else \
        'cls-head ViT'
    print(f'[shake-vit] exported the {what} to {out} (max logit difference to the student {diff:.1e}). Load it with '
          f'{how}')
    return out


def export_onnx(model: nn.Module, student: Student, head: str, cfg: DictConfig, out: Path) -> Path:
    """`model` (the plain timm model of `head`) as OUT/model.onnx with a dynamic batch size, through torch.onnx's
    TorchScript exporter (the dynamo exporter needs onnxscript and fails on some timm blocks); checked against the
    student's logits with onnxruntime, at another batch size than the export's, when onnxruntime is installed."""
    import importlib.util
    import warnings
    if importlib.util.find_spec('onnx') is None:  # torch's exporter needs it, and says only "not installed"
        raise ConfigError('--export-format onnx needs the onnx package, which the trainer\'s requirements leave out: '
                          'pip install onnx onnxruntime (the versions in requirements-test.txt), or export in '
                          "timm's format (drop --export-format).")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    size = cfg.data.img_size
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # the exporter's deprecation and tracer notices
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(out / 'model.onnx'), input_names=['input'],
                          output_names=['logits'], dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}},
                          opset_version=17, dynamo=False)
    (out / 'config.yaml').write_text(OmegaConf.to_yaml(cfg))
    try:
        import onnxruntime
    except ImportError:
        print(f'[shake-vit] exported {out / "model.onnx"} (input [batch, 3, {size}, {size}], normalised with '
              f'mean {list(cfg.data.mean or model.pretrained_cfg["mean"])}); not checked: onnxruntime is not '
              'installed (pip install onnxruntime)')
        return out
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        s, hs = student.forward_heads(x)
        expected = average_heads(s, hs) if head == 'both' else s
    session = onnxruntime.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    got = torch.from_numpy(session.run(None, {'input': x.numpy()})[0])
    diff = (got - expected).abs().max().item()
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):  # onnxruntime's kernels sum in another order
        raise RuntimeError(f'The ONNX model differs from the student by {diff:.2e}; please report this.')
    print(f'[shake-vit] exported the {"cls head" if head == "cls" else "two-head average"} to {out / "model.onnx"} '
          f'(dynamic batch; onnxruntime at batch 3 matches the student to {diff:.1e}). Load it with:\n'
          f"    onnxruntime.InferenceSession('{out / 'model.onnx'}').run(None, {{'input': images}})  "
          f'# images: float32 [batch, 3, {size}, {size}], normalised as in training')
    return out
