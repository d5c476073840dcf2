"""Element-wise pruning methods through their handlers: levels, schedules, modes, per-layer overrides."""
import pytest
import torch
import torch.nn as nn

from automl.compress import ApplyContext, get_method
from automl.compress.pruning.elementwise import activation_site, threshold_masks, unit_activity
from automl.configs import parse_config
from automl.errors import ConfigError, UnknownNameError
from automl.validate import Where


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


class FakeTask:
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

    def train_loader(self, batch_size, seed):
        return [(self.x[i:i + batch_size], self.y[i:i + batch_size]) for i in range(0, len(self.x), batch_size)]


def handler(name, model, steps_per_epoch=10, start_epoch=0, epochs=10, **config):
    info = get_method(name)
    h = info.handler_cls(parse_config(info.config_cls, config, Where(key="config")), start_epoch=start_epoch)
    ctx = ApplyContext(task=FakeTask(), work_dir=".", epochs=epochs, steps_per_epoch=steps_per_epoch)
    return h, h.prepare(model, ctx), ctx


def sparsity(model):
    weights = [model.conv.weight, model.fc.weight]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run_epochs(h, model, ctx, epochs, steps, train=False):
    """Drive the lifecycle like the training loop does; returns sparsity after each epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = []
    for epoch in range(epochs):
        h.on_epoch_start(model, epoch, ctx)
        for _ in range(steps):
            if train:
                opt.zero_grad()
                model(torch.randn(8, 1, 4, 4)).pow(2).mean().backward()
                opt.step()
            h.after_step(model)
        out.append(round(sparsity(model), 3))
    return out


def test_threshold_masks_exact():
    w = torch.tensor([[0.5, -0.05], [0.01, -2.0]])
    assert threshold_masks({"a": w}, {"a": 0.1})["a"].tolist() == [[True, False], [False, True]]


def test_threshold_method_prunes_below_threshold(tmp_path):
    model = Net()
    h, model, ctx = handler("threshold", model, threshold=0.1)
    small = (model.conv.weight.abs() < 0.1).sum() + (model.fc.weight.abs() < 0.1).sum()
    h.finalize(model, ctx)
    assert int((model.conv.weight == 0).sum() + (model.fc.weight == 0).sum()) == int(small)
    assert (model.fc.weight[model.fc.weight != 0].abs() >= 0.1).all()


def test_sensitivity_threshold_is_s_times_std():
    model = Net()
    std = float(model.fc.weight.detach().std())
    expected = int((model.fc.weight.abs() < 0.8 * std).sum())
    h, model, ctx = handler("sensitivity", model, sensitivity=0.8, layers=["fc"])
    h.finalize(model, ctx)
    assert int((model.fc.weight == 0).sum()) == expected
    assert int((model.conv.weight == 0).sum()) == 0


def test_per_layer_overrides_the_level():
    model = Net()
    h, model, ctx = handler("magnitude", model, ratio=0.5, per_layer={"fc": 0.9})
    h.finalize(model, ctx)
    assert float((model.fc.weight == 0).float().mean()) == pytest.approx(0.9, abs=0.01)
    assert float((model.conv.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.03)


def test_per_layer_outside_selection_and_no_match():
    with pytest.raises(ConfigError, match="per_layer names a layer this method does not prune"):
        handler("magnitude", Net(), layers=["conv"], per_layer={"fc": 0.5})
    with pytest.raises(UnknownNameError, match="nearest layer names: fc"):
        handler("magnitude", Net(), per_layer={"fcc": 0.5})
    with pytest.raises(ConfigError, match=r"per_layer\.conv: a pruning ratio must be in \[0, 1\)"):
        handler("magnitude", Net(), per_layer={"conv": 1.5})


def test_layer_pattern_matching_nothing_lists_nearest():
    with pytest.raises(UnknownNameError, match="layer pattern matches no prunable layer.*nearest layer names: conv"):
        handler("magnitude", Net(), layers=["con"])


def test_one_shot_prunes_at_start_epoch_only():
    model = Net()
    h, model, ctx = handler("magnitude", model, start_epoch=2, ratio=0.5)
    assert run_epochs(h, model, ctx, 4, 3) == [0.0, 0.0, 0.5, 0.5]


def test_iterative_steps_remove_same_share_of_what_is_left():
    model = Net()
    h, model, ctx = handler("magnitude", model, start_epoch=1, ratio=0.875, schedule="iterative", iterations=3,
                            ramp_epochs=3, finetune_epochs=4, steps_per_epoch=5)
    # keep 1/2 per iteration: 0.5, 0.75, 0.875 at the start of epochs 1, 2, 3
    assert run_epochs(h, model, ctx, 5, 5) == pytest.approx([0.0, 0.5, 0.75, 0.875, 0.875], abs=0.003)


def test_agp_follows_the_cubic_ramp():
    model = Net()
    h, model, ctx = handler("agp", model, start_epoch=0, ratio=0.8, ramp_epochs=2, finetune_epochs=3,
                            agp_every=5, steps_per_epoch=10)
    seen = []
    for epoch in range(3):
        h.on_epoch_start(model, epoch, ctx)
        for _ in range(10):
            h.after_step(model)
            seen.append(round(sparsity(model), 2))
    # updates at steps 5, 10, 15 of a 20-step ramp: s = 0.8 * (1 - (1 - t/20)^3), then 0.8
    expected = [0.8 * (1 - (1 - t / 20) ** 3) for t in (5, 10, 15)]
    assert seen[4] == pytest.approx(expected[0], abs=0.02)
    assert seen[9] == pytest.approx(expected[1], abs=0.02)
    assert seen[14] == pytest.approx(expected[2], abs=0.02)
    assert seen[19:] == [pytest.approx(0.8, abs=0.01)] * 11
    assert seen == sorted(seen)


def test_ramp_is_capped_at_finetune_epochs():
    model = Net()
    h, model, ctx = handler("agp", model, start_epoch=0, ratio=0.5, ramp_epochs=50, finetune_epochs=1,
                            agp_every=1, steps_per_epoch=4)
    run_epochs(h, model, ctx, 1, 4)
    assert h.progress() == 1.0


@pytest.mark.parametrize("mode, regrows", [("hard", False), ("soft", True), ("dual", True)])
def test_regrowth_only_in_soft_and_dual_mode(mode, regrows):
    model = Net()
    h, model, ctx = handler("magnitude", model, start_epoch=0, ratio=0.5, mode=mode)
    torch.manual_seed(3)
    run_epochs(h, model, ctx, 4, 5, train=True)
    assert (h.regrown > 0) == regrows
    h.finalize(model, ctx)
    assert sparsity(model) == pytest.approx(0.5, abs=0.01)
    if mode != "hard":
        assert h.stats["regrown_weights"] == h.regrown


def test_hard_mode_keeps_pruned_weights_zero_while_training():
    model = Net()
    h, model, ctx = handler("magnitude", model, start_epoch=0, ratio=0.6)
    h.on_epoch_start(model, 0, ctx)
    zeros = model.fc.weight == 0
    run_epochs(h, model, ctx, 2, 5, train=True)
    assert (model.fc.weight[zeros] == 0).all()


def test_activation_site_follows_bn_and_relu():
    model = Net()
    assert activation_site(model, "conv") is model.relu
    assert activation_site(model, "fc") is model.fc
    seq = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1))
    assert activation_site(seq, "0") is seq[2]
    assert activation_site(seq, "3") is seq[3]


def test_activation_pruning_drops_weights_into_dead_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(torch.tensor([0.0, -100.0, 0.0]))  # unit 1 never fires
        model[0].weight[1] = 5.0  # ... though its weights are the largest
    task = FakeTask()
    task.x = torch.rand(64, 4)
    activity = unit_activity(model, {"0": model[0]}, [(task.x, None)])
    assert activity["0"][1] == 0.0 and activity["0"][0] == 1.0
    info = get_method("activation")
    h = info.handler_cls(info.config_cls(ratio=1 / 3, layers=("0",)), start_epoch=0)
    ctx = ApplyContext(task=task, work_dir=".", epochs=1, steps_per_epoch=1)
    model = h.prepare(model, ctx)
    h.finalize(model, ctx)
    assert (model[0].weight[1] == 0).all()  # 4 of 12 pruned: exactly the dead unit's, the largest |w|
    assert int((model[0].weight == 0).sum()) == 4


def test_energy_allocation_spares_the_sensitive_layer():
    from automl.tasks import get_task

    task = get_task("digits")

    def kept(sensitivity):
        model = task.build_model("cnn", {"width": 32, "depth": 3, "pooling": "stride"})
        info = get_method("structured")
        config = parse_config(info.config_cls, {"ratio": 0.4, "allocation": "energy", "round_to": 1, "thin": False,
                                                "layer_sensitivity": sensitivity}, Where())
        h = info.handler_cls(config, start_epoch=0)
        ctx = ApplyContext(task=task, work_dir=".", epochs=1, steps_per_epoch=1)
        model = h.prepare(model, ctx)
        h.finalize(model, ctx)
        w = model.features[3].weight.detach()
        return int((w.flatten(1).abs().sum(1) > 0).sum())

    assert kept({"features.3": 10.0, "features.6": 0.1}) > kept({"features.3": 0.1, "features.6": 10.0})
    with pytest.raises(UnknownNameError, match="layer_sensitivity"):
        kept({"features.33": 1.0})
