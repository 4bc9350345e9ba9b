"""Every recipe's smoke variant runs, and the ImageNet SHAKE recipe builds exactly the DeiT pipeline."""
from pathlib import Path

import pytest
import torch
from helpers import ROOT, launch, main, results
from safetensors.torch import load_file
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from shake_vit.core import stream
from shake_vit.core.config import load_config
from shake_vit.core.stream import Stream

RECIPES = sorted(p.name for p in (ROOT / 'configs').glob('*.yaml') if not p.name.startswith('smoke'))
IMAGENET_SHAKE = 'configs/deit_tiny_shake_in1k.yaml'


def smoke_args(recipe: str, imagefolder: Path):
    """The smoke overlay that fits the recipe's student, and the data and teachers a CPU test can have."""
    from shake_vit.classification.models import is_vit
    cfg = load_config([str(ROOT / 'configs' / recipe)])
    if cfg.task == 'detection':  # digit scenes stand in for COCO; no torchvision weights to download
        return ['--config', 'configs/smoke_det.yaml']
    overlay = ('smoke_cifar' if cfg.model.name.startswith('cifar_') else 'smoke' if is_vit(cfg.model.name)
               else 'smoke_cnn')
    args = ['--config', f'configs/{overlay}.yaml']  # smoke_cifar keeps the recipe's own (CRD) networks
    if cfg.data.name == 'imagefolder':
        args.append(f'data.root={imagefolder}')
    elif cfg.data.name.startswith('cifar'):  # torchvision checks the archive's md5, so CIFAR cannot be generated
        args += ['data.name=fake', f'data.num_classes={100 if cfg.data.name == "cifar100" else 10}',
                 'data.fake_size=[64,32]']
    for i in range(len(cfg.extra_teachers)):
        args += [f'extra_teachers.{i}.name=test_efficientnet', f'extra_teachers.{i}.pretrained=false',
                 f'extra_teachers.{i}.fit.epochs=1', f'extra_teachers.{i}.kwargs={{}}']
    return args


def test_every_recipe_starts_with_the_command_that_runs_it():
    for recipe in RECIPES:
        first = (ROOT / 'configs' / recipe).read_text().splitlines()[0]
        assert first.startswith(('# accelerate launch', '# python train.py')), recipe
        assert recipe in first or recipe == 'quickstart.yaml', recipe


def test_the_documented_smoke_lines_run_as_documented_and_an_overlay_alone_says_what_it_is(tmp_path):
    """The smoke commands of docs/recipes.md paste and run: the ImageNet ones on random images as written (the CIFAR and
    detection lines are what test_smoke_variant_of_every_recipe_runs runs, so here they only resolve)."""
    import shlex
    lines = [line for line in (ROOT / 'docs' / 'recipes.md').read_text().splitlines()
             if line.startswith('python train.py --config ') and ' --config configs' + '/smoke' in line]
    assert len(lines) == 4, lines
    for i, line in enumerate(lines):
        args = [*shlex.split(line)[2:], f'train.output_dir={tmp_path / str(i)}']
        if 'in1k' in line:
            main(args)
            assert results(tmp_path / str(i))['num_samples'] > 0
        else:
            main([*args, '--print-config'])
    for overlay in sorted((ROOT / 'configs').glob('smoke*.yaml')):
        proc = main(['--config', f'configs/{overlay.name}', '--print-config'], check=False)
        assert proc.returncode == 2 and 'is an add-on to a recipe, not a recipe of its own' in proc.stderr, overlay


@pytest.mark.parametrize('override, message', [
    ('model.name=deit_tiny_distiled_patch16_224', "which timm does not know. Close matches: deit_tiny_distilled"),
    ('data.img_size=30', 'is not a multiple of the patch size 16x16'),
    ('model.predict=avg loss.method=kd', "model.predict=avg averages the shadow heads with the cls head, but "
     "loss.method='kd' trains no shadow head"),
    ('teacher.name=resnet8x4', "CRD's name for a CIFAR network; registered here it is cifar_resnet8x4"),
])
def test_print_config_refuses_what_the_run_would_before_any_data(override, message):
    proc = main(['--config', IMAGENET_SHAKE, '--print-config', *override.split()], check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]


