"""Fine-tuning from saved timm ViT/DeiT weights of another size and class count, and export to plain timm."""
import json
import subprocess
import sys

import pytest
import timm
import torch
from helpers import TINY, main, results
from safetensors.torch import save_file

from shake_vit.classification.models import build_student
from shake_vit.classification.pretrained import load_pretrained
from shake_vit.core.config import ConfigError, load_config

# Source weights: 64 px, 8-pixel patches (8x8 grid), 7 classes. The student: 32 px (4x4 grid), 10 digit classes.
SOURCE = dict(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=7)
STUDENT = ['data.name=digits', 'data.img_size=32', 'model.kwargs.patch_size=8', 'model.kwargs.embed_dim=32',
           'model.kwargs.depth=1', 'model.kwargs.num_heads=2']


@pytest.fixture(scope='module')
def saved_weights(tmp_path_factory):
    """A real timm ViT saved as DeiT does ({'model': state dict}) and a distilled DeiT as .safetensors."""
    root = tmp_path_factory.mktemp('weights')
    torch.manual_seed(0)
    vit = timm.create_model('deit_tiny_patch16_224', **SOURCE)
    torch.save({'model': vit.state_dict(), 'epoch': 299}, root / 'vit.pth')
    deit = timm.create_model('deit_tiny_distilled_patch16_224', **SOURCE)
    save_file({k: v.contiguous() for k, v in deit.state_dict().items()}, str(root / 'deit.safetensors'))
    return {'vit': (root / 'vit.pth', vit.state_dict()), 'deit': (root / 'deit.safetensors', deit.state_dict())}


def test_plain_vit_weights_seed_the_distillation_token_and_shadow_head(saved_weights):
    path, source = saved_weights['vit']
    student = build_student(load_config(None, STUDENT), num_classes=10)
    notes = load_pretrained(student, str(path))
    m = student.model
    assert torch.equal(m.dist_token, source['cls_token'])
    assert m.pos_embed.shape == (1, 2 + 16, 32)
    assert torch.equal(m.pos_embed[:, 0], m.pos_embed[:, 1])  # the dist token reuses the cls position
    assert torch.allclose(m.pos_embed[:, 0], source['pos_embed'][:, 0])
    assert torch.equal(m.blocks[0].attn.qkv.weight, source['blocks.0.attn.qkv.weight'])
    assert m.head.out_features == 10  # 7 pretrained classes: heads start fresh
    text = ' '.join(notes)
    assert 'no distillation token' in text and 'position embedding resampled from a 8x8' in text
    assert 'head re-initialised (7 pretrained outputs, 10 here)' in text


def test_distilled_weights_keep_both_prefix_tokens_when_resampled(saved_weights):
    path, source = saved_weights['deit']
    student = build_student(load_config(None, STUDENT), num_classes=7)
    notes = load_pretrained(student, str(path))
    m = student.model
    assert torch.equal(m.dist_token, source['dist_token'])
    assert torch.equal(m.pos_embed[:, :2], source['pos_embed'][:, :2])  # prefix positions untouched
    assert torch.equal(m.head_dist.weight, source['head_dist.weight'])  # same 7 classes: heads kept
    assert not any('re-initialised' in n for n in notes)


def test_distilled_weights_fit_a_plain_vit_and_a_cls_export_fits_a_distilled_student(saved_weights, tmp_path):
    """The `none` baseline (a plain ViT) from a distilled DeiT: its distillation token, position and head go. A
    shake-vit cls-head export ([cls, reg, patches]) back into a distilled student: the register token is the
    distillation token again. This trainer's own student.safetensors, extra shadow heads and all, loads too."""
    path, source = saved_weights['deit']
    plain = build_student(load_config(None, [*STUDENT, 'model.name=deit_tiny_patch16_224', 'loss.method=none']), 7)
    notes = load_pretrained(plain, str(path))
    assert any('distillation token, its position embedding and its head are dropped' in n for n in notes)
    assert torch.equal(plain.model.cls_token, source['cls_token'])
    assert torch.equal(plain.model.blocks[0].mlp.fc1.weight, source['blocks.0.mlp.fc1.weight'])
    assert plain.model.pos_embed.shape == (1, 1 + 16, 32)
    export = timm.create_model('deit_tiny_patch16_224', reg_tokens=1, **SOURCE)
    save_file({k: v.contiguous() for k, v in export.state_dict().items()}, str(tmp_path / 'export.safetensors'))
    student = build_student(load_config(None, STUDENT), 7)
    notes = load_pretrained(student, str(tmp_path / 'export.safetensors'))
    assert torch.equal(student.model.dist_token, export.reg_token) and 'register token becomes' in notes[0]
    two = build_student(load_config(None, [*STUDENT, 'extra_teachers=[{name: test_resnet}]']), 7)
    save_file({k: v.contiguous() for k, v in two.state_dict().items()}, str(tmp_path / 'student.safetensors'))
    assert load_pretrained(build_student(load_config(None, STUDENT), 7), str(tmp_path / 'student.safetensors')) == []


