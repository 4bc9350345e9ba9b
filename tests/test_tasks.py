"""The training step: named terms that sum to the loss, gradients only into the student."""
import pytest
import timm
import torch

from shake_vit.classification.models import build_student
from shake_vit.classification.tasks import DistillationTask
from shake_vit.classification.teacher import Normalisation, freeze
from shake_vit.core.config import load_config
from shake_vit.distill.methods import loss_fn

TINY = ['data.img_size=32', 'model.kwargs.patch_size=8', 'model.kwargs.embed_dim=32', 'model.kwargs.depth=1',
        'model.kwargs.num_heads=2']
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET = Normalisation(MEAN, STD, 'test')


def make_task(method, **overrides):
    cfg = load_config(None, [*TINY, f'loss.method={method}', *[f'{k}={v}' for k, v in overrides.items()]])
    torch.manual_seed(0)
    student = build_student(cfg, num_classes=4)
    teacher = freeze(timm.create_model('test_byobnet', num_classes=4), IMAGENET)
    return DistillationTask(student, teacher, loss_fn(cfg), torch.nn.CrossEntropyLoss(), MEAN, STD).train()


@pytest.mark.parametrize('method, terms', [
    ('shake', {'ce_cls', 'kl_shadow_teacher', 'kl_shadow_cls', 'kl_cls_shadow'}),
    ('deit_hard', {'ce_cls', 'ce_shadow_teacher'}),
    ('deit_soft', {'ce_cls', 'kl_shadow_teacher'}),
    ('kd', {'ce_cls', 'kl_cls_teacher'}),
    ('none', {'ce_cls'}),
    ('none_both_heads', {'ce_cls', 'ce_shadow'}),
])
def test_step_returns_named_terms_that_sum_to_the_loss(method, terms):
    task = make_task(method)
    y = torch.tensor([0, 1, 2, 3])
    out = task(torch.randn(4, 3, 32, 32), y)
    # monitor_ce: the student's unweighted cross-entropy, which the health checks read; not a term of the loss
    assert torch.allclose(out['monitor_ce'], torch.nn.functional.cross_entropy(out['logits_cls'].detach(), y))
    scalars = {k for k, v in out.items() if v.ndim == 0 and k not in ('loss', 'monitor_ce')}
    assert scalars == terms
    assert out['loss'].item() == pytest.approx(sum(out[k].item() for k in terms), rel=1e-6)
    assert out['logits_cls'].shape == (4, 4)


def test_teacher_receives_no_gradient_and_student_does():
    task = make_task('shake')
    task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))['loss'].backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    student = task.trainable_module
    assert student.model.head.weight.grad is not None and student.model.head_dist.weight.grad is not None
    assert student.model.dist_token.grad is not None


@pytest.mark.parametrize('method', ['kd', 'none'])
def test_methods_without_a_shadow_head_freeze_the_deits_and_report_none(method):
    task = make_task(method)
    student = task.trainable_module
    assert student.num_shadow == 0 and student.predict == 'cls'
    task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))['loss'].backward()
    assert student.model.head_dist.weight.grad is None and not student.model.head_dist.weight.requires_grad
    student.eval()
    x = torch.randn(2, 3, 32, 32)
    s, hs = student.forward_heads(x)
    assert hs == [] and torch.equal(student(x), s)


def test_none_with_a_plain_deit_is_timms_classifier_alone():
    """DeiT's 72.20 baseline: deit_tiny_patch16_224 trained on its head, no shadow head anywhere."""
    cfg = load_config(None, [*TINY, 'model.name=deit_tiny_patch16_224', 'loss.method=none'])
    student = build_student(cfg, num_classes=4)
    assert student.num_shadow == 0 and len(student.shadow_heads) == 0
    assert {n.split('.')[0] for n, _ in student.named_parameters()} == {'model'}
    task = DistillationTask(student, None, loss_fn(cfg), torch.nn.CrossEntropyLoss(), MEAN, STD).train()
    out = task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert set(k for k, v in out.items() if v.ndim == 0) == {'loss', 'ce_cls', 'monitor_ce'}
    student.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(student(x), student.model(x))


def test_the_eval_output_follows_the_method_unless_model_predict_says():
    x = torch.randn(2, 3, 32, 32)
    for method, predict in (('shake', 'cls'), ('deit_hard', 'avg'), ('deit_soft', 'avg'), ('none_both_heads', 'avg')):
        student = build_student(load_config(None, [*TINY, f'loss.method={method}']), num_classes=4).eval()
        s, (h,) = student.forward_heads(x)
        assert student.predict == predict
        assert torch.allclose(student(x), s if predict == 'cls' else (s + h) / 2, atol=1e-6)
    student = build_student(load_config(None, [*TINY, 'loss.method=shake', 'model.predict=avg']), num_classes=4)
    assert student.predict == 'avg'