def test_every_recipe_header_is_complete_names_its_reference_and_its_command_parses():
    """A header ends on a whole sentence (a cut-off one lost its end in a refactor), says what number the recipe
    should reach or that none is published, and its command is one train.py accepts."""
    import re
    import shlex

    import train
    for recipe in RECIPES:
        lines = []
        for line in (ROOT / 'configs' / recipe).read_text().splitlines():
            if not line.startswith('#'):
                break
            lines.append(line.lstrip('#').strip())
        text = ' '.join(lines[1:])
        assert text.endswith(('.', ')')), (recipe, text[-80:])
        assert re.search(r'(?i)paper|expected|publish|logs|reports', text), recipe
        command = shlex.split(lines[0])
        args = train.parse_args(command[command.index('train.py') + 1:])
        assert args.config == [f'configs/{recipe}'] or recipe == 'quickstart.yaml', (recipe, args.config)


@pytest.mark.parametrize('recipe', RECIPES)
def test_smoke_variant_of_every_recipe_runs(recipe, imagefolder, tmp_path):
    """... and --print-config of the same command derives the update counts and lr the run then uses."""
    out = tmp_path / 'run'
    args = ['--config', f'configs/{recipe}', *smoke_args(recipe, imagefolder), f'train.output_dir={out}']
    printed = main([*args, '--print-config']).stdout
    derived = printed[printed.index('# derived: ') + len('# derived: '):].splitlines()[0]
    proc = main(args)
    assert f'; {derived}' in proc.stdout, (derived, [line for line in proc.stdout.splitlines() if 'processes' in line])
    r = results(out)
    assert r['epochs'] == 2 and r['num_samples'] > 0
    cfg = load_config([str(out / 'config.yaml')])
    if cfg.model.shadow_on == 'teacher':  # the proxy-teacher head trained, was evaluated and saved with the student
        assert 'top1_shadow' in r and 'shadow_heads.0.fuse1.0.weight' in load_file(str(out / 'student.safetensors'))


def test_imagenet_recipe_smoke_runs_in_two_processes(imagefolder, tmp_path):
    out = tmp_path / 'ddp'
    proc = launch(['--config', IMAGENET_SHAKE, '--config', 'configs/smoke.yaml', f'data.root={imagefolder}',
                   f'train.output_dir={out}'], num_processes=2)
    assert 'processes 2, global batch 16' in proc.stdout
    assert results(out)['num_samples'] == 4 * 5  # every generated val image counted once


