"""The teacher receives inputs normalised as its weights were trained: fitted here, reloaded from its own file, or
read from a file of another tool (docs/method.md, "The teacher's inputs")."""
import json

import pytest
import timm
import torch
from helpers import TINY, main, results
from safetensors.torch import load_file, save_file

from shake_vit.classification.teacher import load_teacher
from shake_vit.core.config import load_config

# Statistics far from ImageNet's (what timm's DistillationTeacher would apply for test_byobnet): before the fix the
# teacher fitted below scored 97.22 at fit time and 10.00 (chance) during distillation.
STATS = ['data.mean=[0.2,0.3,0.4]', 'data.std=[0.5,0.4,0.3]']
# A teacher fitted well enough (4 epochs, ~97%) that feeding it wrong inputs shows; one student epoch.
FIT = [*TINY, 'teacher.fit.epochs=4', 'train.max_updates_per_epoch=0']


@pytest.fixture(scope='module')
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp('fitted')
    proc = main([*FIT, *STATS, f'train.output_dir={out}'])
    fit_top1 = json.loads((out / 'teacher.json').read_text())['metrics']['teacher_top1']
    return out, proc, fit_top1


def test_a_fitted_teacher_scores_during_distillation_what_it_scored_when_fitted(fitted):
    out, proc, fit_top1 = fitted
    assert fit_top1 > 90  # a wrongly normalised input would show as a drop
    assert results(out)['teacher_top1'] == fit_top1
    assert 'receives inputs normalised with mean [0.2, 0.3, 0.4], std [0.5, 0.4, 0.3] (what it was fitted with)' \
        in proc.stdout
    assert proc.stdout.count('receives inputs normalised') == 1  # said once


def test_the_fitted_teachers_file_records_its_normalisation_for_later_runs_and_eval(fitted, tmp_path):
    out, _, fit_top1 = fitted
    main(['--eval', str(out)])
    assert json.loads((out / 'checkpoints' / 'update_00000022' / 'eval.json').read_text())['teacher_top1'] == fit_top1
    # Another run, with the student normalised the default way: the teacher's file says what it needs.
    proc = main([*FIT, 'train.max_updates_per_epoch=1', f'teacher.checkpoint={out}/teacher.safetensors',
                 f'train.output_dir={tmp_path / "again"}'])
    assert f'(recorded in {out}/teacher.safetensors): re-normalised from the student' in proc.stdout
    assert results(tmp_path / 'again')['teacher_top1'] == pytest.approx(fit_top1, abs=0.3)  # 1 image of 360: rounding


def test_a_file_without_a_record_gets_the_datas_statistics_or_teacher_mean_std(fitted, tmp_path):
    out, _, fit_top1 = fitted
    plain = tmp_path / 'teacher.pth'  # another tool's file: a bare state dict, no normalisation recorded
    torch.save(load_file(str(out / 'teacher.safetensors')), plain)
    proc = main([*FIT, *STATS, 'train.max_updates_per_epoch=1', f'teacher.checkpoint={plain}',
                 f'train.output_dir={tmp_path / "data_stats"}'])
    assert "(the data's, as the file records none" in proc.stdout
    assert results(tmp_path / 'data_stats')['teacher_top1'] == fit_top1
    proc = main([*FIT, 'train.max_updates_per_epoch=1', f'teacher.checkpoint={plain}', 'teacher.mean=[0.2,0.3,0.4]',
                 'teacher.std=[0.5,0.4,0.3]', f'train.output_dir={tmp_path / "explicit"}'])
    assert '(teacher.mean / teacher.std): re-normalised from the student' in proc.stdout
    assert results(tmp_path / 'explicit')['teacher_top1'] == pytest.approx(fit_top1, abs=0.3)


def test_teacher_statistics_for_a_teacher_fitted_here_are_refused(tmp_path):
    proc = main([*TINY, 'teacher.mean=[0.5,0.5,0.5]', 'teacher.std=[0.5,0.5,0.5]', f'train.output_dir={tmp_path}'],
                check=False)
    assert proc.returncode == 2 and 'this teacher is fitted here' in proc.stderr
    proc = main([*TINY, 'teacher.mean=[0.5,0.5]', f'train.output_dir={tmp_path}'], check=False)
    assert proc.returncode == 2 and "'teacher.mean' is [0.5, 0.5]" in proc.stderr
    proc = main([*TINY, 'teacher.mean=[0.5,0.5,0.5]', f'train.output_dir={tmp_path}'], check=False)
    assert proc.returncode == 2 and 'Set teacher.mean and teacher.std together' in proc.stderr


