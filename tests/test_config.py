"""Typed config: recipes, overrides, errors that name the key, derived values."""
import pytest
import yaml
from helpers import ROOT

from shake_vit.core.config import ConfigError, flat_hparams, load_config
from shake_vit.core.stream import Stream, derive


def test_defaults_are_the_deit_recipe():
    cfg = load_config()
    assert cfg.optim.opt == 'adamw' and cfg.optim.weight_decay == 0.05 and cfg.train.epochs == 300
    assert cfg.aug.auto_augment == 'rand-m9-mstd0.5-inc1' and cfg.aug.re_mode == 'pixel'
    assert cfg.aug.interpolation == 'bicubic' and cfg.aug.crop_pct == 0.875 and cfg.aug.repeated_aug == 3
    assert cfg.loss.method == 'shake'


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(yaml.safe_dump({'train': {'epochs': 7}, 'model': {'kwargs': {'depth': 2}}}))
    cfg = load_config(str(recipe), ['train.epochs=9', 'model.kwargs.embed_dim=48', 'optim.lr=0.002'])
    assert cfg.train.epochs == 9 and cfg.model.kwargs == {'depth': 2, 'embed_dim': 48}
    assert cfg.optim.lr == pytest.approx(0.002)


@pytest.mark.parametrize('override, message', [
    ('train.epoch=3', "Unknown config key 'train.epoch'.*Did you mean 'train.epochs'"),
    ('optimm.lr=1', "Unknown config key 'optimm'"),
    ('train.epochs=abc', "Bad value for 'train.epochs'"),
    ('loss.method=shak', "'loss.method' is 'shak'.*Did you mean 'shake'"),
    ('optim.lr=-1', "'optim.lr' is -1.0; it must be positive"),
    ('train.epochs', 'is not of the form section.key=value'),
])
def test_bad_values_are_errors_that_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_a_recipe_names_the_file(tmp_path):
    recipe = tmp_path / 'bad.yaml'
    recipe.write_text('aug:\n  mixupp: 0.2\n')
    with pytest.raises(ConfigError, match=r"Unknown config key 'aug.mixupp' \(from .*bad.yaml\).*'aug.mixup'"):
        load_config(str(recipe))


def test_odd_batch_with_mixup_is_refused():
    with pytest.raises(ConfigError, match='even when mixup'):
        load_config(None, ['train.batch_size=63'])
    load_config(None, ['train.batch_size=63', 'aug.mixup=0', 'aug.cutmix=0'])


def test_deit_lr_rule_and_update_counts():
    cfg = load_config(None, ['train.batch_size=128', 'train.grad_accum=2', 'optim.warmup_epochs=5',
                             'train.epochs=300'])
    d = derive(cfg, 4, Stream(1_281_167, 3, 0, 128, 1024).updates_per_epoch)  # ImageNet, DeiT's 3 repeats
    assert d.global_batch == 1024 and d.lr == pytest.approx(5e-4 * 1024 / 512)
    # RASampler's epoch: 1,281,024 samples (a multiple of 256), 1,251 whole updates of 1,024
    assert d.updates_per_epoch == 1251 and d.total_updates == 375_300 and d.warmup_updates == 6255
    fixed = derive(load_config(None, ['optim.lr=0.01']), 1, 10)
    assert fixed.lr == 0.01


def test_hparams_for_tensorboard_are_flat_scalars():
    flat = flat_hparams(load_config(None, ['model.kwargs.depth=2']))
    assert flat['model.kwargs.depth'] == 2 and flat['optim.lr'] == 'None'
    assert all(isinstance(v, (bool, str, int, float)) for v in flat.values())


def test_mixed_precision_no_survives_yaml_reading_it_as_false(tmp_path):
    assert load_config(None, ['train.mixed_precision=no']).train.mixed_precision == 'no'
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('train:\n  mixed_precision: no\n')
    assert load_config(str(recipe)).train.mixed_precision == 'no'


def test_a_recipe_builds_on_another_with_base(tmp_path):
    (tmp_path / 'parent.yaml').write_text('train: {epochs: 7, batch_size: 32}\nloss: {method: kd}\n')
    (tmp_path / 'child.yaml').write_text('_base_: parent.yaml\ntrain: {epochs: 9}\n')
    cfg = load_config(str(tmp_path / 'child.yaml'))
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.loss.method) == (9, 32, 'kd')
    (tmp_path / 'loop.yaml').write_text('_base_: loop.yaml\n')
    with pytest.raises(ConfigError, match='includes itself'):
        load_config(str(tmp_path / 'loop.yaml'))


