"""Every reference into this repository that the docs, docstrings, comments and recipes make still points at
something: paths exist, `file.py::name` names a function or class in that file, `shake_vit.module.name` imports."""
import importlib
import re

import pytest
from helpers import ROOT

TOP = ('configs', 'docs', 'shake_vit', 'tests', 'benchmarks', '.ci')
PATH = re.compile(r'(?<![\w/.-])((?:' + '|'.join(re.escape(t) for t in TOP) + r')/[\w./-]*\w)')
DEFINED_IN = re.compile(r'(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)::(\w+)')
DOTTED = re.compile(r'(?<![\w.])shake_vit((?:\.\w+)+)')
GENERATED = {'benchmarks/out'}  # written by the scripts, not kept in the repository


def sources():
    """Every text file the repository keeps that a reader is pointed from."""
    patterns = ('README.md', 'train.py', 'requirements*.txt', 'pyproject.toml', '.ci/run', 'docs/**/*.md',
                'configs/*.yaml', 'shake_vit/**/*.py', 'benchmarks/*.py', 'benchmarks/*.sh', 'tests/*.py')
    return sorted({p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file()})


def placeholder(path: str) -> bool:
    """`configs/NAME.yaml`, `configs/cifar100_RECIPE.yaml`: a name the reader fills in (a word in capitals)."""
    return re.search(r'(^|[_/.-])[A-Z]{3,}([_/.-]|$)', path) is not None


def matches(pattern, text: str):
    """The pattern's matches in `text`, but for a family named with a wildcard (`configs/cifar100_*.yaml`)."""
    return [m for m in pattern.finditer(text) if text[m.end():m.end() + 1] != '*']


def references(pattern):
    for source in sources():
        if source.name != 'test_docs.py':
            for match in matches(pattern, source.read_text()):
                yield source.relative_to(ROOT), match


def test_every_repository_path_named_in_the_docs_exists():
    missing = [f'{source}: {m.group(1)}' for source, m in references(PATH)
               if not placeholder(m.group(1)) and m.group(1).rstrip('.') not in GENERATED
               and not (ROOT / m.group(1).rstrip('.')).exists()]
    assert not missing, missing


def test_every_file_and_name_reference_is_defined_there():
    """References as docs/reliability.md writes them: `test_x.py::test_y`, `shake_vit/core/checkpoint.py::fault_hook`.
    """
    wrong = []
    for source, m in references(DEFINED_IN):
        file, name = m.group(1), m.group(2)
        candidates = [ROOT / file, ROOT / 'tests' / file]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None or not re.search(rf'^\s*(def|class) {name}\b|^{name} = ', found.read_text(), re.M):
            wrong.append(f'{source}: {file}::{name}')
    assert not wrong, wrong


def unresolved(dotted: str) -> str:
    """Why `shake_vit<dotted>` does not name what it says ('' when it does): the longest importable module prefix,
    then attributes; a function or class must be named where it is defined, not where it is imported."""
    parts = dotted.strip('.').split('.')
    module, attrs = 'shake_vit', parts
    while attrs:
        try:
            importlib.import_module(f'{module}.{attrs[0]}')
            module, attrs = f'{module}.{attrs[0]}', attrs[1:]
        except ModuleNotFoundError:
            break
    obj = importlib.import_module(module)
    for attr in attrs:
        if not hasattr(obj, attr):
            return f'{module} has no {attr}'
        obj = getattr(obj, attr)
    defined = getattr(obj, '__module__', None)
    if attrs and isinstance(defined, str) and defined != module:
        return f'defined in {defined}'
    return ''


def test_every_dotted_shake_vit_name_resolves():
    wrong = [f'{source}: shake_vit{m.group(1)} ({why})' for source, m in references(DOTTED)
             if (why := unresolved(m.group(1)))]
    assert not wrong, wrong
    # The check can fail: a name imported into a module is not defined there.
    assert unresolved('.core.runner.make_accelerator') == 'defined in shake_vit.core.build'
    assert unresolved('.core.runner.nothing')


@pytest.mark.parametrize('text, expected', [
    ('see docs/nowhere.md and configs/NAME.yaml, configs/cifar100_RECIPE.yaml or configs/cifar100_*.yaml',
     ['docs/nowhere.md']),
    ('(tests/test_ablation.py) e.g. `train.py --config configs/quickstart.yaml`.', ['tests/test_ablation.py',
                                                                                    'configs/quickstart.yaml']),
])
def test_the_path_pattern_finds_what_a_reader_would_follow(text, expected):
    """The checks above can fail: the pattern picks paths out of prose (placeholders are left to the reader)."""
    assert [m.group(1).rstrip('.') for m in matches(PATH, text) if not placeholder(m.group(1))] == expected