@pytest.mark.parametrize('which', ['vit', 'deit'])
def test_finetuning_with_shake_from_saved_weights_trains_and_evaluates(saved_weights, which, teacher_file, tmp_path):
    path, _ = saved_weights[which]
    # --resume auto, as a requeued job passes it: with no checkpoint yet the run starts from the weights
    proc = main([*TINY, f'model.pretrained={path}', f'teacher.checkpoint={teacher_file}',
                 f'train.output_dir={tmp_path}', '--resume', 'auto'])
    assert 'fine-tuning from' in proc.stdout and 'position embedding resampled' in proc.stdout
    r = results(tmp_path)
    assert r['num_samples'] == 360 and 'top1_cls' in r and 'teacher_top1' in r


PLAIN_TIMM = '''
import json, sys, timm, torch
try:
    import shake_vit
    sys.exit('shake_vit must not be importable here')
except ImportError:
    pass
d, x_path, out_path = sys.argv[1:]
cfg = json.load(open(d + '/config.json'))
overlay = dict(cfg['pretrained_cfg'], file=d + '/model.safetensors')  # its num_classes keeps the head
model = timm.create_model(cfg['architecture'], pretrained=True, pretrained_cfg_overlay=overlay,
                          **cfg['model_args']).eval()
also = timm.create_model('local-dir:' + d, pretrained=True).eval()
x = torch.load(x_path)
with torch.no_grad():
    torch.save({'logits': model(x), 'local_dir': also(x)}, out_path)
'''


@pytest.fixture(scope='module')
def trained(tmp_path_factory, teacher_file):
    out = tmp_path_factory.mktemp('trained')
    main([*TINY, f'teacher.checkpoint={teacher_file}', f'train.output_dir={out}'])
    return out


