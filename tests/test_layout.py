"""The package's shape holds: every recipe resolves as it did before the move into packages (a snapshot of
`--print-config`), the layers import only downward, nothing outside a family package branches on the family, and no
source file outgrows 400 lines."""
import ast
import contextlib
import io
from pathlib import Path

import pytest
from helpers import ROOT

import train
from shake_vit.core.config import load_config

SNAPSHOTS = ROOT / 'tests' / 'snapshots' / 'print_config'
RECIPES = sorted(p.stem for p in (ROOT / 'configs').glob('*.yaml') if not p.name.startswith('smoke'))
EMBEDDED = ('digits', 'digit_scenes')  # data sets every machine has: their derived values are compared too


def test_every_recipe_has_a_snapshot():
    assert sorted(p.stem for p in SNAPSHOTS.glob('*.txt')) == RECIPES


@pytest.mark.parametrize('recipe', RECIPES)
def test_print_config_is_unchanged_since_the_snapshot(recipe):
    """The snapshot was taken with `python train.py --config configs/RECIPE.yaml --print-config` before the package
    moved. The resolved YAML and the method line must match exactly; the data and derived lines only for the
    embedded data sets (elsewhere they say where this machine's data is missing)."""
    cfg = load_config([str(ROOT / 'configs' / f'{recipe}.yaml')])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.print_config(cfg)
    keep = (lambda line: True) if cfg.data.name in EMBEDDED else (
        lambda line: not line.startswith(('# data:', '# derived:')))
    got = [line for line in out.getvalue().splitlines() if keep(line)]
    want = [line for line in (SNAPSHOTS / f'{recipe}.txt').read_text().splitlines() if keep(line)]
    assert got == want


# --- the layering: shake_vit.LAYERS, read from the code's own imports ---------------------------------------------

PACKAGE = ROOT / 'shake_vit'
FAMILY_PACKAGES = ('classification', 'detection')
MAX_LINES = 400
LONGER = {}  # path: why a source file may exceed MAX_LINES (none today)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _resolve(name: str) -> str:
    """The module a dotted import name lands on: a module file, else the package's __init__."""
    while name:
        path = ROOT.joinpath(*name.split('.'))
        if path.with_suffix('.py').is_file() or (path / '__init__.py').is_file():
            return name
        name = name.rpartition('.')[0]
    return name


def _imports(path: Path):
    """(line, module) for every import of a shake_vit module in `path`, function-level ones included."""
    me = _module_name(path)
    package = me if path.name == '__init__.py' else me.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f'{base}.{a.name}' for a in node.names]  # a submodule, or a name in `base`
        else:
            continue
        for name in names:
            if name.split('.')[0] == 'shake_vit':
                yield node.lineno, _resolve(name)


def _layer(module: str):
    """The index in shake_vit.LAYERS of a module's package; None for the package root."""
    import shake_vit
    parts = module.split('.')
    if len(parts) < 2:
        return None
    return next(i for i, group in enumerate(shake_vit.LAYERS) if parts[1] in group)


def _sources():
    return sorted(PACKAGE.rglob('*.py'))


def test_every_package_is_in_a_layer():
    import shake_vit
    named = {p for group in shake_vit.LAYERS for p in group}
    assert {p.parent.name for p in PACKAGE.glob('*/__init__.py')} == named
    assert [p.name for p in PACKAGE.glob('*.py')] == ['__init__.py']  # every module lives in a layer's package


def test_imports_run_down_the_layers_only():
    """A package imports its own modules and the packages of lower layers: never a higher layer, never a package of
    its own layer (classification and detection know nothing of each other)."""
    wrong = []
    for path in _sources():
        me = _module_name(path)
        mine = _layer(me)
        if mine is None:  # the package root assembles everything
            continue
        for line, target in _imports(path):
            theirs = _layer(target)
            same_package = target.split('.')[:2] == me.split('.')[:2]
            if not same_package and (theirs is None or theirs >= mine):
                wrong.append(f'{path.relative_to(ROOT)}:{line} imports {target}')
    assert not wrong, '\n'.join(wrong)


def test_no_import_cycles():
    """No module imports, directly or through others, a module that imports it (lazy imports included)."""
    graph = {}
    for path in _sources():
        me = _module_name(path)
        graph[me] = {t for _, t in _imports(path) if t != me and not me.startswith(t + '.')}
    # a package's __init__ pulling in its own modules is how a package assembles, not a cycle through it
    cycles, index, low, stack, on, counter = [], {}, {}, [], set(), [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))
    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def _task_branches(path: Path):
    """Lines comparing with a family's name (`cfg.task == 'detection'`, `task in ('classification', ...)`); a
    comparison with a registered family held in a variable (the config's dispatch of checks) names none."""
    def names(node):
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(isinstance(i, ast.Constant) and i.value in FAMILY_PACKAGES for i in items)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(names(s) for s in [node.left, *node.comparators]):
            yield node.lineno


def test_no_branch_on_the_task_family_outside_the_family_packages():
    """What differs per family is a Family hook; the spine, the shared parts and the entry point never ask which."""
    outside = [p for p in _sources() if not any(part in FAMILY_PACKAGES for part in p.relative_to(PACKAGE).parts)]
    wrong = [f'{p.relative_to(ROOT)}:{line}' for p in [*outside, ROOT / 'train.py'] for line in _task_branches(p)]
    assert not wrong, wrong


def test_no_source_file_is_over_400_lines():
    files = [p for p in ROOT.rglob('*.py') if not {'runs', '.git'} & set(p.relative_to(ROOT).parts)]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES
            and str(p.relative_to(ROOT)) not in LONGER}
    assert not long, long