def test_teacher_input_is_renormalised_when_its_mean_and_std_differ():
    cfg = load_config(None, TINY)
    teacher = freeze(timm.create_model('test_byobnet', num_classes=4), Normalisation((0.5,) * 3, (0.5,) * 3, 'test'))
    task = DistillationTask(build_student(cfg, num_classes=4), teacher, loss_fn(cfg), None, MEAN, STD)
    assert task.renormalize == [True]
    pixels = torch.rand(2, 3, 32, 32)
    student_input = (pixels - task.student_mean) / task.student_std
    expected = teacher.model((pixels - 0.5) / 0.5)
    assert torch.allclose(task.teacher_outputs(student_input)[0], expected, atol=1e-5)
    assert make_task('shake').renormalize == [False]  # same ImageNet statistics: the input goes through untouched


def test_default_temperatures_follow_each_method():
    from shake_vit.distill.methods import temperature
    assert temperature(load_config(None, ['loss.method=shake'])) == 4.0
    assert temperature(load_config(None, ['loss.method=deit_soft'])) == 1.0
    assert temperature(load_config(None, ['loss.method=deit_soft', 'loss.temperature=3'])) == 3.0


PROXY = ['data.img_size=32', 'model.name=cifar_resnet8', 'model.kwargs={}', 'model.drop_path_rate=0',
         'model.shadow_on=teacher', 'teacher.name=cifar_resnet20']


def proxy_task(*overrides):
    from shake_vit.classification.teacher import build_teacher_model
    cfg = load_config(None, [*PROXY, *overrides])
    torch.manual_seed(0)
    student = build_student(cfg, num_classes=4)
    teachers = [freeze(build_teacher_model(t, 4), IMAGENET) for t in [cfg.teacher, *cfg.extra_teachers]]
    return DistillationTask(student, teachers, loss_fn(cfg), torch.nn.CrossEntropyLoss(), MEAN, STD).train()


def test_the_proxy_teacher_head_trains_its_fusion_layers_alone_on_the_teachers_maps():
    """The authors' CNN shadow head: the teacher (backbone and classifier) gets no gradient, the fusion layers and the
    student do; its logits are the teacher's own classifier on the fused maps, detached."""
    task = proxy_task()
    student, teacher = task.trainable_module, task.teacher
    teacher.requires_grad_(True)  # undo freeze(): no gradient may reach it all the same (no_grad, detached classifier)
    head = student.shadow_heads[0]
    assert student.placement == 'teacher' and head.indices == (1, 2, 3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = task(x, y)
    assert {'kl_shadow_teacher', 'kl_shadow_cls', 'kl_cls_shadow'} <= set(out)
    out['loss'].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in head.parameters()) and student.model.fc.weight.grad is not None
    task.eval()
    with torch.no_grad():
        _, maps = teacher.model.forward_intermediates(x, indices=[1, 2, 3])
        fused = head.fuse5(head.fuse3(head.fuse1(maps[0]) + head.fuse2(maps[1])) + head.fuse4(maps[2]))
        by_hand = teacher.model.fc(fused.mean((2, 3)))
        _, proxy = task.teacher_outputs(x)
        _, (h,) = student.forward_heads(x, proxy)
    assert torch.allclose(h, by_hand, atol=1e-5)
    assert 'fc.weight' not in {n.split('shadow_heads.0.')[-1] for n, _ in student.named_parameters()}


def test_one_proxy_teacher_head_per_teacher_each_on_its_own_maps():
    task = proxy_task('extra_teachers=[{name: cifar_wrn_16_1}]')
    heads = task.trainable_module.shadow_heads
    assert len(heads) == 2 and heads[0].fuse1[0].in_channels == 16 and heads[1].fuse5[0].out_channels == 64
    out = task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert {'kl_shadow_teacher_0', 'kl_shadow_teacher_1', 'kl_cls_shadow_1'} <= set(out)


def test_the_proxy_head_refuses_a_method_without_a_teacher_and_maps_it_cannot_fuse():
    from shake_vit.core.config import ConfigError
    with pytest.raises(ConfigError, match="loss.method='none_both_heads' has no teacher"):
        build_student(load_config(None, [*PROXY, 'loss.method=none_both_heads']), 4)
    with pytest.raises(ConfigError, match='model.proxy_features is \\[1, 2\\]: three indices'):
        build_student(load_config(None, [*PROXY, 'model.proxy_features=[1,2]']), 4)
    with pytest.raises(ConfigError, match='are \\[\\(32, 16, 16\\), \\(16, 32, 32\\), \\(64, 8, 8\\)\\] at 32 px'):
        build_student(load_config(None, [*PROXY, 'model.proxy_features=[2,1,3]']), 4)
    with pytest.raises(ConfigError, match='deit_tiny_distilled_patch16_224 has a distillation token'):
        build_student(load_config(None, ['data.img_size=32', 'model.kwargs.patch_size=8', 'model.shadow_on=teacher',
                                         'teacher.name=cifar_resnet20']), 4)


def test_the_proxy_strides_come_from_the_maps_at_the_run_image_size():
    """timm's VGG in its CIFAR form pools less than its feature_info says: the strides follow the real maps."""
    from shake_vit.classification.models import proxy_spec
    t = load_config(None, ['teacher.name=vgg13_bn', 'teacher.cifar_stem=true']).teacher
    spec = proxy_spec(t, 10, 32)
    assert spec.channels == (512, 512, 512) and spec.strides == (2, 1)
    assert proxy_spec(load_config(None, ['teacher.name=resnet34']).teacher, 10, 224).strides == (2, 2)