@pytest.mark.parametrize('head', ['cls', 'both'])
def test_export_loads_in_plain_timm_with_the_trainers_logits(trained, head, tmp_path):
    from safetensors.torch import load_file
    export_dir = tmp_path / f'export_{head}'
    proc = main(['--export', str(trained), '--export-head', head, '--export-dir', str(export_dir)])
    assert 'exported' in proc.stdout
    config = json.loads((export_dir / 'config.json').read_text())
    assert config['architecture'] == ('deit_tiny_distilled_patch16_224' if head == 'both' else 'deit_tiny_patch16_224')
    # The trainer's eval model: the saved student, cls head (SHAKE) or the DeiT average.
    cfg = load_config([str(trained / 'config.yaml')])
    student = build_student(cfg, 10)
    student.load_state_dict(load_file(str(trained / 'student.safetensors')))
    student.eval()
    x = torch.randn(4, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    with torch.no_grad():
        s, (h,) = student.forward_heads(x)
    expected = s if head == 'cls' else (s + h) / 2
    # A separate interpreter, isolated (-I) and run elsewhere: only timm, no shake_vit.
    subprocess.run([sys.executable, '-I', '-c', PLAIN_TIMM, str(export_dir), str(tmp_path / 'x.pt'),
                    str(tmp_path / 'out.pt')], cwd=tmp_path, check=True)
    got = torch.load(tmp_path / 'out.pt')
    assert torch.allclose(got['logits'], expected, atol=1e-5)
    assert torch.allclose(got['local_dir'], expected, atol=1e-5)


def test_eval_accepts_an_export(trained, tmp_path):
    export_dir = tmp_path / 'exported'
    main(['--export', str(trained), '--export-dir', str(export_dir)])
    main(['--eval', str(export_dir)])
    evaluated = json.loads((export_dir / 'eval.json').read_text())
    assert evaluated['top1_cls'] == results(trained)['top1_cls'] and 'top1_shadow' not in evaluated


@pytest.mark.parametrize('name, cifar', [('test_resnet', True), ('shufflenet_v2_x0_5', False)])
def test_a_cnn_exports_and_says_how_to_load_it(name, cifar, teacher_file, tmp_path):
    """A CIFAR form is checked, and loaded, through shake_vit's cifar_stem (timm alone builds the ImageNet stem); an
    architecture shake_vit registers (the ShuffleNetV2 adapter) loads through timm once shake_vit is imported."""
    from safetensors.torch import load_file

    from shake_vit.classification.models import cifar_stem
    out, exported = tmp_path / 'cnn', tmp_path / 'exported'
    main([*TINY, f'model.name={name}', 'model.kwargs={}', 'model.drop_path_rate=0',
          f'teacher.checkpoint={teacher_file}', f'model.cifar_stem={str(cifar).lower()}', f'train.output_dir={out}'])
    proc = main(['--export', str(out), '--export-dir', str(exported)])
    assert 'exported the timm classifier' in proc.stdout
    if cifar:
        assert 'from shake_vit.classification.models import cifar_stem' in proc.stdout
        model = cifar_stem(timm.create_model(name, num_classes=10))
        model.load_state_dict(load_file(str(exported / 'model.safetensors')))
    else:
        assert f'once shake_vit has registered {name}' in proc.stdout
        timm.create_model(f'local-dir:{exported}', pretrained=True)
    main(['--eval', str(exported)])
    evaluated = json.loads((exported / 'eval.json').read_text())
    assert evaluated['top1_cls'] == results(out)['top1_cls']


def test_weights_of_another_width_or_depth_are_refused_naming_both_architectures(tmp_path):
    """A 192-wide DeiT-Ti file into a 96-wide student: `load_state_dict` would stop with a raw size-mismatch
    traceback even with strict=False; the error names both architectures and the fix instead."""
    wide = timm.create_model('deit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=10)
    torch.save({'model': wide.state_dict()}, tmp_path / 'deit_ti.pth')
    student = ['data.img_size=32', 'model.kwargs.patch_size=8', 'model.kwargs.embed_dim=96', 'model.kwargs.depth=2',
               'model.kwargs.num_heads=2']
    with pytest.raises(ConfigError) as err:
        load_pretrained(build_student(load_config(None, student), 10), str(tmp_path / 'deit_ti.pth'))
    message = str(err.value)
    assert 'the weights are a ViT 192 wide, 2 blocks, 8-px patches, without a distillation token' in message
    assert 'the student (deit_tiny_distilled_patch16_224) is 96 wide, 2 blocks, 8-px patches, with a' in message
    assert 'model.kwargs.embed_dim / depth / num_heads' in message
    deep = ['data.img_size=32', 'model.kwargs.patch_size=8', 'model.kwargs.depth=3', 'model.kwargs.num_heads=3']
    with pytest.raises(ConfigError, match='192 wide, 2 blocks.*192 wide, 3 blocks'):
        load_pretrained(build_student(load_config(None, deep), 10), str(tmp_path / 'deit_ti.pth'))
    # The same weights fit a student of their own width and depth (another patch size and class count adapt).
    fits = ['data.img_size=32', 'model.kwargs.patch_size=4', 'model.kwargs.depth=2', 'model.kwargs.num_heads=3']
    notes = load_pretrained(build_student(load_config(None, fits), 7), str(tmp_path / 'deit_ti.pth'))
    assert any('patch embedding resampled' in n for n in notes) and any('re-initialised' in n for n in notes)


def test_a_cnn_fine_tunes_from_its_own_familys_weights_with_a_fresh_head(tmp_path):
    """Any timm classifier: the backbone loads as saved, a classifier of another class count starts fresh."""
    torch.manual_seed(0)
    source = timm.create_model('test_resnet', num_classes=7)
    torch.save(source.state_dict(), tmp_path / 'resnet.pth')
    cfg = load_config(None, ['data.img_size=32', 'model.name=test_resnet', 'model.kwargs={}', 'model.drop_path_rate=0'])
    student = build_student(cfg, 10)
    notes = load_pretrained(student, str(tmp_path / 'resnet.pth'))
    assert notes == ['fc re-initialised (7 pretrained outputs, 10 here)']
    weights = student.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items() if not k.startswith('fc.'))
    with pytest.raises(ConfigError, match='not weights of this architecture'):
        load_pretrained(build_student(load_config(None, ['data.img_size=32', 'model.name=resnet10t',
                                                         'model.kwargs={}']), 10), str(tmp_path / 'resnet.pth'))


def test_the_plain_deit_baseline_exports_as_timms_vit_and_an_untrained_shadow_head_is_not_exported(teacher_file,
                                                                                                    tmp_path):
    """`none` on deit_tiny_patch16_224 (DeiT's 72.20 row) is timm's ViT through and through; a distilled DeiT trained
    with kd has a head_dist no loss trained, so --export-head both (which averages it in) is refused."""
    out, exported = tmp_path / 'none', tmp_path / 'exported'
    main([*TINY, 'model.name=deit_tiny_patch16_224', 'loss.method=none', f'train.output_dir={out}'])
    r = results(out)
    assert 'top1_shadow' not in r and 'top1_avg' not in r and 'teacher_top1' not in r  # no shadow head, no teacher
    assert not (out / 'teacher.safetensors').exists()
    assert 'exported the timm classifier' in main(['--export', str(out), '--export-dir', str(exported)]).stdout
    assert json.loads((exported / 'config.json').read_text())['architecture'] == 'deit_tiny_patch16_224'
    main(['--eval', str(exported)])
    assert json.loads((exported / 'eval.json').read_text())['top1_cls'] == r['top1_cls']
    kd = tmp_path / 'kd'
    main([*TINY, 'loss.method=kd', f'teacher.checkpoint={teacher_file}', f'train.output_dir={kd}'])
    proc = main(['--export', str(kd), '--export-head', 'both'], check=False)
    assert proc.returncode == 2 and "loss.method='kd' does not train" in proc.stderr


def test_what_the_student_predicts_with_picks_the_best_checkpoint_the_table_mark_and_the_default_export(teacher_file,
                                                                                                        tmp_path):
    """deit_hard predicts with the average of its heads (DeiT's inference): the best checkpoint is chosen by
    top1_avg, the table marks that row, and --export writes the two-head DeiT unless told otherwise."""
    out = tmp_path / 'deit_hard'
    proc = main([*TINY, 'loss.method=deit_hard', f'teacher.checkpoint={teacher_file}', f'train.output_dir={out}'])
    assert [line for line in proc.stdout.splitlines() if '<- the model' in line][0].startswith('average of heads')
    state = json.loads(next((out / 'checkpoints').glob('update_*/trainer_state.json')).read_text())
    assert state['best_of'] == 'top1_avg' and state['best'] == state['metrics']['top1_avg']
    exported = main(['--export', str(out), '--export-dir', str(tmp_path / 'exported')])
    assert 'exported the two-head DeiT' in exported.stdout
    config = json.loads((tmp_path / 'exported' / 'config.json').read_text())
    assert config['architecture'] == 'deit_tiny_distilled_patch16_224'
    assert 'exported the cls-head ViT' in main(['--export', str(out), '--export-head', 'cls',
                                                '--export-dir', str(tmp_path / 'cls')]).stdout


def test_a_run_of_the_old_none_says_how_to_evaluate_and_export_it(tmp_path):
    """Until 2026-11-27 `none` trained both heads on the labels: such a run's weights hold a shadow head the `none`
    student no longer has. --eval and --export say to name it none_both_heads, and then work."""
    out = tmp_path / 'old_none'
    main([*TINY, 'model.name=test_resnet', 'model.kwargs={}', 'model.drop_path_rate=0', 'loss.method=none_both_heads',
          f'train.output_dir={out}'])
    config = out / 'config.yaml'
    config.write_text(config.read_text().replace('method: none_both_heads', 'method: none'))  # as the old run wrote it
    for command in (['--eval', str(out)], ['--export', str(out), '--export-dir', str(tmp_path / 'exported')]):
        proc = main(command, check=False)
        assert proc.returncode == 2 and 'that is loss.method=none_both_heads now' in proc.stderr, proc.stderr
        main([*command, 'loss.method=none_both_heads'])
