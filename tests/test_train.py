"""End to end through the real entry point: `accelerate launch train.py` in one and two CPU processes."""
import pytest
import yaml
from helpers import TINY, launch, main, python_train, results, scalar_tags
from safetensors.torch import load_file

DIGITS_VAL = 360  # 20% of 1,797, stratified


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    proc = launch([*TINY, f'train.output_dir={out}'], num_processes=2)
    return out, proc


def test_two_processes_count_every_validation_image_once(two_process_run):
    out, proc = two_process_run
    assert 'processes 2, global batch 128' in proc.stdout
    r = results(out)
    # 360 images in batches of 100 over 2 processes: the last shard is padded, gather_for_metrics drops the padding.
    assert r['num_samples'] == DIGITS_VAL
    for key in ('top1_cls', 'top1_shadow', 'top1_avg', 'top5_cls', 'top5_shadow', 'top5_avg', 'teacher_top1',
                'agree_cls_shadow', 'epochs', 'train_images_per_sec'):
        assert key in r, key
    assert 0 <= r['top1_cls'] <= 100 and r['train_images_per_sec'] > 0


def test_run_directory_holds_config_weights_and_every_loss_term_in_tensorboard(two_process_run):
    out, _ = two_process_run
    cfg = yaml.safe_load((out / 'config.yaml').read_text())
    assert cfg['loss']['method'] == 'shake' and cfg['model']['kwargs']['embed_dim'] == 32
    weights = load_file(str(out / 'student.safetensors'))
    assert 'model.dist_token' in weights and 'model.head_dist.weight' in weights
    assert (out / 'teacher.safetensors').is_file()
    tags = scalar_tags(out)
    for tag in ('train/loss', 'train/ce_cls', 'train/kl_shadow_teacher', 'train/kl_shadow_cls', 'train/kl_cls_shadow',
                'train/lr', 'train/images_per_sec', 'teacher_fit/loss', 'val/top1_cls', 'val/top1_shadow',
                'val/top1_avg', 'val/top5_cls', 'val/teacher_top1', 'val/agree_cls_shadow'):
        assert tag in tags, f'{tag} missing from {tags}'


def test_one_process_with_plain_python_reuses_the_fitted_teacher(tmp_path):
    out = tmp_path / 'one'
    first = python_train([*TINY, f'train.output_dir={out}'])  # a new interpreter, no launcher
    assert 'fitting the teacher test_byobnet' in first.stdout
    second = main([*TINY, f'train.output_dir={out}', 'loss.method=deit_hard', 'train.overwrite=true'])
    assert 'reusing the teacher fitted earlier' in second.stdout
    r = results(out)
    assert r['num_samples'] == DIGITS_VAL
    tags = scalar_tags(out)
    assert 'train/ce_shadow_teacher' in tags  # deit_hard's term, logged under its own name
