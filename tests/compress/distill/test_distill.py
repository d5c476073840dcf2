"""Knowledge distillation: hand-computed KD loss, a frozen teacher, hint adapters and layer errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from automl.compress.distill.loss import Distiller, distillation_loss, kd_loss, parse_hint, resolve_module
from automl.errors import ConfigError, UnknownNameError
from automl.tasks import get_task


def models(task, student_width=4, teacher_width=8):
    torch.manual_seed(0)
    return (task.build_model("cnn", {"width": student_width, "depth": 2}),
            task.build_model("cnn", {"width": teacher_width, "depth": 3}))


def test_kd_loss_hand_computed():
    # T = 2: teacher softmax([ln 3 / 2, 0]) = [r, 1 - r] with r = sqrt3 / (sqrt3 + 1); student uniform.
    r = math.sqrt(3) / (math.sqrt(3) + 1)
    kl = r * math.log(r / 0.5) + (1 - r) * math.log((1 - r) / 0.5)
    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    assert float(kd_loss(student, teacher, 2.0)) == pytest.approx(4 * kl, rel=1e-5)
    # batchmean: two identical rows give the same value; equal logits give zero
    assert float(kd_loss(student.repeat(2, 1), teacher.repeat(2, 1), 2.0)) == pytest.approx(4 * kl, rel=1e-5)
    assert float(kd_loss(teacher, teacher, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_distillation_loss_mixes_hard_and_soft():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    total = distillation_loss(s, t, y, temperature=3.0, alpha=0.25)
    expected = 0.75 * F.cross_entropy(s, y) + 0.25 * kd_loss(s, t, 3.0)
    assert torch.isclose(total, expected)
    assert torch.isclose(distillation_loss(s, t, y, temperature=3.0, alpha=0.0), F.cross_entropy(s, y))
    total.backward()
    assert s.grad.abs().sum() > 0


def test_teacher_frozen_and_unchanged_by_training(task):
    student, teacher = models(task)
    before = copy.deepcopy(teacher.state_dict())
    distiller = Distiller(student, teacher, temperature=4.0, alpha=0.7)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    teacher.train()  # a careless caller: the distiller re-asserts eval mode, so BN statistics stay put
    own_task = get_task("digits")
    own_task.loss = distiller.wrap_loss(own_task.loss)  # how a task's own training loop picks KD up
    opt = torch.optim.SGD(list(student.parameters()) + distiller.parameters(), lr=0.1)
    student_before = copy.deepcopy(student.state_dict())
    own_task.train_epoch(student, opt, own_task.train_loader(256, 0))
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(student_before["features.0.weight"], student.state_dict()["features.0.weight"])
    distiller.close()


def test_wrap_loss_equals_loss_on_the_same_batch(task):
    student, teacher = models(task)
    distiller = Distiller(student, teacher, temperature=2.0, alpha=0.5)
    x, y = task.splits["train"][0][:16], task.splits["train"][1][:16]
    logits = student(x)
    wrapped = distiller.wrap_loss()(logits, y)
    direct = distiller.loss(x, y, logits)
    expected = distillation_loss(logits, teacher(x), y, temperature=2.0, alpha=0.5)
    assert torch.isclose(wrapped, direct) and torch.isclose(direct, expected)


def test_hint_adapters_get_gradients(task):
    student, teacher = models(task)
    # Student block 0 output is 4 x 4 x 4 after pooling, teacher block 2 output is 16 x 2 x 2:
    # a 1x1 conv adapter for the width and adaptive pooling for the spatial size.
    distiller = Distiller(student, teacher, hints=["features.3=features.10", ("flatten", "flatten")],
                          hint_weight=2.0, example=task.example_input(2))
    conv, linear = distiller.adapters["0"].proj, distiller.adapters["1"].proj
    assert isinstance(conv, torch.nn.Conv2d) and (conv.in_channels, conv.out_channels) == (4, 16)
    assert isinstance(linear, torch.nn.Linear) and (linear.in_features, linear.out_features) == (8, 16)
    assert {id(p) for p in distiller.parameters()} == {id(conv.weight), id(linear.weight)}
    x, y = task.splits["train"][0][:8], task.splits["train"][1][:8]
    loss = distiller.loss(x, y, student(x))
    no_hint = distillation_loss(student(x), teacher(x), y, temperature=4.0, alpha=0.5)
    assert float(loss.detach()) > float(no_hint.detach())
    loss.backward()
    assert conv.weight.grad.abs().sum() > 0 and linear.weight.grad.abs().sum() > 0
    assert student.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_unknown_layer_lists_nearest_names(task):
    student, teacher = models(task)
    with pytest.raises(UnknownNameError) as info:
        Distiller(student, teacher, hints=["features.30=features.3"], example=task.example_input(2))
    message = str(info.value)
    assert "hints.0.student: layer name matches no module (got 'features.30')" in message
    assert "nearest module names: features.3" in message
    with pytest.raises(ConfigError, match="matches 2 modules"):
        resolve_module(teacher, "re:features\\.(0|4)")
    assert resolve_module(teacher, "re:module\\.head|head")[0] == "head"
    with pytest.raises(ConfigError, match="needs an example input"):
        Distiller(student, teacher, hints=["features.3=features.3"])


@pytest.mark.parametrize("spec", ["features.3", "a=b=c", ("a",), 5])
def test_bad_hint_specs(spec):
    with pytest.raises(ConfigError, match="student_layer=teacher_layer"):
        parse_hint(spec)


@pytest.mark.parametrize("kwargs,key", [({"temperature": 0.0}, "temperature"), ({"alpha": 1.5}, "alpha")])
def test_bad_settings(task, kwargs, key):
    student, teacher = models(task)
    with pytest.raises(ConfigError, match=f"distillation.{key}"):
        Distiller(student, teacher, **kwargs)