def test_hub_weights_bring_their_pretrained_cfg_statistics_and_a_fit_from_them_the_datas(tmp_path):
    """timm's pretrained weights (a local file stands in for the download, through timm's own pretrained_cfg
    overlay): the teacher gets its pretrained_cfg's statistics whatever the data's; fitted from those weights with
    a new head, it gets the data's, which it was fitted with."""
    torch.manual_seed(0)
    hub = timm.create_model('test_byobnet', num_classes=10)
    save_file({k: v.contiguous() for k, v in hub.state_dict().items()}, str(tmp_path / 'hub.safetensors'))
    overlay = (f'teacher.kwargs.pretrained_cfg_overlay={{file: {tmp_path}/hub.safetensors, num_classes: 10, '
               'mean: [0.3,0.3,0.3], std: [0.2,0.2,0.2]}')
    t = load_config(None, ['teacher.name=test_byobnet', 'teacher.pretrained=true', overlay]).teacher
    teacher = load_teacher(t, 10, ((0.5,) * 3, (0.5,) * 3))
    assert teacher.normalisation.source == "timm's pretrained_cfg of test_byobnet"
    assert teacher.mean_kd.flatten().tolist() == pytest.approx([0.3] * 3)
    assert teacher.std_kd.flatten().tolist() == pytest.approx([0.2] * 3)
    assert all(torch.equal(v, hub.state_dict()[k]) for k, v in teacher.model.state_dict().items())
    proc = main([*TINY, *STATS, 'teacher.pretrained=true', overlay, f'train.output_dir={tmp_path / "fit"}'])
    assert "(from timm's pretrained weights, new head)" in proc.stdout
    assert 'mean [0.2, 0.3, 0.4], std [0.5, 0.4, 0.3] (what it was fitted with)' in proc.stdout


def test_a_crd_teacher_file_gets_crds_statistics_and_a_misnamed_one_names_its_network(tmp_path):
    """A teacher file as CRD's train_teacher.py saves it ({'epoch', 'model', 'accuracy', 'optimizer'}), outside any
    CRD folder: with no teacher.mean/std it is fed CRD's CIFAR-100 statistics (the cifar_* registration's), a wrong
    teacher.name gets an error naming the registered network the file fits, and CRD's own names point to ours."""
    from shake_vit.core.config import ConfigError
    net = timm.create_model('cifar_resnet8x4', num_classes=10)
    path = tmp_path / 'somewhere' / 'best.pth'
    path.parent.mkdir()
    torch.save({'epoch': 240, 'model': net.state_dict(), 'accuracy': 71.5,
                'optimizer': torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9).state_dict()}, path)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cfg = load_config(None, ['data.name=digits', 'teacher.name=cifar_resnet8x4'])
    norm = load_teacher(cfg.teacher, 10, imagenet, str(path)).normalisation
    assert norm.mean == (0.5071, 0.4867, 0.4408) and norm.std == (0.2675, 0.2565, 0.2761)
    assert "CRD's CIFAR-100 statistics" in norm.source and not norm.note
    explicit = load_config(None, ['data.name=digits', 'teacher.name=cifar_resnet8x4', 'teacher.mean=[0.5,0.5,0.5]',
                                  'teacher.std=[0.25,0.25,0.25]'])
    assert load_teacher(explicit.teacher, 10, imagenet, str(path)).normalisation.mean == (0.5, 0.5, 0.5)
    wrong = load_config(None, ['data.name=digits', 'teacher.name=cifar_resnet8'])
    with pytest.raises(ConfigError) as err:
        load_teacher(wrong.teacher, 10, imagenet, str(path))
    message = str(err.value)
    assert "The file holds CRD's resnet8x4: teacher.name=cifar_resnet8x4." in message
    assert "unexpected ['layer1.0.downsample.0.weight'" in message and "other shapes ['conv1.weight" in message
    for name, key in (('resnet8x4', 'teacher.name'), ('ShuffleV1', 'model.name'), ('wrn_40_2', 'teacher.name')):
        proc = main([*TINY, f'{key}={name}', f'train.output_dir={tmp_path / name}'], check=False)
        assert proc.returncode == 2 and "CRD's name for a CIFAR network; registered here it is cifar_" in proc.stderr


def test_a_file_without_a_record_whose_architecture_says_other_statistics_is_warned(tmp_path):
    from shake_vit.classification.teacher import file_normalisation
    cfg = load_config(None, ['data.name=digits', 'teacher.name=resnet18'])
    model = timm.create_model('resnet18', num_classes=10)
    norm = file_normalisation(cfg.teacher, model, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert norm.mean == (0.5, 0.5, 0.5) and 'teacher.mean=[0.485, 0.456, 0.406]' in norm.note
    same = file_normalisation(cfg.teacher, model, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert not same.note
