"""Structural thinning through Torch-Pruning's DepGraph, and the resnet / mobilenetv2 families."""
import pytest
import torch
import torch.nn as nn

from automl.arch import ARCHS
from automl.compress.pruning.thinning import (coupled_groups, coupled_masks, group_channel_scores,
                                              mask_channels, thin, thin_from_masks)
from automl.errors import ConfigError, UnknownNameError
from automl.modelstats import count_macs, count_params
from automl.tasks import get_task


@pytest.fixture(scope="module")
def digits():
    return get_task("digits")


def randomise_bn(model):
    """Non-trivial BN statistics and affine terms, so exactness is not an accident of zeros."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def head_of(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def check_thinning(model, example, keep):
    """The shared contract: shape, fewer params and MACs, exact vs. masked, head intact, depthwise kept."""
    model = randomise_bn(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    thinned, masked = thin(model, example, keep), mask_channels(model, example, keep)
    with torch.no_grad():
        out, ref, orig = thinned(example), masked(example), model(example)
    assert out.shape == orig.shape
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert not torch.allclose(orig, ref, atol=1e-3)  # the masking really changed the function
    assert count_params(thinned) < count_params(model)
    assert count_macs(thinned, example) < count_macs(model, example)
    assert head_of(thinned).out_features == head_of(model).out_features
    for name, k in keep.items():
        layer = dict(thinned.named_modules())[name]
        assert (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features) == len(k)
    layers = dict(thinned.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == m.out_channels > 1:  # depthwise stays depthwise
            assert layers[name].groups == layers[name].in_channels == layers[name].out_channels
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # original untouched
    # The same removal from per-layer masks over every coupled layer gives the same model.
    with torch.no_grad():
        again = thin_from_masks(model, example, coupled_masks(model, example, keep))(example)
    assert torch.allclose(again, out, atol=1e-6)
    return thinned


# --- architecture families ------------------------------------------------------------------

@pytest.mark.parametrize("params", [{}, {"width": 4, "stages": 1, "blocks": 1}, {"width": 6, "stages": 4, "se": True},
                                    {"width": 3, "stages": 2, "blocks": 3, "se": True, "se_reduction": 8}])
def test_resnet_builds(digits, params):
    model = digits.build_model("resnet", params)
    assert model(digits.example_input(3)).shape == (3, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    width, stages, blocks = params.get("width", 16), params.get("stages", 3), params.get("blocks", 2)
    assert len(convs) == 1 + 2 * stages * blocks
    assert model.head.in_features == width * 2 ** (stages - 1)
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == (stages * blocks if params.get("se") else 0)


def test_resnet_projection_shortcuts_only_where_needed(digits):
    model = digits.build_model("resnet", {"width": 4, "stages": 4, "blocks": 2})
    projections = [n for n, m in model.named_modules() if n.endswith("shortcut.conv")]
    assert projections == ["stages.1.0.shortcut.conv", "stages.2.0.shortcut.conv", "stages.3.0.shortcut.conv"]
    strides = [model.stages[s][0].conv1.stride[0] for s in range(4)]
    assert strides == [1, 2, 2, 1]  # 8x8 -> 4x4 -> 2x2, then no further downsampling


@pytest.mark.parametrize("params, shape", [({}, (1, 8, 8)), ({"expansion": 1, "blocks": 1}, (1, 8, 8)),
                                           ({"width_mult": 0.5, "stem_stride": 2, "stages": 4}, (3, 32, 32)),
                                           ({"width_mult": 0.25, "expansion": 3}, (3, 32, 32))])
def test_mobilenetv2_builds(params, shape):
    model = ARCHS.get("mobilenetv2").build(params, shape, 7)
    assert model(torch.randn(2, *shape)).shape == (2, 7)
    dws = [m for n, m in model.named_modules() if n.endswith("depthwise.conv")]
    assert dws and all(m.groups == m.in_channels == m.out_channels for m in dws)
    expands = [n for n in dict(model.named_modules()) if n.endswith("expand.conv")]
    assert len(expands) == (0 if params.get("expansion") == 1 else len(dws))
    assert model.stages[0][0].residual  # stem and stage 0 share channels: residual from the first block


def test_new_families_reject_bad_params(digits):
    with pytest.raises(ConfigError, match=r"arch\.se"):
        digits.build_model("resnet", {"se": "yes"})
    with pytest.raises(ConfigError, match=r"arch\.stem_stride"):
        digits.build_model("mobilenetv2", {"stem_stride": 3})
    with pytest.raises(ConfigError, match=r"arch\.blokcs: unknown key"):
        digits.build_model("resnet", {"blokcs": 2})


# --- thinning: one model per coupling kind --------------------------------------------------

def test_thin_plain_cnn(digits):
    model = digits.build_model("cnn", {"width": 8, "depth": 3})
    check_thinning(model, digits.example_input(4), {"features.0": [0, 2, 4, 6], "features.4": list(range(0, 16, 2))})


def test_thin_resnet_projection_and_residual(digits):
    model = digits.build_model("resnet", {"width": 4, "stages": 3, "blocks": 2})
    keep = {"stem.conv": [1, 3], "stages.0.0.conv1": [0, 2], "stages.1.0.shortcut.conv": [0, 1, 2, 7],
            "stages.2.1.conv1": list(range(8))}
    thinned = check_thinning(model, digits.example_input(4), keep)
    s = thinned.stages
    # Residual-coupled layers all carry the stem's two channels; the projection's stage its four.
    assert {thinned.stem.bn.num_features, s[0][0].conv2.out_channels, s[0][1].conv2.out_channels,
            s[0][1].bn2.num_features, s[1][0].conv1.in_channels, s[1][0].shortcut.conv.in_channels} == {2}
    assert {s[1][0].conv2.out_channels, s[1][1].conv2.out_channels, s[1][0].shortcut.bn.num_features,
            s[2][0].conv1.in_channels} == {4}
    assert s[0][1].conv1.out_channels == 4  # untouched groups keep their width


def test_thin_resnet_with_squeeze_excitation(digits):
    model = digits.build_model("resnet", {"width": 4, "stages": 2, "blocks": 2, "se": True})
    keep = {"stem.conv": [0, 3], "stages.1.0.conv1": [1, 2, 5, 6], "stages.1.1.se.fc1": [1]}
    thinned = check_thinning(model, digits.example_input(4), keep)
    se = thinned.stages[0][1].se
    assert (se.fc1.in_channels, se.fc2.out_channels) == (2, 2)  # SE squeeze and excite follow the stream
    assert thinned.stages[1][1].se.fc2.in_channels == 1


def test_thin_mobilenetv2_depthwise_and_inverted_residual():
    torch.manual_seed(0)
    model = ARCHS.get("mobilenetv2").build({"width_mult": 0.5, "expansion": 4}, (3, 32, 32), 10)
    keep = {"stem.conv": [0, 2, 4, 6], "stages.0.0.expand.conv": list(range(0, 32, 2)),
            "stages.1.1.depthwise.conv": list(range(16)), "stages.2.0.project.conv": list(range(16))}
    thinned = check_thinning(model, torch.randn(2, 3, 32, 32), keep)
    b = thinned.stages[0][0]
    assert b.depthwise.conv.groups == b.depthwise.conv.out_channels == b.expand.conv.out_channels == 16
    assert thinned.stages[1][1].expand.conv.out_channels == 16  # the expand conv follows its depthwise
    assert {b.project.conv.out_channels, thinned.stages[0][1].project.conv.out_channels,
            thinned.stages[0][1].expand.conv.in_channels} == {4}  # residual with the stem


class CatGrouped(nn.Module):
    """Two branches concatenated, then a grouped conv (groups=2) reading one branch per group."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.g, self.bn_g = nn.Conv2d(16, 12, 3, padding=1, groups=2), nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.b(x))], 1)
        return self.head(torch.relu(self.bn_g(self.g(y))).mean((2, 3)))


