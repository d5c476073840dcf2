"""Masks: hard masks stay zero, soft and dual masks let pruned weights grow back, remove() is permanent."""
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from automl.compress.pruning.criteria import l1_norm, rank_to_keep
from automl.compress.pruning.granularity import expand_mask, group_view
from automl.compress.pruning.masks import MaskSet
from automl.errors import ConfigError, LifecycleError, UnknownNameError


def fc(values=(1.0, 2.0, 3.0, 4.0)):
    layer = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    return layer


def magnitude_event(masks: MaskSet, ratio=0.5):
    """One pruning event: rank the dense weights element-wise and install the new masks."""
    new = {}
    for name, w in masks.dense_weights().items():
        keep = rank_to_keep(l1_norm(group_view(w, "element")), ratio)
        new[name] = expand_mask(keep, w.shape, "element")
    masks.update(new)


def push_first_weight(layer, masks, opt):
    """One SGD step (lr 1) whose gradient on the effective weight is [-10, 0, 0, 0]."""
    opt.zero_grad()
    (-10 * layer(torch.tensor([[1.0, 0.0, 0.0, 0.0]])).sum()).backward()
    opt.step()
    masks.after_step()


@pytest.mark.parametrize("mode, after_event2, grows_back", [
    ("hard", [0.0, 0.0, 3.0, 4.0], False),
    ("soft", [10.0, 0.0, 0.0, 4.0], True),    # 0 -> 10 by training, beats 3 at event 2
    ("dual", [11.0, 0.0, 0.0, 4.0], True),    # dense copy 1 -> 11 while masked
])
def test_regrowth_by_mode(mode, after_event2, grows_back):
    layer = fc()
    masks = MaskSet({"fc": layer}, mode=mode)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    magnitude_event(masks)
    assert layer.weight.detach()[0].tolist() == [0.0, 0.0, 3.0, 4.0]
    push_first_weight(layer, masks, opt)
    magnitude_event(masks)
    assert layer.weight.detach()[0].tolist() == after_event2
    assert masks.masks()["fc"][0, 0].item() is grows_back


def test_hard_mask_never_regrows_even_when_asked():
    layer = fc()
    masks = MaskSet({"fc": layer}, mode="hard")
    masks.update({"fc": torch.tensor([[False, False, True, True]])})
    masks.update({"fc": torch.tensor([[True, False, False, True]])})   # asks index 0 back
    assert masks.masks()["fc"].tolist() == [[False, False, False, True]]
    assert layer.weight.detach().tolist() == [[0.0, 0.0, 0.0, 4.0]]


def test_hard_zeros_survive_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    masks = MaskSet({"0": model[0], "2": model[2]}, mode="hard")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    magnitude_event(masks, 0.6)
    pruned = {n: ~m for n, m in masks.masks().items()}
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        masks.after_step()
    assert model[0].weight[pruned["0"]].abs().sum() == 0 and model[2].weight[pruned["2"]].abs().sum() == 0
    assert model[0].weight[~pruned["0"]].ne(0).all()


def test_dual_forward_masks_and_gradient_is_straight_through():
    layer = fc()
    original = layer.weight
    masks = MaskSet({"fc": layer}, mode="dual")
    assert parametrize.is_parametrized(layer, "weight")
    assert layer.parametrizations.weight.original is original     # same Parameter: optimizers stay valid
    masks.update({"fc": torch.tensor([[False, False, True, True]])})
    y = layer(torch.ones(1, 4))
    assert y.item() == 7.0
    y.sum().backward()
    assert original.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]       # pruned entries get gradient too
    assert masks.dense_weights()["fc"].tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_sparsity_per_layer_and_overall():
    a, b = fc(), nn.Linear(2, 2, bias=False)
    masks = MaskSet({"a": a, "b": b}, mode="soft")
    assert masks.sparsity() == {"layers": {"a": 0.0, "b": 0.0}, "overall": 0.0}
    masks.update({"a": torch.tensor([[False, True, False, True]]),
                  "b": torch.tensor([[True, True], [False, True]])})
    assert masks.sparsity() == {"layers": {"a": 0.5, "b": 0.25}, "overall": 0.375}
    with torch.no_grad():
        a.weight.fill_(1.0)                          # soft: weights regrew between events
    assert masks.sparsity(effective=True)["layers"]["a"] == 0.0
    assert masks.sparsity()["layers"]["a"] == 0.5


@pytest.mark.parametrize("mode", ["hard", "soft", "dual"])
def test_remove_makes_permanent(mode):
    layer = fc()
    masks = MaskSet({"fc": layer}, mode=mode)
    masks.update({"fc": torch.tensor([[True, False, True, False]])})
    masks.remove()
    assert not parametrize.is_parametrized(layer)
    assert isinstance(layer.weight, nn.Parameter)
    assert layer.weight.detach().tolist() == [[1.0, 0.0, 3.0, 0.0]]
    assert set(dict(layer.named_parameters())) == {"weight"}
    with pytest.raises(LifecycleError, match="after remove"):
        masks.update({"fc": torch.ones(1, 4, dtype=torch.bool)})


def test_dual_remove_without_permanence_restores_dense():
    layer = fc()
    masks = MaskSet({"fc": layer}, mode="dual")
    masks.update({"fc": torch.tensor([[True, False, True, False]])})
    masks.remove(make_permanent=False)
    assert layer.weight.detach().tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_errors():
    with pytest.raises(UnknownNameError, match="did you mean 'soft'"):
        MaskSet({"fc": fc()}, mode="sotf")
    masks = MaskSet({"fc": fc()})
    with pytest.raises(UnknownNameError, match="valid names: fc"):
        masks.update({"fc2": torch.ones(1, 4, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="mask shape differs"):
        masks.update({"fc": torch.ones(4, dtype=torch.bool)})
    first = fc()
    with pytest.raises(ConfigError, match="no weight tensor"):
        MaskSet({"fc": first, "relu": nn.ReLU()}, mode="dual")
    assert not parametrize.is_parametrized(first)          # a failed MaskSet leaves the model as it was
    layer = fc()
    MaskSet({"fc": layer}, mode="dual")
    with pytest.raises(ConfigError, match="already parametrized"):
        MaskSet({"fc": layer}, mode="dual")
