"""Data-free quantization: CLE keeps the function and equalizes ranges; bias correction removes the mean error."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from automl.compress.quantization.datafree import (Chain, clipped_normal_mean, cross_layer_equalize,
                                                   datafree_quantize, equalize_pair, fake_quantize_weight,
                                                   find_chains)
from automl.errors import ConfigError
from automl.tasks import get_task


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


class SmallCNN(nn.Module):
    """conv -> relu -> maxpool -> depthwise conv -> relu -> flatten -> linear -> relu -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.dw(self.pool(self.relu(self.conv1(x)))))
        return self.fc2(torch.relu(self.fc1(self.flatten(x))))


def test_fake_quantize_weight_exact_values():
    w = torch.tensor([[1.0, -0.5], [0.2, 0.1]])
    scale = 1.0 / 127.5
    expected = torch.round(w / scale).clamp(-128, 127) * scale
    torch.testing.assert_close(fake_quantize_weight(w), expected)
    # Per channel: row 2 gets its own scale 0.2 / 127.5 (pt2e's symmetric observer; max lands on 127).
    assert fake_quantize_weight(w, per_channel=True)[1, 0].item() == pytest.approx(127 * 0.2 / 127.5, rel=1e-6)
    # 2 bits: levels -2..1 times max/1.5.
    levels = fake_quantize_weight(w, 2) / (2 / 3)
    torch.testing.assert_close(levels, torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    with pytest.raises(ConfigError, match="bits.*got 9"):
        fake_quantize_weight(w, 9)


def test_find_chains_small_cnn():
    gm = torch.fx.symbolic_trace(SmallCNN())
    chains = {(c.first, c.second): c for c in find_chains(gm)}
    assert set(chains) == {("conv1", "dw"), ("dw", "fc1"), ("fc1", "fc2")}
    assert chains[("conv1", "dw")] == Chain("conv1", "dw", relu=True, mean_known=False, repeat=1)
    assert chains[("dw", "fc1")].repeat == 16 and chains[("dw", "fc1")].relu


def test_find_chains_rejects_non_homogeneous_and_branches():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = torch.sigmoid(self.a(x))   # sigmoid does not commute with scaling
            y = self.b(h)
            return self.c(y) + self.d(y)   # b's output read twice

    assert find_chains(torch.fx.symbolic_trace(Net())) == []


def test_cle_preserves_small_cnn_and_equalizes_ranges():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():  # spread channel ranges widely
        model.conv1.weight.mul_(torch.tensor([0.01, 1.0, 30.0, 3.0])[:, None, None, None])
    gm, scales = cross_layer_equalize(model, iterations=50, tol=1e-9)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
    assert set(scales) == {"conv1", "dw", "fc1"}
    r1 = gm.conv1.weight.abs().flatten(1).amax(1)
    r2 = gm.dw.weight.abs().flatten(1).amax(1)  # depthwise: input channel i is filter i
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)


def test_equalize_pair_makes_ranges_equal_sqrt_product():
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 5, 3), nn.Conv2d(5, 2, 1)
    r1 = first.weight.abs().flatten(1).amax(1)
    r2 = second.weight.abs().amax(dim=(0, 2, 3))
    s = equalize_pair(first, second)
    torch.testing.assert_close(s, torch.sqrt(r1 * r2) / r2)
    torch.testing.assert_close(first.weight.abs().flatten(1).amax(1), torch.sqrt(r1 * r2))
    torch.testing.assert_close(second.weight.abs().amax(dim=(0, 2, 3)), torch.sqrt(r1 * r2))


@pytest.mark.parametrize("family,params", [("cnn", {"width": 8, "depth": 3}),
                                           ("cnn", {"width": 6, "depth": 4, "pooling": "avg"}),
                                           ("resnet", {"width": 8, "stages": 2, "blocks": 1, "se": True})])
