"""The `structured` method with thinning on graph constructs of third-party model zoos, each rebuilt
tiny here: channel shuffle, ghost modules (cat + slice), grouped convs, dense concat, squeeze-
excitation, inverted residuals, Linear heads. Thinned == masked, MAC targets met (or refused at
prepare), unprunable constructs skipped or refused by name, ONNX export of the thinned model."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress import ApplyContext
from automl.compress.pruning.structured import StructuredPruning, StructuredPruningConfig
from automl.errors import ConfigError
from automl.modelstats import count_macs
from automl.tasks import get_task


@pytest.fixture(scope="module")
def task32():
    return get_task("digits32")


def cbr(cin, cout, k=1, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class Head(nn.Module):
    def __init__(self, c, classes=10):
        super().__init__()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleV2(nn.Module):
    """ShuffleNetV2 units: chunk, a branch, concat, channel shuffle."""

    def __init__(self, c=32):
        super().__init__()
        self.stem = cbr(3, c, 3, 2)
        self.branches = nn.ModuleList(nn.Sequential(cbr(c // 2, c, 1), cbr(c, c, 3, groups=c, act=False),
                                                    cbr(c, c // 2, 1)) for _ in range(2))
        self.last, self.head = cbr(c, 64, 1), Head(64)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            a, b = x.chunk(2, dim=1)
            x = shuffle(torch.cat([a, branch(b)], 1), 2)
        return self.head(self.last(x))


class Ghost(nn.Module):
    """GhostNet's ghost module: a conv, a cheap depthwise conv of its output, both concatenated and
    sliced to ``out`` channels (a real cut when ``out`` is odd)."""

    def __init__(self, cin, out):
        super().__init__()
        self.out, half = out, (out + 1) // 2
        self.primary, self.cheap = cbr(cin, half, 1), cbr(half, half, 3, groups=half)

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)[:, :self.out]


class GhostNet(nn.Module):
    def __init__(self, c=32, odd=False):
        super().__init__()
        self.stem = cbr(3, c, 3, 2)
        self.g1, self.g2 = Ghost(c, 2 * c), Ghost(2 * c, c)
        self.g3 = Ghost(c, c + 1 if odd else c)  # odd: the slice drops the cheap conv's last channel
        self.last, self.head = cbr(c + 1 if odd else c, 64), Head(64)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.g2(self.g1(x))
        return self.head(self.last(self.g3(x)))


class Grouped(nn.Module):
    """RegNet/ResNeXt bottlenecks: 1x1, grouped 3x3, 1x1, residual; a Linear head."""

    def __init__(self, c=32, mid=128, groups=4):
        super().__init__()
        self.stem = cbr(3, c, 3, 2)
        self.blocks = nn.ModuleList(nn.Sequential(cbr(c, mid), cbr(mid, mid, 3, groups=groups), cbr(mid, c, act=False))
                                    for _ in range(2))
        self.head = Head(c)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = F.relu(x + b(x))
        return self.head(x)


class Dense(nn.Module):
    """A DenseNet block (pre-activation, growth 12: not a multiple of 16) and a transition."""

    def __init__(self, c=24, growth=12, layers=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 2, 1, bias=False)
        self.layers = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(),
                                                  nn.Conv2d(c + i * growth, growth, 3, 1, 1, bias=False))
                                    for i in range(layers))
        out = c + layers * growth
        self.trans = nn.Sequential(nn.BatchNorm2d(out), nn.ReLU(), nn.Conv2d(out, 32, 1, bias=False), nn.AvgPool2d(2))
        self.head = Head(32)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.head(self.trans(x))


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedSE(nn.Module):
    """MobileNetV2/EfficientNet blocks: expand, depthwise, SE, project, residual; Linear head."""

    def __init__(self, c=16, expand=4):
        super().__init__()
        self.stem = cbr(3, c, 3, 2)
        mid = c * expand
        self.blocks = nn.ModuleList(nn.Sequential(cbr(c, mid), cbr(mid, mid, 3, groups=mid), SE(mid),
                                                  cbr(mid, c, act=False)) for _ in range(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


class MixConv(nn.Module):
    """MixNet's mixed depthwise conv: the input split by sizes the module keeps in a Python list (a
    thinned input would no longer sum to them), one depthwise kernel size per piece, concatenated."""

    def __init__(self, c=32):
        super().__init__()
        self.stem, self.sizes = cbr(3, c, 3, 2), [c // 2, c // 2]
        self.mix = nn.ModuleList(cbr(n, n, k, groups=n) for n, k in zip(self.sizes, (3, 5)))
        self.inner, self.head = cbr(c, 2 * c), Head(2 * c)

    def forward(self, x):
        pieces = torch.split(self.stem(x), self.sizes, dim=1)
        return self.head(self.inner(torch.cat([m(p) for m, p in zip(self.mix, pieces)], 1)))


GRAPHS = {"shuffle": ShuffleV2, "ghost": GhostNet, "grouped": Grouped, "dense": Dense, "inverted_se": InvertedSE}


def build(name, **kw):
    torch.manual_seed(0)
    model = GRAPHS[name](**kw)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BN, so exactness is not an accident of zeros
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


def run(task, model, **config):
    """prepare -> one pruning event -> finalize; returns (handler, masked model, thinned model)."""
    handler = StructuredPruning(StructuredPruningConfig(finetune_epochs=1, **config), start_epoch=0)
    ctx = ApplyContext(task=task, work_dir=None, epochs=1, seed=0, steps_per_epoch=1)
    model = handler.prepare(model, ctx)
    handler.on_epoch_start(model, 0, ctx)
    return handler, model, handler.finalize(model, ctx)


def check(task, handler, masked, thinned, target):
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = masked.eval()(x), thinned.eval()(x)
    assert out.shape == (8, 10)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    stats, example = handler.stats, task.example_input(1)
    assert stats["mac_reduction"] == pytest.approx(count_macs(masked, example) / count_macs(thinned, example))
    assert target * 0.98 <= stats["mac_reduction"] <= target * 1.2
    assert handler._predicted_macs(handler.last_keep) == stats["thinned_macs"]
    assert stats["thinned_parity"] < 1e-4


@pytest.mark.parametrize("round_to", [1, 16])
@pytest.mark.parametrize("name", list(GRAPHS))
def test_thinning_meets_the_mac_target_exactly(task32, name, round_to):
    handler, masked, thinned = run(task32, build(name), mac_reduction=1.6, round_to=round_to)
    check(task32, handler, masked, thinned, 1.6)
    assert isinstance(handler.stats["structured_groups_skipped"], int)


def test_channel_shuffle_groups_are_skipped_with_the_reason(task32):
    handler, masked, thinned = run(task32, build("shuffle"), mac_reduction=1.5, round_to=1)
    check(task32, handler, masked, thinned, 1.5)
    assert handler.stats["structured_groups_skipped"] >= 1
    assert "channel shuffle" in handler.stats["structured_skipped"]
    # the branch's inner channels do not cross the shuffle: they are thinned
    assert thinned.branches[0][0][0].out_channels < 32


def test_naming_a_layer_that_cannot_be_thinned_is_refused_at_prepare(task32):
    handler = StructuredPruning(StructuredPruningConfig(layers=("branches.0.2.0",), ratio=0.5))
    with pytest.raises(ConfigError, match=r"branches\.0\.2\.0.*cannot be thinned.*channel shuffle.*`layers`"):
        handler.prepare(build("shuffle"), ApplyContext(task=task32, work_dir=None, epochs=1))
    assert handler.state == "new"


def test_ghost_module_halves_are_one_decision(task32):
    handler, masked, thinned = run(task32, build("ghost"), ratio=0.5, round_to=1)
    check(task32, handler, masked, thinned, handler.stats["mac_reduction"])
    g = thinned.g1
    assert g.primary[0].out_channels == g.cheap[0].out_channels == g.cheap[0].groups < 32
    assert thinned.g2.primary[0].in_channels == 2 * g.primary[0].out_channels
    assert handler.stats["structured_groups_skipped"] == 0


def test_ghost_slice_that_cuts_channels_is_left_whole(task32):
    handler, masked, thinned = run(task32, build("ghost", odd=True), ratio=0.5, round_to=1)
    check(task32, handler, masked, thinned, handler.stats["mac_reduction"])
    assert "channel slice" in handler.stats["structured_skipped"]
    assert thinned.g3.primary[0].out_channels == 17 and thinned.last[0].in_channels == 33


def test_split_by_stored_sizes_is_left_whole_not_a_crash(task32):
    handler, masked, thinned = run(task32, MixConv(), ratio=0.5, round_to=1)
    check(task32, handler, masked, thinned, handler.stats["mac_reduction"])
    assert "differs from the masked one" in handler.stats["structured_skipped"]
    assert thinned.stem[0].out_channels == 32 and thinned.inner[0].out_channels < 64


def test_grouped_convs_stay_balanced_on_the_grid(task32):
    handler, masked, thinned = run(task32, build("grouped"), mac_reduction=1.6, round_to=16)
    check(task32, handler, masked, thinned, 1.6)
    for block in thinned.blocks:
        conv = block[1][0]
        assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
        # 128 channels in 4 groups of 32: each group keeps a multiple of 16
        assert (conv.in_channels // 4) % 16 == 0 and (conv.out_channels // 4) % 16 == 0


def test_channel_counts_off_the_grid_keep_their_alignment(task32):
    handler, masked, thinned = run(task32, build("dense"), mac_reduction=1.5, round_to=16)
    check(task32, handler, masked, thinned, 1.5)
    growth = [layer[2].out_channels for layer in thinned.layers]
    assert all(g % 4 == 0 for g in growth) and min(growth) < 12  # 12 = 3 x 4: multiples of gcd(12, 16)
    assert thinned.stem.out_channels % 8 == 0  # 24: multiples of 8


def test_grid_finer_than_the_groups_is_refused_at_prepare(task32):
    # 64 channels in 4 groups of 16: on a 16-channel grid a group keeps all or nothing
    with pytest.raises(ConfigError, match=r"mac_reduction 1\.6 is out of reach: pruning at level 0\.9 reduces MACs "
                                          r"only 1\.\d+x.*lower round_to \(16\)"):
        run(task32, build("grouped", mid=64), mac_reduction=1.6, round_to=16)
    handler, masked, thinned = run(task32, build("grouped", mid=64), mac_reduction=1.6, round_to=4)
    check(task32, handler, masked, thinned, 1.6)


def test_unreachable_target_is_refused_at_prepare(task32):
    handler = StructuredPruning(StructuredPruningConfig(mac_reduction=50.0, round_to=16))
    with pytest.raises(ConfigError, match=r"mac_reduction 50 is out of reach.*only \d+\.\d+x.*set mac_reduction to "
                                          r"at most \d+\.\d+.*lower round_to \(16\)"):
        handler.prepare(build("inverted_se"), ApplyContext(task=task32, work_dir=None, epochs=1))
    assert handler.state == "new"  # before any training


def test_masks_only_path_reports_no_mac_reduction(task32):
    handler, _, _ = run(task32, build("inverted_se"), thin=False, granularity="kernel", ratio=0.5)
    assert handler.stats["mac_reduction"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GRAPHS))
def test_thinned_models_export_to_onnx(task32, name, tmp_path):
    pytest.importorskip("onnxscript")
    import numpy as np

    from automl.runtime import OrtModel, export_onnx

    _, _, thinned = run(task32, build(name), mac_reduction=1.6, round_to=16)
    x = torch.randn(2, 3, 32, 32)
    artifact = export_onnx(thinned, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    with torch.no_grad():
        ref = thinned.eval()(x).numpy()
    assert np.allclose(OrtModel(artifact.path)(x), ref, atol=1e-4)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A task whose samples are feature vectors (N, 64), as an npz of a user's tabular data."""
    import numpy as np
    from sklearn.datasets import load_digits

    from automl.tasks.data import data_task, parse_data
    from automl.validate import Where

    digits = load_digits()
    path = tmp_path_factory.mktemp("features") / "digits.npz"
    np.savez(path, x=(digits.data / 16).astype(np.float32), y=digits.target)
    return data_task(parse_data({"path": str(path)}, Where("test", "data")))