def test_thin_concat_and_grouped_conv():
    torch.manual_seed(0)
    # Different local indices per group: Torch-Pruning alone slices the grouped conv wrongly here.
    keep = {"a": [0, 1, 5, 6], "b": [2, 3, 4, 7], "g": [0, 2, 4, 7, 9, 11]}
    thinned = check_thinning(CatGrouped(), torch.randn(2, 3, 16, 16), keep)
    assert (thinned.g.in_channels, thinned.g.out_channels, thinned.g.groups) == (8, 6, 2)
    assert thinned.g.weight.shape == (6, 4, 3, 3) and thinned.head.in_features == 6


def test_coupled_groups_describe_structure(digits):
    model = digits.build_model("resnet", {"width": 4, "stages": 2, "blocks": 2, "se": True})
    groups = {g.root: g for g in coupled_groups(model, digits.example_input(2))}
    stem = next(g for g in groups.values() if "stem.conv" in g.outputs)
    assert stem.channels == 4 and {"residual", "gating", "batchnorm"} <= set(stem.couplings)
    assert {"stem.bn", "stages.0.0.conv2", "stages.0.1.bn2", "stages.0.1.se.fc2"} <= set(stem.outputs)
    assert {"stages.0.0.conv1", "stages.0.0.se.fc1", "stages.1.0.shortcut.conv"} <= set(stem.inputs)
    assert all("head" not in g.outputs for g in groups.values())  # the classifier's outputs never prunable
    assert groups["stages.0.0.conv1"].outputs == ("stages.0.0.conv1", "stages.0.0.bn1")
    mobile = coupled_groups(ARCHS.get("mobilenetv2").build({"blocks": 1}, (3, 32, 32), 10), torch.randn(1, 3, 32, 32))
    dw = next(g for g in mobile if "stages.0.0.depthwise.conv" in g.outputs)
    assert "stages.0.0.expand.conv" in dw.outputs and "depthwise" in dw.couplings
    cat = {g.root: g for g in coupled_groups(CatGrouped(), torch.randn(1, 3, 8, 8))}
    assert {"concat", "grouped"} <= set(cat["b"].couplings) and cat["b"].inputs == ("g",)


