"""Ghost modules from trained convolutions: the module keeps the layer's shape and first filters, the
least-squares cheap filters reproduce ghost channels that are cheap functions of primary ones, MACs
drop to about 1/ratio, and the `ghost` method runs end to end, refusing what it cannot replace."""
import pytest
import torch
import torch.nn as nn

from automl.compress import get_method
from automl.compress.factorization.ghost import GhostConv, build_ghost, conv_macs, fit_cheap, unsupported
from automl.configs import parse_config
from automl.errors import ConfigError
from automl.modelstats import count_macs
from automl.recipe import Recipe, apply_recipe
from automl.tasks import get_task
from automl.validate import Where


@pytest.mark.parametrize("out_channels, ratio", [(8, 2), (7, 2), (9, 3)])
def test_a_ghost_module_keeps_the_shape_and_the_primary_filters(out_channels, ratio):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, out_channels, 3, stride=2, padding=1)
    ghost = build_ghost(conv, ratio, 3)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        out, ref = ghost(x), conv(x)
    m = ghost.primary.out_channels
    assert out.shape == ref.shape and m == -(-out_channels // ratio)
    assert torch.allclose(out[:, :m], ref[:, :m], atol=1e-6)  # the kept filters
    assert ghost.cheap.groups == m and ghost.cheap.out_channels == m * (ratio - 1)


def test_cheap_filters_recover_ghost_channels_that_are_cheap_functions_of_primary_ones():
    """Channels 2 and 3 are a 3x3 blur and a scaled, shifted copy of channels 0 and 1: the fit finds them."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    x = torch.randn(64, 3, 10, 10)
    with torch.no_grad():
        primary = nn.functional.conv2d(x, conv.weight[:2], conv.bias[:2], padding=1)
        target = torch.cat([primary, nn.functional.conv2d(primary[:, :1], blur[None, None], padding=1),
                            -0.5 * primary[:, 1:] + 0.25], 1)
    probe = nn.Conv2d(3, 4, 3, padding=1)  # a "layer" computing exactly that target
    ghost = build_ghost(conv, 2, 3)

    class Target(nn.Module):
        def forward(self, inputs):
            return target if inputs is x else probe(inputs)
    error = fit_cheap(ghost, Target(), x)
    assert error < 1e-3
    assert torch.allclose(ghost.cheap.weight[0, 0], blur, atol=1e-3)
    assert ghost.cheap.bias[1].item() == pytest.approx(0.25, abs=1e-3)


def test_ghost_macs_are_about_one_over_ratio():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    ghost = build_ghost(conv, 2, 3)
    shape = (1, 16, 8, 8)
    assert conv_macs(conv, shape) == count_macs(nn.Sequential(conv), torch.zeros(shape))
    assert conv_macs(ghost, shape) == count_macs(nn.Sequential(ghost), torch.zeros(shape))
    assert 0.5 < conv_macs(ghost, shape) / conv_macs(conv, shape) < 0.55


def test_what_cannot_become_a_ghost_module_says_why():
    assert "depthwise" in unsupported(nn.Conv2d(8, 8, 3, groups=8), 2)
    assert "ratio" in unsupported(nn.Conv2d(8, 2, 3), 3)
    assert "Conv2d" in unsupported(nn.Linear(4, 4), 2)
    assert unsupported(nn.Conv2d(8, 8, 1), 2) is None


def recipe(stages, epochs=3, family="cnn"):
    arch = {"family": "cnn", "width": 16, "depth": 2} if family == "cnn" else {"family": "resnet", "width": 8}
    return Recipe.from_dict({"version": 1, "task": "digits", "arch": arch,
                             "train": {"epochs": epochs, "lr": 0.005, "seed": 0}, "stages": stages})


@pytest.mark.parametrize("family", ["cnn", "resnet"])
def test_the_ghost_method_replaces_trains_and_deploys(tmp_path, family):
    task = get_task("digits")
    dense = apply_recipe(recipe([], family=family), tmp_path / "dense", task=task)
    ghosted = apply_recipe(recipe([{"method": "ghost", "config": {"finetune_epochs": 1}}], family=family),
                           tmp_path / "ghost", task=task)
    m = ghosted.metrics
    assert m["ghost_layers"] >= 2 and 0.45 < m["ghost_mac_ratio"] < 0.6
    assert m["macs"] < 0.65 * dense.metrics["macs"]
    assert any(isinstance(mod, GhostConv) for mod in ghosted.model.modules())
    assert m["accuracy"] > 0.5  # trains from the replaced layers (3 epochs on digits)


def test_bad_ghost_configs_are_refused():
    info = get_method("ghost")
    handler = info.handler_cls(parse_config(info.config_cls, {"dw_kernel": 2}, Where(key="ghost")))
    task = get_task("digits")
    from automl.compress import ApplyContext
    ctx = ApplyContext(task=task, work_dir=None, epochs=1)
    with pytest.raises(ConfigError, match="kernel is odd"):
        handler.prepare(task.build_model("cnn", {"width": 8, "depth": 2}), ctx)
    config = {"ratio": 16, "layers": ["features.0"]}  # a layer with 8 output channels
    handler = info.handler_cls(parse_config(info.config_cls, config, Where(key="ghost")))
    with pytest.raises(ConfigError, match="no selected layer can become a ghost module"):
        handler.prepare(task.build_model("cnn", {"width": 8, "depth": 2}), ctx)