def test_imagenet_recipe_builds_the_deit_pipeline(imagefolder):
    """The full recipe (only the data root changed): transforms, mixup, lr schedule, weight-decay groups."""
    from accelerate import Accelerator

    from shake_vit.classification import data
    from shake_vit.classification.models import build_student
    from shake_vit.core.build import build_optimization
    from shake_vit.core.config import load_config
    cfg = load_config([str(ROOT / IMAGENET_SHAKE)], [f'data.root={imagefolder}'])
    acc = Accelerator(cpu=True)
    splits = data.build_splits(cfg)
    student = build_student(cfg, len(splits.classes))
    pipe = data.build_pipeline(cfg, acc, splits, student, cfg.aug.repeated_aug)

    train_tf = pipe.train_loader.dataset.transform.transforms
    crop = train_tf[0]
    assert isinstance(crop, RandomResizedCropAndInterpolation) and crop.size == (224, 224)
    assert crop.scale == (0.08, 1.0) and str(crop.interpolation).endswith('BICUBIC')
    assert isinstance(train_tf[1], T.RandomHorizontalFlip) and train_tf[1].p == 0.5
    ra = train_tf[2]
    assert isinstance(ra, RandAugment) and ra.num_layers == 2
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    assert 'SolarizeIncreasing' in {op.name for op in ra.ops}  # the 'inc1' variant
    assert not any(isinstance(t, T.ColorJitter) for t in train_tf)  # ignored under RandAugment, as in DeiT
    erase = train_tf[-1]
    assert isinstance(erase, RandomErasing) and erase.probability == 0.25 and erase.mode == 'pixel'

    val_tf = pipe.val_loader.dataset.transform.transforms
    assert isinstance(val_tf[0], T.Resize) and val_tf[0].size == 256  # 224 / 0.875
    assert str(val_tf[0].interpolation).endswith('BICUBIC')
    assert isinstance(val_tf[1], T.CenterCrop) and val_tf[1].size == (224, 224)

    mixup = data.build_mixup(cfg.aug, len(splits.classes))
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.label_smoothing) == \
        (0.8, 1.0, 1.0, 0.5, 0.1)

    # The lr on the recipe's own scale: 8 processes x 128, 1,281,167 images, DeiT's RA epoch of 1,281,024 samples.
    updates = Stream(1_281_167, 3, 0, 128, 1024).updates_per_epoch
    optimizer, schedule, d = build_optimization(stream.resolve(cfg, 8), student, 8, updates)
    assert d.global_batch == 1024 and d.lr == pytest.approx(1e-3)
    assert d.updates_per_epoch == 1251 and d.warmup_updates == 5 * 1251 and d.total_updates == 300 * 1251

    def lr_at(update):
        schedule.step_update(num_updates=update)
        return optimizer.param_groups[0]['lr']
    assert lr_at(0) == pytest.approx(1e-6)
    assert lr_at(d.warmup_updates // 2) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2, rel=1e-3)
    assert lr_at(d.warmup_updates) == pytest.approx(1e-3, rel=1e-3)  # cosine has barely started
    assert lr_at(d.total_updates - 1) == pytest.approx(1e-5, rel=1e-3)

    names = {id(p): n for n, p in student.named_parameters()}
    groups = {g['weight_decay']: {names[id(p)] for p in g['params']} for g in optimizer.param_groups}
    assert set(groups) == {0.0, 0.05}
    assert {'model.cls_token', 'model.dist_token', 'model.pos_embed', 'model.blocks.11.norm2.bias',
            'model.head_dist.bias'} <= groups[0.0]
    assert {'model.blocks.11.mlp.fc2.weight', 'model.head_dist.weight'} <= groups[0.05]
    assert all(p.ndim > 1 for p in optimizer.param_groups[[g['weight_decay'] for g in optimizer.param_groups]
                                                          .index(0.05)]['params'])


def test_print_config_shows_the_derived_values_and_trains_nothing(imagefolder, tmp_path):
    out = tmp_path / 'never'
    proc = main(['--config', IMAGENET_SHAKE, f'data.root={imagefolder}', 'train.batch_size=8',
                 f'train.output_dir={out}', '--print-config'])
    assert 'name: regnety_160.deit_in1k' in proc.stdout and 'auto_augment: rand-m9-mstd0.5-inc1' in proc.stdout
    # 48 images, one process: 6 batches of 8; lr = 5e-4 * 8 / 512; 5 of 300 epochs of warmup.
    assert ('# derived: processes 1, global batch 8 (1 micro-batch of 8, 1 per process per update), lr 7.81e-06, '
            '6 updates/epoch, 1800 updates, 30 warmup updates') in proc.stdout
    assert '# method: shake' in proc.stdout and 'predicts with the cls head' in proc.stdout
    assert not out.exists()


def test_print_config_works_before_the_data_is_mounted(tmp_path, monkeypatch):
    """Overrides on both sides of the flag; the data root does not exist yet: the config and every value that does
    not need the data are printed, and the rest is named. Printing never downloads (the CIFAR recipes' commands
    carry data.download=true)."""
    from torchvision.datasets import CIFAR100

    def download(self):
        raise AssertionError('--print-config downloaded the data set')
    monkeypatch.setattr(CIFAR100, 'download', download)
    proc = main(['--config', 'configs/cifar100_vgg13_vgg8.yaml', f'data.root={tmp_path}', 'data.download=true',
                 '--print-config'])
    assert 'download: true' in proc.stdout and ('# data: not downloaded yet: data.download=true downloads it when '
                                                'the run starts (--print-config never downloads)') in proc.stdout
    proc = main(['train.batch_size=8', '--config', IMAGENET_SHAKE, '--print-config',
                 f'data.root={tmp_path / "not_mounted"}'])
    assert 'batch_size: 8' in proc.stdout and f'root: {tmp_path / "not_mounted"}' in proc.stdout
    assert ('# derived: processes 1, global batch 8 (1 micro-batch of 8, 1 per process per update), lr 7.81e-06, '
            'updates per epoch, total and warmup updates need the data') in proc.stdout
    assert "# data: not readable here (data.root" in proc.stdout and "has no 'train/' folder" in proc.stdout


def test_a_cifar_recipe_smoke_runs_in_two_processes(tmp_path):
    """CRD's networks and the proxy-teacher head under DDP (the teacher, outside DDP, feeds the head its maps)."""
    out = tmp_path / 'cifar'
    proc = launch(['--config', 'configs/cifar100_resnet56_resnet20.yaml', '--config', 'configs/smoke_cifar.yaml',
                   'data.name=fake', 'data.num_classes=100', 'data.fake_size=[64,32]', f'train.output_dir={out}'],
                  num_processes=2)
    assert 'processes 2, global batch 16' in proc.stdout
    r = results(out)
    assert r['num_samples'] == 32 and 'top1_shadow' in r and r['best_epoch'] in (1, 2)


def test_deit_cifar_recipe_pads_and_crops_at_32px_as_deit_does():
    """facebookresearch/deit datasets.py, build_transform at 32 px: timm's DeiT pipeline with RandomCrop(32,
    padding=4) in place of the random-resized crop. The CRD recipes are the same path with everything else off."""
    from shake_vit.classification import data
    from shake_vit.core.config import load_config
    cfg = load_config([str(ROOT / 'configs/deit_tiny_shake_cifar100.yaml')])
    train_tf = data.build_transforms(cfg.aug, cfg.data.img_size, (0.5,) * 3, (0.5,) * 3)[0].transforms
    assert isinstance(train_tf[0], T.Resize) and train_tf[0].size == 32  # a no-op on CIFAR's 32-px images
    assert isinstance(train_tf[1], T.RandomCrop) and train_tf[1].size == (32, 32) and train_tf[1].padding == 4
    assert isinstance(train_tf[2], T.RandomHorizontalFlip) and isinstance(train_tf[3], RandAugment)
    assert isinstance(train_tf[-1], RandomErasing) and train_tf[-1].mode == 'pixel'
    crd = load_config([str(ROOT / 'configs/cifar100_wrn_40_2_wrn_16_2.yaml')])
    crd_tf = data.build_transforms(crd.aug, crd.data.img_size, (0.5,) * 3, (0.5,) * 3)[0]
    assert [type(t).__name__ for t in crd_tf.transforms] == ['Resize', 'RandomCrop', 'RandomHorizontalFlip',
                                                             'MaybeToTensor', 'Normalize']
    from PIL import Image
    image = Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy())
    resized = crd_tf.transforms[0](image)
    assert resized.tobytes() == image.tobytes()  # the resize leaves a 32-px image alone
    assert crd_tf(Image.new('RGB', (8, 8))).shape == (3, 32, 32)  # and brings the 8-px digits to 32 px


