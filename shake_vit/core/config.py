"""The configuration engine: the typed schema assembled from its sections, YAML recipes, `section.key=value`
overrides, validation and the values that follow from a config.

Each package declares the sections it reads and registers them here (`register_section`): the spine's in
shake_vit/core/schema.py, the distillation parts' in shake_vit/distill/schema.py, each family's own in its package
(`aug` in classification/config.py, `det` in detection/config.py). A key one family alone reads says so in its
field (`key(..., family=...)`); set away from its default under the other family's task, it is refused. The value
checks sit beside their sections (`register_check`). The defaults are the DeiT ImageNet recipe with SHAKE (what
`configs/deit_tiny_shake_in1k.yaml` runs); a recipe YAML holds only its deltas. Unknown keys and wrong types are errors
that name the key and the nearest valid one.
"""
import dataclasses
import difflib
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

CLASSIFICATION, DETECTION = 'classification', 'detection'  # the families a key can belong to (`key(family=...)`)


class ConfigError(ValueError):
    """A configuration value the trainer cannot run with; the message says which and how to fix it."""


def key(default: Any = dataclasses.MISSING, *, factory: Optional[Callable[[], Any]] = None,
        choices: Optional[Sequence[Any]] = None, family: Optional[str] = None, instead: Optional[str] = None):
    """A schema field with what validation needs to know about it: its allowed values (`choices`), the one family
    that reads it (`family`; elsewhere it must keep its default) and what that other family uses in its place."""
    meta = {name: value for name, value in (('choices', choices), ('family', family), ('instead', instead))
            if value is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# the sections, in the order the config prints: (name, type, field); filled by the packages as they are imported
_SECTIONS: List[tuple] = []
_CHECKS: List[tuple] = []  # (family or None for every task, check)
_SCHEMA: Dict[int, type] = {}


def register_section(name: str, kind: Any, default: Any, after: Optional[str] = None, family: Optional[str] = None):
    """Add section `name` (a dataclass, or a plain type with its default) to the schema, after section `after`;
    `family`: the one family that reads it."""
    entry = (name, kind, field(default_factory=default, metadata={'family': family} if family else {})
             if callable(default) else field(default=default))
    names = [n for n, _, _ in _SECTIONS]
    _SECTIONS.insert(names.index(after) + 1 if after in names else len(names), entry)
    _SCHEMA.clear()


def register_check(check: Callable[[DictConfig], None] = None, family: Optional[str] = None):
    """A value check that types alone cannot express, for every task or for `family`'s; it raises ConfigError naming
    the key and the fix. A decorator, with or without `family=`."""
    if check is None:
        return lambda fn: register_check(fn, family)
    _CHECKS.append((family, check))
    return check


def schema() -> type:
    """The root dataclass of every registered section (built once per set of sections), importable as
    `shake_vit.core.config.Config`, so that a config pickles (spawned workers, torch.save)."""
    if not _SCHEMA:
        root = dataclasses.make_dataclass('Config', _SECTIONS)
        root.__module__ = __name__  # (make_dataclass's `module=` needs Python 3.12)
        _SCHEMA[0] = root
    return _SCHEMA[0]


def __getattr__(name: str) -> Any:
    if name == 'Config':  # built from the sections registered by the time it is asked for
        return schema()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def _all_keys(node: Any, prefix: str = '') -> List[str]:
    keys = []
    for k, v in node.items():
        full = f'{prefix}{k}'
        keys.append(full)
        if isinstance(v, DictConfig) and OmegaConf.get_type(v) not in (dict, None):
            keys.extend(_all_keys(v, full + '.'))
    return keys


def _explain(err: OmegaConfBaseException, base: DictConfig, source: str) -> ConfigError:
    key = getattr(err, 'full_key', None) or getattr(err, 'key', None) or '?'
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        close = difflib.get_close_matches(str(key), _all_keys(base), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ' `python train.py --print-config` lists every key.'
        return ConfigError(f"Unknown config key '{key}' (from {source}).{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"Bad value for '{key}' (from {source}): {msg}.")
    return ConfigError(f'Could not read the configuration from {source}: {str(err).splitlines()[0]}')


def _recipe_chain(path: Path, seen: Sequence[Path] = (), first: bool = False) -> List[tuple]:
    """A recipe and the recipes it builds on, base first: a top-level `_base_: other.yaml` (relative to the file)
    lets a recipe hold only its deltas from another recipe. A file marked `_add_on_: RECIPE` (the smoke overlays) is
    refused as the `first` file: it completes a recipe."""
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist. Recipes live in configs/, e.g. "
                          'configs/quickstart.yaml.')
    if path.resolve() in seen:
        raise ConfigError(f"Config file '{path}' includes itself through _base_.")
    try:
        recipe = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come from the yaml package
        raise ConfigError(f"Could not parse '{path}': {str(err).splitlines()[0]}") from None
    base = recipe.pop('_base_', None) if isinstance(recipe, DictConfig) else None
    add_on = recipe.pop('_add_on_', None) if isinstance(recipe, DictConfig) else None
    if add_on and not seen and first:  # an overlay given where a recipe belongs
        raise ConfigError(f"'{path}' is an add-on to a recipe, not a recipe of its own: give a recipe before it, as "
                          f'in --config {add_on} --config {path}.')
    chain = _recipe_chain(path.parent / base, [*seen, path.resolve()]) if base else []
    return [*chain, (path, recipe)]


def _free_form_keys(cfg: DictConfig, node: Any = None, prefix: str = '') -> List[str]:
    """The dotted keys of the free-form dicts (timm keyword arguments), where any key is allowed."""
    found = []
    for k, v in (cfg if node is None else node).items():
        if isinstance(v, DictConfig):
            found += [f'{prefix}{k}'] if OmegaConf.get_type(v) is dict else _free_form_keys(cfg, v, f'{prefix}{k}.')
        elif isinstance(v, ListConfig):
            for i, item in enumerate(v):
                if isinstance(item, DictConfig):
                    found += _free_form_keys(cfg, item, f'{prefix}{k}.{i}.')
    return found


def _open_free_form(cfg: DictConfig) -> None:
    """Let the free-form dicts take new keys; a node replaced by a merge or an update inherits struct mode again."""
    for key in _free_form_keys(cfg):
        OmegaConf.set_struct(OmegaConf.select(cfg, key), False)


def _empty_dicts(node: Any, prefix: str = '') -> List[str]:
    """Dotted keys of a recipe layer whose value is `{}`."""
    found = []
    for k, v in node.items() if isinstance(node, DictConfig) else ():
        if isinstance(v, DictConfig):
            found += [f'{prefix}{k}'] if len(v) == 0 else _empty_dicts(v, f'{prefix}{k}.')
    return found


def _clear(cfg: DictConfig, key: str) -> None:
    """`{}` empties a free-form dict (`model.kwargs: {}` in a recipe, `model.kwargs={}` on the command line); on a
    typed section (`aug: {}`) it changes nothing, as merging nothing would."""
    if key in _free_form_keys(cfg):
        OmegaConf.update(cfg, key, {}, merge=False)


def load_config(paths: Union[None, str, Sequence[str]] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then each recipe in `paths` in order (e.g. a recipe, then `configs/smoke.yaml`), then
    `section.key=value` overrides; validated.

    A dict merges into what is there, key by key, except `{}`, which empties a free-form dict (`model.kwargs`,
    `teacher.kwargs`), in a recipe and on the command line alike: how a recipe's ViT arguments go when the student
    becomes a CNN. Dotted keys reach into a free-form dict (`model.kwargs.img_size=32`) whatever came before.
    """
    cfg = OmegaConf.structured(schema())
    OmegaConf.set_struct(cfg, True)
    _open_free_form(cfg)
    for index, path in enumerate([paths] if isinstance(paths, str) else (paths or [])):
        for source, layer in _recipe_chain(Path(path), first=index == 0):
            try:
                cfg = OmegaConf.merge(cfg, layer)
                _open_free_form(cfg)
                for key in _empty_dicts(layer):
                    _clear(cfg, key)
            except OmegaConfBaseException as err:
                raise _explain(err, cfg, str(source)) from None
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f"Override '{item}' is not of the form section.key=value (e.g. train.epochs=10).")
        key = item.split('=', 1)[0]
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)  # the value, typed by OmegaConf's grammar
            if isinstance(value, (dict, DictConfig)) and len(value) == 0:
                _clear(cfg, key)
            else:  # merge=True handles list indices (extra_teachers.0.checkpoint=...) and adds to a dict
                OmegaConf.update(cfg, key, value, merge=True)
            _open_free_form(cfg)
        except OmegaConfBaseException as err:
            raise _explain(err, cfg, f"override '{item}'") from None
    if cfg.train.mixed_precision in ('False', 'false', 'off'):  # YAML and the command line read a bare `no` as false
        cfg.train.mixed_precision = 'no'
    validate(cfg)
    return cfg


def require(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' is {value!r}; it must be {need}.")


def _fields(kind: type, prefix: str):
    """(dotted key, dataclass field) of every field under a dataclass, its nested sections included."""
    for f in dataclasses.fields(kind):
        yield f'{prefix}{f.name}', f
        if dataclasses.is_dataclass(f.type):
            yield from _fields(f.type, f'{prefix}{f.name}.')


def check_choice(cfg: DictConfig, key: str, choices: Sequence[Any], task: str = '') -> None:
    """`key` must hold one of `choices`; the error lists them and the nearest."""
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        named = [str(c) for c in choices if c is not None] + (['null'] if None in choices else [])
        close = difflib.get_close_matches(str(value), named, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        raise ConfigError(f"'{key}' is {value!r}; choose one of {', '.join(named)}{task}.{hint}")


def _leaves(node: Any, prefix: str) -> Dict[str, Any]:
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None):
        return {k: v for key in node for k, v in _leaves(node[key], f'{prefix}.{key}').items()}
    return {prefix: OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node}


def _check_family_keys(cfg: DictConfig) -> None:
    """Refuse another family's settings when they differ from their defaults: they would be ignored without a word."""
    defaults = OmegaConf.structured(schema())
    changed = {}  # key -> (its family, what this task uses instead)
    for top, f in _fields(schema(), ''):
        owner = f.metadata.get('family')
        if owner in (None, cfg.task) or any(top.startswith(k + '.') for k in changed):
            continue
        for k, value in _leaves(OmegaConf.select(cfg, top), top).items():
            if value != _leaves(OmegaConf.select(defaults, k), k)[k]:
                inner = dict(_fields(schema(), '')).get(k)
                changed[k] = (owner, (inner or f).metadata.get('instead'))
    if changed:
        keys = list(changed)
        hints = ''.join(f' ({k}: use {instead})' for k, (_, instead) in changed.items() if instead)
        kind, one = changed[keys[0]][0], len(keys) == 1
        raise ConfigError(f"{', '.join(keys[:6])} {'is a' if one else 'are'} {kind} setting{'' if one else 's'}, "
                          f'which task {cfg.task} does not use: remove {"it" if one else "them"}{hints}.')


def validate(cfg: DictConfig) -> None:
    """The checks types alone cannot express, every package's (`register_check`); each failure names the key and the
    fix."""
    for k, f in _fields(schema(), ''):
        if 'choices' in f.metadata:
            check_choice(cfg, k, f.metadata['choices'])
    for family, check in _CHECKS:
        if family is None:
            check(cfg)
    _check_family_keys(cfg)
    for family, check in _CHECKS:
        if family == cfg.task:
            check(cfg)


def save_config(cfg: DictConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def flat_hparams(cfg: DictConfig) -> Dict[str, Any]:
    """`section.key -> value` with only bool/str/int/float values, as the TensorBoard tracker requires."""
    flat = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f'{prefix}{k}.')
            elif isinstance(v, (bool, str, int, float)):
                flat[f'{prefix}{k}'] = v
            else:  # None, lists
                flat[f'{prefix}{k}'] = str(v)

    walk(OmegaConf.to_container(cfg, resolve=True), '')
    return flat