def test_cle_preserves_digits_models_after_bn_folding(family, params):
    torch.manual_seed(0)
    model = _randomise_bn(get_task("digits").build_model(family, params))
    gm, scales = cross_layer_equalize(model)
    assert scales and not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_clipped_normal_mean():
    mean = torch.tensor([0.0, 1.0, -2.0, 3.0])
    std = torch.tensor([1.0, 2.0, 0.5, 0.0])
    got = clipped_normal_mean(mean, std)
    assert got[0].item() == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-6)
    assert got[3].item() == 3.0
    torch.manual_seed(0)
    z = torch.randn(400_000, 1) * std[:3] + mean[:3]
    torch.testing.assert_close(got[:3], torch.relu(z).mean(0), atol=5e-3, rtol=0)


def _bn_net():
    """fc1 -> BN -> ReLU -> fc2, with BN statistics that match Gaussian inputs exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(20_000, 8)
    with torch.no_grad():
        h = net[0](x)
        net[1].running_mean.copy_(h.mean(0))
        net[1].running_var.copy_(h.var(0))
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(0.5, 2.0)  # positive means: a biased quantization error shows
    return net.eval(), x


def test_bias_correction_data_free_removes_mean_error():
    net, x = _bn_net()
    plain, _ = datafree_quantize(net, bits=3, equalize=False, correct_bias=False)
    fixed, report = datafree_quantize(net, bits=3, equalize=False, correct_bias=True)
    assert report.corrected == {"3": "data_free"}
    with torch.no_grad():
        ref = net(x)
        before = (plain(x) - ref).mean(0).abs().mean().item()
        after = (fixed(x) - ref).mean(0).abs().mean().item()
    assert before > 0.02
    assert after < 0.2 * before


def test_bias_correction_empirical_without_bn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 4)).eval()
    x = torch.randn(512, 16) + 2.0  # non-zero input mean, no BN to tell it
    batches = list(x.split(128))
    plain, _ = datafree_quantize(net, bits=3, equalize=False, correct_bias=False)
    free, report_free = datafree_quantize(net, bits=3, equalize=False)
    fixed, report = datafree_quantize(net, bits=3, equalize=False, batches=batches)
    assert report_free.corrected == {} and report.corrected == {"0": "empirical"}
    with torch.no_grad():
        ref = net(x)
        before = (plain(x) - ref).mean(0).abs().max().item()
        after = (fixed(x) - ref).mean(0).abs().max().item()
        torch.testing.assert_close(free(x), plain(x))
    assert before > 0.01 and after < 1e-4


def _imbalance(model, seed=0):
    """The same function with BN output channels scaled over four decades (next layer compensates)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for bn, nxt in [("features.1", "features.4"), ("features.5", "features.7")]:
            s = 10 ** (torch.rand(mods[bn].num_features, generator=g) * 4 - 2)
            mods[bn].weight.mul_(s)
            mods[bn].bias.mul_(s)
            mods[nxt].weight.div_(s[None, :, None, None])
    return model


def test_cle_rescues_per_tensor_quantization_of_imbalanced_model():
    task = get_task("digits")
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 8, "depth": 3})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster on a shared machine
    try:
        for epoch in range(3):
            task.train_epoch(model, opt, task.train_loader(64, epoch))
    finally:
        torch.set_num_threads(threads)
    model = _imbalance(model.eval())
    fp32 = task.evaluate(model, task.test_loader())
    assert fp32 > 0.9
    for bits in (8, 4):
        plain, _ = datafree_quantize(model, bits=bits, equalize=False, correct_bias=False)
        cle, report = datafree_quantize(model, bits=bits, equalize=True, correct_bias=True)
        assert ("features.0", "features.4") in report.equalized
        assert task.evaluate(plain, task.test_loader()) < fp32 - 0.3
        assert task.evaluate(cle, task.test_loader()) >= fp32 - 0.02


def test_relu6_blocks_cle_unless_swapped():
    torch.manual_seed(0)
    model = _randomise_bn(get_task("digits").build_model("mobilenetv2", {}))
    kept, scales = cross_layer_equalize(model)
    assert scales == {} and any(isinstance(m, nn.ReLU6) for m in kept.modules())
    swapped, scales = cross_layer_equalize(model, relu6_to_relu=True)
    assert scales and not any(isinstance(m, nn.ReLU6) for m in swapped.modules())
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())  # the input model is untouched