def test_the_none_recipe_is_a_plain_deit_on_its_cls_head():
    """DeiT's 72.20 row: deit_tiny_patch16_224 (no distillation token), no teacher, no shadow head."""
    from shake_vit.classification.models import build_student
    from shake_vit.core.config import load_config
    from shake_vit.distill import methods
    cfg = load_config([str(ROOT / 'configs/deit_tiny_none_in1k.yaml')], ['data.img_size=32', 'model.kwargs.depth=1'])
    assert cfg.model.name == 'deit_tiny_patch16_224' and not methods.of(cfg).needs_teacher
    student = build_student(cfg, 1000)
    assert student.num_shadow == 0 and not hasattr(student.model, 'dist_token') and student.predict == 'cls'


def test_print_config_counts_the_updates_the_run_makes(capsys):
    """The sampler --print-config sizes is the run's, repeated augmentation's copies included (DeiT's 3)."""
    from accelerate import Accelerator

    import train
    from shake_vit.core.family import family_of
    cfg = load_config([str(ROOT / IMAGENET_SHAKE), str(ROOT / 'configs' / 'smoke.yaml')],
                      ['data.name=fake', 'data.num_classes=10', 'data.fake_size=[1000,32]',
                       'train.max_updates_per_epoch=0'])
    assert cfg.aug.repeated_aug == 3
    train.print_config(cfg)
    family = family_of(cfg)
    splits = family.build_splits(cfg)
    pipe = family.build_pipeline(cfg, Accelerator(cpu=True), splits, family.build_student(cfg, len(splits.classes)))
    assert f'{pipe.updates_per_epoch} updates/epoch' in capsys.readouterr().out