def test_an_empty_dict_override_clears_and_a_dict_override_adds():
    """The quick start's ViT kwargs must go when the student becomes a CNN; `key={a: 1}` adds to what is there."""
    cfg = load_config(str(ROOT / 'configs' / 'quickstart.yaml'), ['model.name=test_resnet', 'model.kwargs={}'])
    assert dict(cfg.model.kwargs) == {}
    cfg = load_config(str(ROOT / 'configs' / 'quickstart.yaml'), ['model.kwargs={qkv_bias: false}'])
    assert cfg.model.kwargs.qkv_bias is False and cfg.model.kwargs.embed_dim == 96


def test_a_dotted_key_reaches_into_a_dict_whatever_came_before():
    quickstart = str(ROOT / 'configs' / 'quickstart.yaml')
    cfg = load_config(quickstart, ['model.kwargs={}', 'model.kwargs.img_size=32', 'teacher.kwargs={}',
                                   'teacher.kwargs.drop_rate=0.1'])
    assert dict(cfg.model.kwargs) == {'img_size': 32} and dict(cfg.teacher.kwargs) == {'drop_rate': 0.1}
    cfg = load_config(None, ['extra_teachers=[{name: test_resnet}]', 'extra_teachers.0.kwargs.drop_rate=0.2'])
    assert cfg.extra_teachers[0].kwargs.drop_rate == 0.2 and cfg.extra_teachers[0].name == 'test_resnet'


def test_an_empty_dict_means_the_same_in_a_recipe_and_on_the_command_line(tmp_path):
    """`kwargs: {}` in a recipe layer empties the dict as `model.kwargs={}` does; on a typed section (`aug: {}`,
    `aug={}`) both change nothing."""
    layer = tmp_path / 'cnn.yaml'
    layer.write_text(f"_base_: {ROOT / 'configs' / 'quickstart.yaml'}\nmodel: {{name: test_resnet, kwargs: {{}}}}\n"
                     'aug: {}\n')
    from_recipe = load_config(str(layer))
    from_override = load_config(str(ROOT / 'configs' / 'quickstart.yaml'), ['model.name=test_resnet',
                                                                          'model.kwargs={}', 'aug={}'])
    assert dict(from_recipe.model.kwargs) == dict(from_override.model.kwargs) == {}
    assert from_recipe == from_override
    assert from_recipe.aug.scale == [0.75, 1.0]  # the quick start's own values survive `aug: {}`
    assert load_config(str(layer), ['model.kwargs.depth=2']).model.kwargs == {'depth': 2}


def test_overrides_stand_before_between_and_after_flags():
    from train import parse_args
    args = parse_args(['train.epochs=1', '--print-config', 'data.img_size=48', '--config', 'a.yaml', 'x.y=2'])
    assert args.print_config and args.config == ['a.yaml']
    assert args.overrides == ['train.epochs=1', 'data.img_size=48', 'x.y=2']


def test_every_method_is_one_registry_entry_that_the_config_reads():
    """The config's choices, the default temperature, the teacher and the shadow heads all come from
    shake_vit/distill/methods.py; a method registered there is a valid `loss.method` at once."""
    from shake_vit.distill import methods
    assert set(methods.METHODS['classification']) == {'shake', 'deit_hard', 'deit_hard_cls', 'deit_soft', 'kd', 'none',
                                                      'none_both_heads'}
    for name, m in methods.METHODS['classification'].items():
        cfg = load_config(None, [f'loss.method={name}'])
        assert methods.temperature(cfg) == (m.temperature or 1.0)
        assert callable(methods.loss_fn(cfg))
    assert (methods.get('none').needs_teacher, methods.get('none').trains_shadow) == (False, False)
    assert (methods.get('kd').needs_teacher, methods.get('kd').trains_shadow) == (True, False)
    assert methods.get('shake').predict == 'cls' and methods.get('deit_hard').predict == 'avg'
    probe = methods.register(methods.Method('probe', lambda c, T: None, 'a test entry', temperature=2.0))
    try:
        assert methods.temperature(load_config(None, ['loss.method=probe'])) == 2.0
    finally:
        del methods.METHODS['classification'][probe.name]
    with pytest.raises(ConfigError, match="'loss.method' is 'probe'"):
        load_config(None, ['loss.method=probe'])
    with pytest.raises(ConfigError, match="extra_teachers is set but loss.method is 'kd'"):
        load_config(None, ['loss.method=kd', 'extra_teachers=[{name: a}]'])


def test_a_config_pickles_and_comes_back_equal_in_a_new_process(tmp_path):
    """The schema is assembled from registered sections; its root class must still be importable by name."""
    import pickle
    import subprocess
    import sys
    cfg = load_config(None, ['train.epochs=7'])
    assert pickle.loads(pickle.dumps(cfg)) == cfg and pickle.loads(pickle.dumps(cfg.data)) == cfg.data
    (tmp_path / 'cfg.pkl').write_bytes(pickle.dumps(cfg))
    code = f"import pickle; print(pickle.loads(open({str(tmp_path / 'cfg.pkl')!r}, 'rb').read()).train.epochs)"
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout == '7\n'
