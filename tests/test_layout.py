"""The package's shape holds: every recipe resolves as it did before the move into packages (a snapshot of
`--print-config`), the layers import only downward, nothing outside a family package branches on the family, and no
source file outgrows 400 lines."""
import contextlib
import io

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
