"""The student factory, its heads, and the frozen teacher built from a file."""
import pytest
import timm
import torch

from shake_vit.classification.models import build_student
from shake_vit.classification.teacher import Normalisation, build_teacher_model, freeze, load_teacher
from shake_vit.core.config import ConfigError, load_config
from shake_vit.core.optim import build_optimizer

TINY = ['data.img_size=32', 'model.kwargs.patch_size=8', 'model.kwargs.embed_dim=32', 'model.kwargs.depth=2',
        'model.kwargs.num_heads=2']


def test_vit_keyword_arguments_pass_through_from_the_config():
    cfg = load_config(None, [*TINY, 'model.drop_path_rate=0.2'])
    student = build_student(cfg, num_classes=7)
    m = student.model
    assert type(m).__name__ == 'VisionTransformerDistilled'
    assert m.embed_dim == 32 and len(m.blocks) == 2 and m.patch_embed.grid_size == (4, 4)
    assert m.pos_embed.shape == (1, 16 + 2, 32)  # [cls, dist, patches]
    assert m.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    assert m.head.out_features == 7 and m.head_dist.out_features == 7


def test_training_yields_both_heads_and_eval_the_deit_average_or_the_cls_head():
    cfg = load_config(None, [*TINY, 'model.predict=avg'])
    student = build_student(cfg, num_classes=5)
    x = torch.randn(3, 3, 32, 32)
    student.train()
    s, h = student(x)
    assert s.shape == h.shape == (3, 5)
    student.eval()
    s, (h,) = student.forward_heads(x)
    assert torch.allclose(student(x), (s + h) / 2)
    # timm's own eval forward is the same average: the shadow head is timm's head_dist.
    assert torch.allclose(student.model(x), (s + h) / 2, atol=1e-6)
    student.predict = 'cls'
    assert torch.allclose(student(x), s)


def test_mlp_shadow_head_option():
    cfg = load_config(None, [*TINY, 'model.shadow_head=mlp', 'model.shadow_hidden_dim=48'])
    student = build_student(cfg, num_classes=4)
    layers = list(student.model.head_dist)
    assert layers[0].in_features == 32 and layers[0].out_features == 48 and layers[-1].out_features == 4
    student.train()
    assert student(torch.randn(2, 3, 32, 32))[1].shape == (2, 4)


def test_a_student_without_distillation_token_is_refused_with_the_fix():
    cfg = load_config(None, [*TINY, 'model.name=vit_tiny_patch16_224', 'model.shadow_on=token'])
    with pytest.raises(ConfigError, match='distilled DeiT.*model.shadow_on=pooled'):
        build_student(cfg, num_classes=3)


def test_cnn_student_gets_a_shadow_head_on_its_pooled_features():
    cfg = load_config(None, ['data.img_size=32', 'model.name=resnet10t', 'model.cifar_stem=true'])
    student = build_student(cfg, num_classes=5)
    assert student.placement == 'pooled' and student.num_shadow == 1
    assert student.shadow_heads[0].in_features == 512 and isinstance(student.model.maxpool, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    student.eval()
    s, (h,) = student.forward_heads(x)
    assert torch.allclose(s, student.model(x), atol=1e-6)  # the cls head is the timm classifier itself
    assert torch.allclose(h, student.shadow_heads[0](student.model.forward_head(student.model.forward_features(x),
                                                                                pre_logits=True)), atol=1e-6)
    assert student.model.forward_features(x).shape[-1] == 4  # 32 px / 8 with the CIFAR stem (/32 without)


def test_vgg_cifar_form_is_crds_vgg_and_vgg8_is_registered_in_timm():
    cfg = load_config(None, ['data.img_size=32', 'model.name=vgg8_bn', 'model.cifar_stem=true',
                             'model.drop_path_rate=0'])
    student = build_student(cfg, num_classes=100)
    m = student.model
    assert timm.is_model('vgg8_bn') and student.placement == 'pooled'
    assert [c.out_channels for c in m.features if isinstance(c, torch.nn.Conv2d)] == [64, 128, 256, 512, 512]
    # CRD's head: average pool of the 2x2 last block, one linear layer (no 4096-wide 7x7 MLP); CRD's parameter count.
    assert isinstance(m.pre_logits, torch.nn.Identity) and m.head.fc.in_features == 512
    assert student.shadow_heads[0].in_features == 512
    assert sum(p.numel() for p in m.parameters()) == 3_965_028
    assert m.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 2, 2)
    t = load_config(None, ['teacher.name=vgg13_bn', 'teacher.cifar_stem=true']).teacher
    vgg13 = build_teacher_model(t, num_classes=100)
    assert 9_400_000 < sum(p.numel() for p in vgg13.parameters()) < 9_500_000  # CRD's vgg13: 9.46M
    assert vgg13(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_shufflenet_adapter_is_torchvisions_network_behind_timms_interface(tmp_path):
    import torchvision

    from shake_vit.zoo.adapters import ShuffleNetV2
    torch.manual_seed(0)
    tv = torchvision.models.shufflenet_v2_x0_5().eval()  # ImageNet-shaped, as the weights pretrained=True downloads
    torch.save(tv.state_dict(), tmp_path / 'tv.pth')
    assert timm.create_model('shufflenet_v2_x0_5').pretrained_cfg['url'].startswith('https://download.pytorch.org')
    # pretrained=True goes through timm's loader; a local copy of torchvision's weights stands in for the download.
    file = dict(file=str(tmp_path / 'tv.pth'))
    model = timm.create_model('shufflenet_v2_x0_5', pretrained=True, pretrained_cfg_overlay=file).eval()
    assert isinstance(model, ShuffleNetV2) and model.pretrained_cfg['architecture'] == 'shufflenet_v2_x0_5'
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), tv(x), atol=1e-5)  # torchvision's network, logits and all
    other = timm.create_model('shufflenet_v2_x0_5', pretrained=True, num_classes=7, pretrained_cfg_overlay=file)
    assert torch.equal(other.conv5[0].weight, tv.conv5[0].weight) and other.get_classifier().out_features == 7
    with pytest.raises(ConfigError, match='vgg8_bn has no published pretrained weights'):
        timm.create_model('vgg8_bn', pretrained=True)
    student = build_student(load_config(None, ['data.img_size=32', 'model.name=shufflenet_v2_x0_5',
                                               'model.cifar_stem=true', 'model.drop_path_rate=0']), num_classes=5)
    m = student.model
    assert student.placement == 'pooled' and student.shadow_heads[0].in_features == m.num_features == 1024
    assert m.conv1[0].stride == (1, 1) and isinstance(m.maxpool, torch.nn.Identity)  # CIFAR stem
    assert m.forward_features(torch.randn(2, 3, 32, 32)).shape[-1] == 4  # 32 px / 8
    m.reset_classifier(3)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3) and m.get_classifier().out_features == 3