def test_group_channel_scores_sum_member_norms():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1, bias=False),
                          nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
        model[1].weight.copy_(torch.tensor([0.5, -3.0]))
        model[2].weight.copy_(torch.tensor([4.0, -1.0]).view(1, 2, 1, 1))
    group = next(g for g in coupled_groups(model, torch.randn(1, 1, 2, 2)) if g.root == "0")
    assert group.outputs == ("0", "1") and group.inputs == ("2",)
    # filter |w| + |gamma| + consumer column |w|
    assert torch.allclose(group_channel_scores(group), torch.tensor([1 + 0.5 + 4, 2 + 3 + 1.0]))
    assert torch.allclose(group_channel_scores(group, "l2"), torch.tensor([1 + 0.5 + 4, 2 + 3 + 1.0]))
    with pytest.raises(ConfigError, match="criterion"):
        group_channel_scores(group, "l3")


def test_group_scores_rank_coupled_layers_together(digits):
    model = digits.build_model("resnet", {"width": 4, "stages": 1, "blocks": 2})
    group = next(g for g in coupled_groups(model, digits.example_input(2)) if "stem.conv" in g.outputs)
    with torch.no_grad():  # channel 2 zero in one member still scores; zero in every member scores 0
        model.stages[0][0].conv2.weight[2].zero_()
        assert group_channel_scores(group)[2] > 0
        for name in group.outputs + group.inputs:
            layer = dict(model.named_modules())[name]
            (layer.weight[:, 2] if name in group.inputs else layer.weight[2]).zero_()
    scores = group_channel_scores(group)
    assert scores[2] == 0 and (scores[[0, 1, 3]] > 0).all()


# --- errors ----------------------------------------------------------------------------------

def test_thin_errors(digits):
    model = digits.build_model("resnet", {"width": 4, "stages": 1, "blocks": 1})
    x = digits.example_input(2)
    with pytest.raises(UnknownNameError, match=r"stages\.0\.0\.conv1"):
        thin(model, x, {"stages.0.0.conv": [0]})
    with pytest.raises(ConfigError, match="keep no output channel"):
        thin(model, x, {"stages.0.0.conv1": []})
    with pytest.raises(ConfigError, match="keep no output channel"):
        thin(model, x, {"stages.0.0.conv1": [False] * 4})
    with pytest.raises(ConfigError, match="has 2 entries but the layer has 4"):
        thin(model, x, {"stages.0.0.conv1": [True, False]})
    with pytest.raises(ConfigError, match=r"distinct integers in \[0, 4\)"):
        thin(model, x, {"stages.0.0.conv1": [0, 4]})
    with pytest.raises(ConfigError, match="model's outputs"):
        thin(model, x, {"head": [0, 1]})
    with pytest.raises(ConfigError, match=r"coupled with \['stages.0.0.conv2'\]"):
        thin(model, x, {"stem.conv": [0, 1, 2, 3], "stages.0.0.conv2": [0, 1]})
    with pytest.raises(ConfigError, match="coupled layers have no mask"):
        thin_from_masks(model, x, {"stem.conv": torch.tensor([True, True, False, False])})
    with pytest.raises(ConfigError, match="same number of channels in every group"):
        thin(CatGrouped(), torch.randn(1, 3, 8, 8), {"a": [0, 1, 2, 3]})


def test_thin_keeps_training_mode_and_accepts_masks(digits):
    model = digits.build_model("cnn", {"width": 4, "depth": 2}).train()
    mask = torch.tensor([True, False, True, False])
    thinned = thin(model, digits.example_input(2), {"features.0": mask, "module.features.4": [3]})
    assert model.training and thinned.training  # Torch-Pruning's tracing switches to eval; we restore it
    assert thinned.features[0].out_channels == 2 and thinned.features[4].out_channels == 1
