"""CRD's CIFAR networks (shake_vit/zoo/crd.py): CRD's parameter counts, feature maps and state-dict keys, timm's
interface; CRD's teacher files load by name; the authors' proxy-teacher shadow head end to end."""
import hashlib
import json
import math
import shutil

import pytest
import timm
import torch
from helpers import main, results
from safetensors.torch import load_file

from shake_vit.classification.teacher import load_teacher
from shake_vit.core.config import ConfigError, load_config
from shake_vit.zoo.crd import CIFAR100_MEAN, CIFAR100_STD, CRD_NAMES

# Reference values from CRD's own code (HobbitLong/RepDistiller models/, commit b84f547), each network built with
# num_classes=100: its parameter count, the shapes of its `is_feat=True` feature maps for a 32-px input, and the
# signature (below) of its state dict's keys and shapes, which CRD's teacher files carry.
CRD = {
    'resnet8': (83892, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], '166d31a811b31c5f'),
    'resnet14': (181108, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], '8525efa6fc491f19'),
    'resnet20': (278324, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], '6db44f39e3bff21f'),
    'resnet32': (472756, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], '325ee6108709f7b5'),
    'resnet44': (667188, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], 'f1263f7b0ed71e1a'),
    'resnet56': (861620, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], '3977b81559d8630f'),
    'resnet110': (1736564, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], '7f8e5ac1814e480a'),
    'resnet8x4': (1233540, [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)], '5d5871b403f3a649'),
    'resnet32x4': (7433860, [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)], '610ad29043c56b33'),
    'ResNet50': (23705252, [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
                 'd4a9e0738c8f8385'),
    'wrn_16_1': (180916, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], 'f6cf46040022f13d'),
    'wrn_16_2': (703284, [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)], 'bdbc50a2b3205f84'),
    'wrn_40_1': (569780, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], 'deef22602ae7584b'),
    'wrn_40_2': (2255156, [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)], 'bf5731c8e8e2b95f'),
    'vgg8': (3965028, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 'd9f8d7533423754e'),
    'vgg11': (9277284, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], '6592bd1869a5938f'),
    'vgg13': (9462180, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], '7bec65f1ca17a0bf'),
    'vgg16': (14774436, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 'b420ddff7e4306ec'),
    'vgg19': (20086692, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], '2d318270df30c723'),
    'MobileNetV2': (812836, [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], '10e9036e17013c38'),
    'ShuffleV1': (949258, [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)], 'eb3bcbc847930cce'),
    'ShuffleV2': (1355528, [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)], 'b7e2c3e764687767'),
}


# The same networks' outputs from CRD's code, with the weights `fill` sets and the input of `golden_input`: the first
# three logits of the first image, the logits' std, then the mean of each feature map (rounded to 4 decimals).
GOLDEN = {
    'resnet8': [-1.181, 1.7271, 0.7634, 2.2241, 0.537, 0.5788, 0.9897, 1.1986],
    'resnet14': [5.6503, -6.8396, 18.3532, 7.5098, 0.537, 1.2322, 2.2082, 4.3787],
    'resnet20': [-0.0552, -8.2493, 35.495, 12.5143, 0.537, 1.7088, 3.774, 7.0455],
    'resnet32': [-40.8745, 21.7441, 162.6647, 65.9209, 0.537, 2.1945, 6.2774, 39.5167],
    'resnet44': [1089.7898, 270.9925, 1262.318, 650.8037, 0.537, 3.7516, 48.2006, 354.3953],
    'resnet56': [8463.9424, 6683.5229, 15135.6094, 10797.0596, 0.537, 12.8596, 230.5998, 6363.3213],
    'resnet110': [109208128.0, -476921760.0, 634065024.0, 657442176.0, 0.537, 267.6344, 254543.1719, 295749472.0],
    'resnet8x4': [0.8042, -8.8018, 4.4098, 3.085, 0.5424, 0.6925, 0.9759, 1.3566],
    'resnet32x4': [585.0267, -168.2581, 380.0196, 323.4422, 0.5424, 4.6392, 28.7171, 152.7647],
    'ResNet50': [174.7541, 387.6444, -91.6203, 266.4291, 0.5661, 1.6397, 6.3286, 54.9487, 140.2944],
    'wrn_16_1': [-6.5198, 11.3117, 2.1363, 5.4089, -0.0051, -0.5707, 0.2826, 0.6433],
    'wrn_16_2': [-7.157, 1.6188, 1.8869, 4.9365, -0.0042, -0.3552, -0.0507, -0.1401],
    'wrn_40_1': [7.9261, -100.1685, 91.1027, 61.4646, -0.0018, -1.7953, -2.7706, -5.7618],
    'wrn_40_2': [52.5568, 60.8564, -152.1517, 112.1736, 0.0073, -0.2812, -2.6289, 8.0119],
    'vgg8': [3.8902, -1.2459, -0.4064, 2.3241, 0.5596, 0.9063, 1.1793, 1.2925, 1.0372],
    'vgg11': [-0.8794, 0.9913, 2.1098, 1.3039, 0.5596, 0.9063, 1.0189, 0.9695, 0.7029],
    'vgg13': [0.124, -2.1169, -3.5467, 1.0747, 0.4655, 0.6564, 0.8311, 0.7154, 0.5337],
    'vgg16': [0.2203, 0.052, 0.2547, 0.7954, 0.4655, 0.6564, 0.8326, 0.6379, 0.3989],
    'vgg19': [0.2917, -0.4736, -0.6686, 0.4858, 0.4655, 0.6564, 0.5592, 0.4372, 0.2434],
    'MobileNetV2': [-44.7789, -300.207, -102.6091, 249.6828, 0.5815, -0.6648, -2.7284, 20.6026, -5.419],
    'ShuffleV1': [-42.654, -111.0894, 140.473, 116.4114, 0.434, 0.877, 17.9936, 58.1717],
    'ShuffleV2': [-12.4177, -38.9537, -39.6458, 23.6474, 0.496, 1.799, 6.2134, 11.0096],
}