def test_mlp_on_feature_vectors_is_thinned(features):
    # traced on a batch (N, 64), not on one unbatched sample, so Linear outputs are channels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=False), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 64, bias=False),
                          nn.GELU(), nn.Linear(64, 10))
    handler, masked, thinned = run(features, model, mac_reduction=1.6, round_to=16)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.allclose(masked.eval()(x), thinned.eval()(x), atol=1e-5)
    assert handler.stats["structured_groups_skipped"] == 0
    assert thinned[0].out_features < 128 and thinned[3].out_features < 64
    assert handler.stats["mac_reduction"] >= 1.6 * 0.98


class TokenMLP(nn.Module):
    """A transformer block's MLP on tokens (N, L, C): each Linear runs as view -> addmm -> view."""

    def __init__(self, d=32):
        super().__init__()
        self.patch, self.norm = nn.Conv2d(3, d, 8, 8), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.mlp(self.norm(x))
        return self.head(x.mean(1))


def test_a_transformer_mlp_on_tokens_is_thinned(task32):
    torch.manual_seed(0)
    handler, masked, thinned = run(task32, TokenMLP(), ratio=0.5, round_to=16)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(masked.eval()(x), thinned.eval()(x), atol=1e-5)
    assert thinned.mlp[0].out_features == thinned.mlp[2].in_features < 128
    assert handler.stats["mac_reduction"] > 1.0


class WidthLinear(nn.Module):
    """A Linear over a conv's last spatial dim: its view keeps the last dim, which is not the channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = cbr(3, 16, 3), cbr(16, 16, 3)
        self.across, self.head = nn.Linear(32, 8), nn.Linear(16 * 32 * 8, 10)

    def forward(self, x):
        return self.head(self.across(self.c2(self.c1(x))).flatten(1))


def test_a_linear_over_a_conv_width_leaves_the_conv_channels_whole(task32):
    handler, masked, thinned = run(task32, WidthLinear(), ratio=0.5, round_to=1)
    check(task32, handler, masked, thinned, handler.stats["mac_reduction"])
    assert "moves channels" in handler.stats["structured_skipped"]
    assert thinned.c2[0].out_channels == 16 and thinned.c1[0].out_channels < 16
