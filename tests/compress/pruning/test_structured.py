"""The `structured` pruning method: masks per granularity, every criterion, coupled groups pruned
consistently, thinned == masked, real MAC drops, and a 2x MAC reduction end to end on digits."""
from itertools import islice

import pytest
import torch
import torch.nn as nn

from automl.compress import ApplyContext, get_method
from automl.compress.pruning.criteria import CRITERIA
from automl.compress.pruning.granularity import group_view, structure_count
from automl.compress.pruning.structured import StructuredPruning, StructuredPruningConfig
from automl.errors import ConfigError, UnknownNameError
from automl.modelstats import count_macs, count_params

CNN = {"width": 8, "depth": 3}
RESNET_SE = {"width": 4, "stages": 2, "blocks": 2, "se": True}
MOBILENET = {"width_mult": 0.5, "stages": 2, "blocks": 2, "expansion": 2}


def build(task, family, params):
    torch.manual_seed(0)
    model = task.build_model(family, params)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BN, so exactness is not an accident of zeros
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


def run(task, model, *, epochs=2, steps=3, start_epoch=0, finalize=True, **config):
    """prepare -> a few SGD steps per epoch -> finalize; returns (handler, masked model, final model)."""
    handler = StructuredPruning(StructuredPruningConfig(**config), start_epoch=start_epoch)
    ctx = ApplyContext(task=task, work_dir=None, epochs=epochs, seed=0, steps_per_epoch=steps)
    model = handler.prepare(model, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        handler.on_epoch_start(model, epoch, ctx)
        for x, y in islice(task.train_loader(batch_size=32, seed=epoch), steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            handler.after_step(model)
    return handler, model, (handler.finalize(model, ctx) if finalize else model)


def check_exact(task, masked, thinned):
    x = task.example_input(64)
    with torch.no_grad():
        ref, out = masked.eval()(x), thinned.eval()(x)
    assert out.shape == (64, 10)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def kept(model, name):
    m = dict(model.named_modules())[name]
    return m.out_channels if isinstance(m, nn.Conv2d) else m.num_features if isinstance(m, nn.BatchNorm2d) \
        else m.out_features


def test_registered(task):
    info = get_method("structured", category="pruning")
    assert info.handler_cls is StructuredPruning and info.config_cls is StructuredPruningConfig


# --- masks only: every granularity ---------------------------------------------------------------

@pytest.mark.parametrize("granularity, block, skipped", [
    ("kernel", "1x4", "head"), ("block", "2x4", "features.0"), ("filter", "1x4", "head"), ("row", "1x4", "head"),
    ("channel", "1x4", None), ("column", "1x4", None)])
def test_masks_only_granularities(task, granularity, block, skipped):
    model = build(task, "cnn", CNN)
    handler, _, _ = run(task, model, granularity=granularity, block=block, thin=False, ratio=0.5, finalize=False)
    cut = {"row": "filter", "column": "channel"}.get(granularity, granularity)
    masks = handler.masks.masks()
    assert set(masks) == {n for n in ("features.0", "features.4", "features.7", "head") if n != skipped}
    for name, mask in masks.items():
        weight = dict(model.named_modules())[name].weight
        assert mask.shape == weight.shape
        blk = (2, 4) if granularity == "block" else (1, 4)
        n = structure_count(weight.shape, cut, blk)
        assert int((~group_view(mask, cut, blk).any(1)).sum()) == round(0.5 * n) or n == 1
        assert (weight.detach()[~mask] == 0).all()
    out = handler.finalize(model, ApplyContext(task=task, work_dir=None, epochs=2))
    assert out is model and handler.stats["structured_speedup"] == "none (masks only)"
    assert handler.stats.get("structured_skipped") == skipped


def test_head_outputs_never_pruned(task):
    model = build(task, "cnn", CNN)
    with pytest.raises(ConfigError, match="model's outputs"):
        run(task, model, granularity="filter", thin=False, layers=("head",))
    with pytest.raises(ConfigError, match="no structure group to prune"):
        run(task, build(task, "cnn", CNN), granularity="filter", layers=("head",))
    with pytest.raises(UnknownNameError, match="nearest layer names: features"):
        run(task, build(task, "cnn", CNN), layers=("feature.4",))


@pytest.mark.parametrize("config, match", [
    ({"mac_reduction": 0.5}, "factor above 1"), ({"mac_reduction": 2.0, "thin": False}, "needs thinned channels"),
    ({"mac_reduction": 2.0, "granularity": "kernel"}, "needs thinned channels"), ({"block": "4by4"}, "HxW"),
    ({"criterion": "apoz", "granularity": "kernel"}, "scores output channels")])
def test_config_errors(task, config, match):
    with pytest.raises(ConfigError, match=match):
        run(task, build(task, "cnn", CNN), **config)


# --- thinned: criteria, coupling, exactness --------------------------------------------------------

@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_every_criterion_thins_exactly(task, criterion):
    model = build(task, "cnn", CNN)
    handler, masked, thinned = run(task, model, criterion=criterion, ratio=0.5, round_to=1)
    check_exact(task, masked, thinned)
    assert [kept(thinned, n) for n in ("features.0", "features.4", "features.7")] == [4, 8, 8]
    assert handler.stats["channels_kept"] == {"features.0": "4/8", "features.4": "8/16", "features.7": "8/16"}
    if criterion == "taylor":  # the calibration gradients are not left behind
        assert all(p.grad is None for p in masked.parameters())


def test_filter_and_channel_scores_read_their_side(task):
    model = build(task, "cnn", CNN)
    handler, _, _ = run(task, model, ratio=0.0, epochs=0, finalize=False)
    w4, w7 = model.features[4].weight.detach(), model.features[7].weight.detach()
    assert torch.allclose(handler._group_scores(model)["features.4"], w4.abs().sum((1, 2, 3)))
    handler, _, _ = run(task, model, ratio=0.0, epochs=0, finalize=False, granularity="channel", criterion="l2",
                        mode="dual")
    assert torch.allclose(handler._group_scores(model)["features.4"], w7.pow(2).sum((0, 2, 3)).sqrt())


def test_resnet_residual_and_se_groups_are_consistent(task):
    model = build(task, "resnet", RESNET_SE)
    handler, masked, _ = run(task, model, criterion="l1", ratio=0.5, round_to=1, finalize=False)
    stem = handler.units["stem.conv"]
    channel_keep = None
    for name, module, idxs, root in stem["producers"]:  # stem, every conv2/bn2 and SE fc2 on the stream
        keep = handler.masks.masks()[name].reshape(len(idxs), -1).any(1)
        channel_keep = keep if channel_keep is None else channel_keep
        assert torch.equal(keep, channel_keep), name
        if getattr(module, "bias", None) is not None:  # BN beta / conv bias of pruned channels are zero
            assert (module.bias.detach()[~keep] == 0).all()
    assert {"stem.bn", "stages.0.0.bn2", "stages.0.1.se.fc2"} <= {n for n, *_ in stem["producers"]}
    ctx = ApplyContext(task=task, work_dir=None, epochs=2)
    thinned = handler.finalize(masked, ctx)
    check_exact(task, masked, thinned)
    s = thinned.stages
    assert {thinned.stem.bn.num_features, s[0][0].conv2.out_channels, s[0][1].bn2.num_features,
            s[0][1].se.fc2.out_channels, s[0][1].se.fc1.in_channels, s[1][0].conv1.in_channels} == {2}
    assert count_params(thinned) < count_params(masked) and handler.stats["mac_reduction"] > 2


def test_mobilenetv2_depthwise_groups(task):
    model = build(task, "mobilenetv2", MOBILENET)
    handler, masked, thinned = run(task, model, criterion="fpgm", ratio=0.5, round_to=1)
    check_exact(task, masked, thinned)
    pairs = [(b, d) for s, t in zip(thinned.stages, masked.stages) for b, d in zip(s, t)]
    for block, dense in pairs:
        dw = block.depthwise.conv
        assert dw.groups == dw.in_channels == dw.out_channels == block.expand.conv.out_channels
        assert dw.out_channels == dense.depthwise.conv.out_channels // 2
    assert handler.stats["thinned_macs"] < handler.stats["dense_macs"]
    assert count_macs(thinned, task.example_input(1)) == handler.stats["thinned_macs"]


@pytest.mark.parametrize("mode", ["soft", "dual"])
def test_soft_and_dual_modes_stay_exact(task, mode):
    model = build(task, "resnet", RESNET_SE)
    handler, masked, thinned = run(task, model, criterion="taylor", mode=mode, schedule="iterative", ratio=0.5,
                                   round_to=1, ramp_epochs=2, finetune_epochs=2)
    check_exact(task, masked, thinned)
    assert handler.stats["pruning_events"] == 3


def test_channel_granularity_scores_the_consumers(task):
    model = build(task, "cnn", CNN)
    handler, masked, thinned = run(task, model, granularity="channel", criterion="l2", ratio=0.5, round_to=1,
                                   layers=("features.4",))
    check_exact(task, masked, thinned)  # features.4 reads features.0: that group is the one pruned
    assert (kept(thinned, "features.0"), kept(thinned, "features.4")) == (4, 16)


def test_layer_selection_and_per_layer_overrides(task):
    handler, masked, thinned = run(task, build(task, "cnn", CNN), ratio=0.5, round_to=1,
                                   layers=("features.0", "features.4"), per_layer={"features.4": 0.25})
    check_exact(task, masked, thinned)  # features.7's group touches no selected layer: left alone
    assert [kept(thinned, n) for n in ("features.0", "features.4", "features.7")] == [4, 12, 16]


def test_bn_scale_leaves_groups_without_bn(task):
    handler, masked, thinned = run(task, build(task, "resnet", RESNET_SE), criterion="bn_scale", ratio=0.5,
                                   round_to=1)
    check_exact(task, masked, thinned)
    assert "stages.1.0.se.fc1" in handler.stats["structured_skipped"]
    assert thinned.stages[1][0].se.fc1.out_channels == 2


def test_predicted_macs_match_the_thinned_model(task):
    model = build(task, "resnet", {"width": 8, "stages": 3, "blocks": 1, "se": True})
    handler, masked, thinned = run(task, model, allocation="global", mac_reduction=2.0, round_to=1)
    assert handler._predicted_macs(handler.last_keep) == handler.stats["thinned_macs"]
    assert handler.stats["mac_reduction"] == pytest.approx(2.0, rel=0.05)
    check_exact(task, masked, thinned)


def test_unreachable_mac_target_names_round_to(task):
    with pytest.raises(ConfigError, match=r"out of reach.*lower round_to \(16\)"):
        run(task, build(task, "resnet", RESNET_SE), mac_reduction=2.0)


def test_random_criterion_is_seeded(task):
    keeps = [run(task, build(task, "cnn", CNN), criterion="random", round_to=1)[0].last_keep for _ in range(2)]
    assert all(torch.equal(keeps[0][u], keeps[1][u]) for u in keeps[0])


def test_two_x_mac_reduction_trains_and_keeps_accuracy(task):
    from automl.recipe import Recipe
    from automl.recipe.apply import train_with_stages
    from automl.recipe.schema import Stage
    from automl.settings import TrainSettings

    arch, train = {"width": 32, "depth": 3}, TrainSettings(epochs=8, seed=0)
    config = StructuredPruningConfig(criterion="taylor", mac_reduction=2.0, finetune_epochs=3)
    ctx = ApplyContext(task=task, work_dir=None, epochs=8)
    dense, _ = train_with_stages(Recipe("digits", "cnn", arch, train=train), task, ctx)
    pruned, (handler,) = train_with_stages(Recipe("digits", "cnn", arch, train=train,
                                                  stages=(Stage("structured", config, 5),)), task, ctx)
    example = task.example_input(1)
    assert count_macs(dense, example) / count_macs(pruned, example) == pytest.approx(2.0, rel=0.02)
    assert [kept(pruned, n) % 16 for n in ("features.0", "features.4", "features.7")] == [0, 0, 0]
    val = task.val_loader()
    assert task.evaluate(pruned, val) >= max(0.97, task.evaluate(dense, val) - 0.015)