def test_drop_path_on_a_model_without_stochastic_depth_names_the_fix():
    cfg = load_config(None, ['data.img_size=32', 'model.name=vgg8_bn', 'model.drop_path_rate=0.1'])
    with pytest.raises(ConfigError, match='vgg8_bn does not take.*model.drop_path_rate=0'):
        build_student(cfg, num_classes=3)


def test_one_shadow_head_per_teacher():
    deit = build_student(load_config(None, [*TINY, 'extra_teachers=[{name: test_efficientnet}]']), num_classes=4)
    assert deit.placement == 'token' and deit.num_shadow == 2 and len(deit.shadow_heads) == 1
    deit.train()
    s, hs = deit(torch.randn(2, 3, 32, 32))
    assert isinstance(hs, tuple) and len(hs) == 2 and all(h.shape == (2, 4) for h in hs)
    cnn = build_student(load_config(None, ['data.img_size=32', 'model.name=resnet10t', 'model.predict=avg',
                                           'extra_teachers=[{name: a}, {name: b}]']), num_classes=4)
    assert cnn.num_shadow == 3
    cnn.eval()
    x = torch.randn(2, 3, 32, 32)
    s, hs = cnn.forward_heads(x)
    assert len(hs) == 3 and torch.allclose(cnn(x), torch.stack([s, *hs]).mean(0), atol=1e-6)  # eval: all heads


def test_weight_decay_skips_biases_norms_tokens_and_position_embedding():
    cfg = load_config(None, TINY)
    student = build_student(cfg, num_classes=3)
    opt = build_optimizer(cfg.optim, student, lr=1e-3)
    names = {id(p): n for n, p in student.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    decay = {names[id(p)] for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert {'model.cls_token', 'model.dist_token', 'model.pos_embed', 'model.head.bias', 'model.norm.weight',
            'model.blocks.0.norm1.weight'} <= no_decay
    assert {'model.head.weight', 'model.head_dist.weight', 'model.blocks.0.attn.qkv.weight',
            'model.patch_embed.proj.weight'} <= decay
    assert all(g['weight_decay'] == pytest.approx(0.05) for g in opt.param_groups if g['weight_decay'] > 0)


def test_teacher_loads_a_saved_timm_state_dict_and_is_frozen(tmp_path):
    from safetensors.torch import save_file
    cfg = load_config(None, ['teacher.name=test_byobnet'])
    reference = timm.create_model('test_byobnet', num_classes=6)
    for suffix, save in (('.pth', lambda sd, p: torch.save({'state_dict': sd}, p)),
                         ('.safetensors', lambda sd, p: save_file(sd, p))):
        path = str(tmp_path / f'teacher{suffix}')
        save({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
        teacher = load_teacher(cfg.teacher, 6, ((0.5,) * 3, (0.25,) * 3), path)
        assert not teacher.training and not teacher.model.training
        assert all(not p.requires_grad for p in teacher.parameters())
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(teacher(x), reference.eval()(x), atol=1e-6)
        # A file that records no normalisation: the teacher gets the data's (given), not the architecture's ImageNet
        assert teacher.mean_kd.flatten().tolist() == [0.5] * 3 and teacher.std_kd.flatten().tolist() == [0.25] * 3


def test_frozen_teacher_stays_in_eval_mode_inside_the_task():
    from shake_vit.classification.tasks import DistillationTask
    from shake_vit.distill.losses import shake_loss
    cfg = load_config(None, TINY)
    student = build_student(cfg, num_classes=3)
    teacher = freeze(timm.create_model('test_byobnet', num_classes=3), Normalisation((0.5,) * 3, (0.5,) * 3, 'test'))
    task = DistillationTask(student, teacher, shake_loss, torch.nn.CrossEntropyLoss(), (0.5,) * 3, (0.5,) * 3)
    task.train()
    assert student.training and not teacher.model.training
