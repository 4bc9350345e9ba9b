"""Teachers that map to your classes by name: the class names a teacher predicts, and the columns of its logits that
are the data's classes, in the data's order (`teacher.class_map`).

A teacher's class names come from, in this order: `teacher.class_names` (a text file, one name per line, or a JSON
list); the `classes` a `.safetensors` file this trainer wrote records; timm's ImageNet label names (WordNet ids, with
their descriptions) for a teacher with an ImageNet head. `teacher.class_map=auto` matches each data class to a teacher
class by name: the WordNet id, or any comma-separated part of its description ('tench, Tinca tinca'), ignoring case,
'_' and '-'. `teacher.class_map=FILE` (YAML or JSON, `data class: teacher class`) renames first; unnamed classes are
matched as by `auto`.
"""
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch.nn as nn
import yaml
from omegaconf import DictConfig
from safetensors import safe_open

from ..core.config import ConfigError


def _norm(name: str) -> str:
    return ' '.join(str(name).lower().replace('_', ' ').replace('-', ' ').split())


def recorded_classes(path: Optional[str]) -> Optional[List[str]]:
    """The class names a `.safetensors` teacher file records (this trainer writes them when it fits a teacher)."""
    if not path or not str(path).endswith('.safetensors') or not Path(path).is_file():
        return None
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata() or {}
    return json.loads(meta['classes']) if 'classes' in meta else None


def _read_names(path: str) -> List[str]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"teacher.class_names='{path}' is not a file: give a text file with one class name per line "
                          '(in the order of the teacher\'s outputs) or a JSON list.')
    text = file.read_text()
    names = json.loads(text) if file.suffix == '.json' else [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list):
        raise ConfigError(f"teacher.class_names='{path}' must hold a list of names.")
    return [str(n) for n in names]


def imagenet_info(model: nn.Module):
    """timm's ImageNetInfo for a model with an ImageNet-1k/22k head, else None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset(model)
    return ImageNetInfo(subset) if subset else None


def teacher_names(t: DictConfig, model: nn.Module, path: Optional[str]) -> Optional[Dict[str, List[str]]]:
    """{'names': the teacher's class names in output order, 'aliases': per class, other names it answers to}, or
    None when they are unknown."""
    num = model.num_classes if hasattr(model, 'num_classes') else None
    if t.class_names:
        names = _read_names(t.class_names)
        source = f'teacher.class_names ({t.class_names})'
    else:
        names, source = recorded_classes(path), f'recorded in {path}'
    aliases = [[] for _ in names] if names else None
    if names is None:
        info = imagenet_info(model)
        if info is None:
            return None
        names = list(info.label_names())
        aliases = [d.split(',') for d in info.label_descriptions()]
        source = f"timm's {info.num_classes()}-class ImageNet labels" + (
            '' if path is None else f', assumed for {path} from its head size; set teacher.class_names if it is not')
    if num is not None and len(names) != num:
        raise ConfigError(f'The teacher predicts {num} classes but its class names ({source}) list {len(names)}: '
                          'give one name per output, in output order.')
    return {'names': names, 'aliases': aliases, 'source': source}


def resolve(class_map: str, known: Dict[str, List[str]], classes: Sequence[str]) -> List[int]:
    """For each data class, in order, the index of the teacher output that is that class (`class_map`: 'auto' or a
    renaming file). An error lists the data classes that match nothing."""
    renames: Dict[str, str] = {}
    if class_map != 'auto':
        file = Path(class_map)
        if not file.is_file():
            raise ConfigError(f"teacher.class_map='{class_map}' is neither 'auto' nor a file: use auto (match by name) "
                              'or a YAML/JSON file of `data class: teacher class` lines.')
        loaded = yaml.load(file.read_text(), Loader=yaml.BaseLoader) or {}  # every key a string ('007', 'no')
        if not isinstance(loaded, dict):
            raise ConfigError(f"teacher.class_map='{class_map}' must map data class names to teacher class names.")
        renames = {str(k): str(v) for k, v in loaded.items()}
    lookup: Dict[str, int] = {}
    for i, name in enumerate(known['names']):  # names first: they win over any description
        lookup.setdefault(_norm(name), i)
    shared: Dict[str, List[int]] = {}
    for i, more in enumerate(known['aliases']):
        for key in map(_norm, more):
            if key not in lookup:
                shared.setdefault(key, []).append(i)
    for key, where in shared.items():
        lookup[key] = where[0] if len(set(where)) == 1 else -1  # -1: a description that several classes share
    index, missing, ambiguous = [], [], []
    for c in classes:
        i = lookup.get(_norm(renames.get(c, c)))
        if i is None:
            missing.append(c if c not in renames else f'{c} (as {renames[c]})')
        elif i < 0:
            ids = sorted(set(shared[_norm(renames.get(c, c))]))
            ambiguous.append(f"{c} ({', '.join(known['names'][j] for j in ids)})")
        index.append(i)
    if ambiguous:
        raise ConfigError(f"teacher.class_map={class_map}: {', '.join(ambiguous[:10])} name several teacher classes "
                          "(timm's descriptions share them): name the one you mean by its id in a class-map file.")
    if missing:
        sample = ', '.join(known['names'][:5])
        raise ConfigError(f'teacher.class_map={class_map}: {len(missing)} of the data\'s {len(classes)} classes match '
                          f"no teacher class ({known['source']}, e.g. {sample}): {', '.join(missing[:20])}"
                          + (' ...' if len(missing) > 20 else '') + '. Rename them in a class-map file '
                          '(`data class: teacher class` per line) or fit a teacher on your classes (drop '
                          'teacher.checkpoint and teacher.pretrained).')
    if len(set(index)) != len(index):
        dup = [c for c, i in zip(classes, index) if index.count(i) > 1]
        raise ConfigError(f'teacher.class_map={class_map}: several data classes map to one teacher class: '
                          f"{', '.join(dup[:10])}. Each data class needs its own teacher class.")
    return index


def order_finding(known: Optional[Dict[str, List[str]]], classes: Sequence[str]) -> Optional[dict]:
    """The class-order check of a teacher used without a map: None when its names are unknown or equal the data's,
    else {'status', 'seen'}: 'failed' when they are the data's classes in another order, 'warning' when they differ."""
    if known is None:
        return None
    names = [str(n) for n in known['names']]
    if names == list(classes):
        return None
    if [_norm(n) for n in names] == [_norm(c) for c in classes]:  # the same names, written otherwise
        return None
    if sorted(map(_norm, names)) == sorted(map(_norm, classes)):
        first = next(i for i, (a, b) in enumerate(zip(names, classes)) if _norm(a) != _norm(b))
        return {'status': 'failed', 'seen': f"the teacher's classes ({known['source']}) are the data's in another "
                f"order: its output {first} is '{names[first]}', the data's class {first} is '{classes[first]}'"}
    overlap = len(set(map(_norm, names)) & set(map(_norm, classes)))
    return {'status': 'warning', 'seen': f"the teacher's class names ({known['source']}, e.g. "
            f"{', '.join(names[:3])}) differ from the data's (e.g. {', '.join(list(classes)[:3])}); {overlap} of "
            f'{len(classes)} match by name'}