def fill(model: torch.nn.Module) -> None:
    """Deterministic weights, the same for two networks with the same state-dict keys and shapes: He-scaled normals
    for weights of rank >= 2, BatchNorm near identity, all from one seeded stream in key order."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in sorted(model.state_dict().items()):
            if v.dtype != torch.float32:
                continue
            if v.ndim >= 2:
                v.copy_(torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel()))
            elif k.endswith('running_var'):
                v.copy_(1 + 0.1 * torch.rand(v.shape, generator=g))
            elif k.endswith('weight'):
                v.copy_(1 + 0.1 * torch.randn(v.shape, generator=g))
            else:
                v.copy_(0.1 * torch.randn(v.shape, generator=g))


def golden_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def signature(state: dict) -> str:
    """Sorted `key:shape` lines of a state dict, hashed: equal exactly when the keys and their shapes are."""
    lines = '\n'.join(f'{k}:{tuple(v.shape)}' for k, v in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


@pytest.mark.parametrize('crd_name', list(CRD))
def test_each_network_is_crds_with_timms_interface(crd_name):
    count, maps, keys = CRD[crd_name]
    model = timm.create_model(CRD_NAMES[crd_name], num_classes=100).eval()
    assert sum(p.numel() for p in model.parameters()) == count
    assert signature(model.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, features = model.forward_intermediates(x)
        assert [tuple(f.shape[1:]) for f in features] == maps
        assert [(i['num_chs'], 32 // i['reduction']) for i in model.feature_info] == [(c, h) for c, h, _ in maps]
        pooled = model.forward_head(final, pre_logits=True)
        assert pooled.shape == (2, model.num_features) and model.get_classifier().in_features == model.num_features
        assert torch.allclose(model.forward_head(final), model(x), atol=1e-5)
        assert model.forward_intermediates(x, indices=2, intermediates_only=True)[0].shape[1:] == maps[-2]
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7


@pytest.mark.parametrize('crd_name', list(CRD))
def test_each_network_computes_what_crds_computes(crd_name):
    """With the same weights, the same logits and feature maps as CRD's own code (GOLDEN): a wrong shortcut, a
    missing ReLU or a channel shuffle the other way round would pass the shape checks, not this one."""
    model = timm.create_model(CRD_NAMES[crd_name], num_classes=100).eval()
    fill(model)
    with torch.no_grad():
        final, maps = model.forward_intermediates(golden_input())
        logits = model.forward_head(final)
    got = [*logits[0, :3].tolist(), logits.std().item(), *(f.mean().item() for f in maps)]
    assert got == pytest.approx(GOLDEN[crd_name], rel=1e-4, abs=1e-4)


def test_crds_vgg_skips_its_fourth_pool_at_32px_only():
    vgg = timm.create_model('cifar_vgg13').eval()
    with torch.no_grad():
        assert vgg.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4
        assert vgg.forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 4  # 64 / 16: the 4th pool runs


def test_a_crd_teacher_file_loads_by_name(tmp_path):
    """CRD's teachers: save/models/<name>_vanilla/ckpt_epoch_240.pth holding {'model': state_dict, 'optimizer': ...,
    'epoch': ..., 'accuracy': ...}. It loads into the registered network without renaming a key, read with
    weights_only (no unpickling of code), and a wrong teacher.name is told which network the file holds."""
    folder = tmp_path / 'save' / 'models' / 'wrn_40_2_vanilla'
    folder.mkdir(parents=True)
    crd = timm.create_model('cifar_wrn_40_2', num_classes=100)
    assert {'conv1.weight', 'block1.layer.0.bn1.weight', 'block2.layer.0.convShortcut.weight', 'bn1.running_mean',
            'fc.weight'} <= set(crd.state_dict())  # CRD's key names (wrn.py)
    sgd = torch.optim.SGD(crd.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    crd(torch.randn(2, 3, 32, 32)).sum().backward()
    sgd.step()  # momentum buffers in the optimizer state, as CRD's file holds
    path = folder / 'ckpt_epoch_240.pth'
    torch.save({'epoch': 240, 'model': crd.state_dict(), 'accuracy': torch.tensor(75.61),
                'optimizer': sgd.state_dict()}, path)
    t = load_config(None, ['teacher.name=cifar_wrn_40_2', f'teacher.checkpoint={path}']).teacher
    teacher = load_teacher(t, 100, (CIFAR100_MEAN, CIFAR100_STD))
    assert all(torch.equal(v, crd.state_dict()[k]) for k, v in teacher.model.state_dict().items())
    wrong = load_config(None, ['teacher.name=cifar_wrn_16_2', f'teacher.checkpoint={path}']).teacher
    with pytest.raises(ConfigError, match="holds CRD's wrn_40_2: teacher.name=cifar_wrn_40_2"):
        load_teacher(wrong, 100, (CIFAR100_MEAN, CIFAR100_STD))


PROXY = ['data.img_size=32', 'model.name=cifar_resnet8', 'model.kwargs={}', 'model.drop_path_rate=0',
         'model.shadow_on=teacher', 'teacher.name=cifar_resnet20', 'teacher.fit.epochs=1', 'train.epochs=2',
         'train.max_updates_per_epoch=3', 'eval.interval=1', 'train.log_interval=1', 'eval.batch_size=100',
         'ckpt.interval_updates=4', 'ckpt.keep_last=10', 'train.batch_size=32']


def test_the_proxy_teacher_head_is_checkpointed_resumed_evaluated_and_not_exported(tmp_path):
    """The fusion layers live in the student's checkpoints (and its optimizer's), come back on a mid-epoch resume
    to the same weights, feed --eval's shadow head from the teacher, and stay out of the exported classifier."""
    full, resumed = tmp_path / 'full', tmp_path / 'resumed'
    main([*PROXY, f'train.output_dir={full}'])
    weights = load_file(str(full / 'checkpoints' / 'update_00000004' / 'model.safetensors'))
    assert 'shadow_heads.0.fuse5.1.running_mean' in weights  # BatchNorm of the fusion layers, saved
    (resumed / 'checkpoints').mkdir(parents=True)
    shutil.copytree(full / 'checkpoints' / 'update_00000004', resumed / 'checkpoints' / 'update_00000004')
    for f in ('teacher.safetensors', 'teacher.json'):
        shutil.copy(full / f, resumed / f)
    main([*PROXY, f'train.output_dir={resumed}', '--resume', 'auto'])
    a, b = load_file(str(full / 'student.safetensors')), load_file(str(resumed / 'student.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    main(['--eval', str(full)])
    evaluated = json.loads((full / 'checkpoints' / 'update_00000006' / 'eval.json').read_text())
    assert evaluated['top1_shadow'] == results(full)['top1_shadow']
    (full / 'teacher.safetensors').rename(tmp_path / 'teacher.safetensors')  # evaluated elsewhere, without it
    main(['--eval', str(full)])
    evaluated = json.loads((full / 'checkpoints' / 'update_00000006' / 'eval.json').read_text())
    assert evaluated['top1_cls'] == results(full)['top1_cls'] and 'top1_shadow' not in evaluated
    (tmp_path / 'teacher.safetensors').rename(full / 'teacher.safetensors')
    main(['--export', str(full), '--export-dir', str(tmp_path / 'exported')])
    exported = load_file(str(tmp_path / 'exported' / 'model.safetensors'))
    assert not any('fuse' in k for k in exported) and 'fc.weight' in exported


def test_features_only_gives_crds_maps():
    """timm's `features_only=True` wraps the network (its getter wrapper) and returns the same maps."""
    x = torch.randn(2, 3, 32, 32)
    for name in ('cifar_vgg8', 'cifar_resnet20'):
        torch.manual_seed(0)
        features = timm.create_model(name, features_only=True).eval()
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        with torch.no_grad():
            got, expected = features(x), model.forward_intermediates(x, intermediates_only=True)
        assert len(got) == len(expected) and all(torch.allclose(a, b) for a, b in zip(got, expected))
