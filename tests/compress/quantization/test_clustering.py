"""Weight sharing: exact k-means on toy tensors, zeros kept, centroid gradients, materialize."""
import copy

import pytest
import torch
import torch.nn as nn

from automl.compress.quantization.clustering import (SharedWeights, cluster_model, cluster_weight, kmeans_1d,
                                                     materialize, share_weights)
from automl.errors import ConfigError, UnknownNameError


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_kmeans_exact_centroids_on_separable_groups():
    values = t(0.5, 1.0, 1.5, 4.5, 5.0, 5.5, 9.0, 9.5, 10.0)
    centroids, assign = kmeans_1d(values, 3)
    assert centroids.tolist() == [1.0, 5.0, 9.5]
    assert assign.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_linear_init_spans_min_to_max_and_is_deterministic():
    torch.manual_seed(0)
    w = torch.randn(200)
    a = kmeans_1d(w, 8, iters=0)[0]  # no iteration: the linear initialisation itself
    assert torch.allclose(a, torch.linspace(float(w.min()), float(w.max()), 8, dtype=torch.float64))
    first, second = cluster_weight(w, 3), cluster_weight(w, 3)
    assert torch.equal(first.centroids, second.centroids) and torch.equal(first.index, second.index)


def test_kmeans_is_nearest_centroid_at_convergence():
    torch.manual_seed(0)
    w = torch.randn(1000)
    c = cluster_weight(w, 2, keep_zeros=False)
    assert len(c.centroids) == 4
    nearest = (w[:, None] - c.centroids[None, :]).abs().argmin(dim=1)
    assert torch.equal(nearest, c.index)
    for j in range(4):  # each centroid is the mean of its members
        assert float(c.centroids[j]) == pytest.approx(float(w[c.index == j].double().mean()), abs=1e-6)


def test_cluster_weight_toy_tensor():
    w = t(1.0, 1.5, 0.5, 5.0, 5.5, 4.5).view(2, 3)
    c = cluster_weight(w, 1)
    assert not c.zero_slot
    assert c.centroids.tolist() == [1.0, 5.0]
    assert c.index.tolist() == [[0, 0, 0], [1, 1, 1]]
    assert c.weight().shape == (2, 3)


def test_zeros_stay_zero_in_a_sparse_layer():
    torch.manual_seed(0)
    w = torch.randn(20, 30)
    w[w.abs() < 0.8] = 0.0
    c = cluster_weight(w, 2)
    assert c.zero_slot and float(c.centroids[0]) == 0.0
    assert len(c.centroids) == 1 + 4  # zero slot plus 2**bits shared nonzeros
    assert torch.equal(c.index == 0, w == 0)
    shared = c.weight()
    assert torch.equal(shared == 0, w == 0)
    assert torch.equal(torch.sign(shared), torch.sign(w))  # nonzeros never land in the zero slot


def test_few_distinct_values_are_kept_exactly():
    w = t(0.0, 0.25, -0.5, 0.25, 3.0, 0.0)
    c = cluster_weight(w, 2)
    assert torch.equal(c.weight(), w)
    torch.manual_seed(1)
    once = cluster_weight(torch.randn(50, 5), 3).weight()
    assert torch.equal(cluster_weight(once, 3).weight(), once)  # clustering is idempotent


def test_bad_bits_and_init_are_config_errors():
    with pytest.raises(ConfigError, match="bits"):
        cluster_weight(torch.randn(4), 0)
    with pytest.raises(ConfigError, match="bits"):
        cluster_weight(torch.randn(4), 4.0)
    with pytest.raises(ConfigError, match="initialisation"):
        kmeans_1d(torch.randn(8), 2, init="random")


def test_density_init_also_works():
    torch.manual_seed(0)
    w = torch.randn(500)
    c = cluster_weight(w, 3, init="density", keep_zeros=False)
    assert len(c.centroids) == 8 and torch.all(c.centroids[1:] > c.centroids[:-1])


def test_centroid_gradient_is_sum_of_weight_gradients():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    w[0] = 0.0
    sw = SharedWeights.from_weight(w, 2)
    upstream = torch.randn(6, 5)
    (sw() * upstream).sum().backward()
    for j in range(len(sw.centroids)):
        expected = upstream[sw.index == j + 1].sum()  # slot 0 is the fixed zero
        assert float(sw.centroids.grad[j]) == pytest.approx(float(expected), abs=1e-5)


def test_shared_layer_gradients_match_a_plain_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    plain, _ = cluster_model(model, 2)
    shared = copy.deepcopy(plain)
    share_weights(shared, 2)
    x = torch.randn(5, 8)
    assert torch.allclose(shared(x), plain(x))
    plain(x).square().sum().backward()
    shared(x).square().sum().backward()
    for i in (0, 2):
        sw = shared[i].weight_shared
        for j in range(len(sw.centroids)):
            expected = plain[i].weight.grad[sw.index == j].sum()
            assert float(sw.centroids.grad[j]) == pytest.approx(float(expected), abs=1e-5)


def test_finetune_then_materialize_keeps_pruned_zeros_and_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.2] = 0.0
    zeros = model[0].weight == 0
    keys = list(model.state_dict())
    shared = share_weights(model, 3)
    assert set(shared) == {"0", "2"} and "0.weight_shared.centroids" in model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(10, 8)).square().mean().backward()
        opt.step()
    before = model(torch.ones(2, 8))
    materialize(model)
    assert list(model.state_dict()) == keys
    assert isinstance(model[0].weight, nn.Parameter) and not model[0]._forward_pre_hooks
    assert torch.equal(model(torch.ones(2, 8)), before)
    assert torch.equal(model[0].weight == 0, zeros)
    assert len(torch.unique(model[0].weight[~zeros])) <= 8
    assert len(torch.unique(model[2].weight)) <= 8


def test_deep_copy_of_a_shared_model_is_independent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    share_weights(model, 2)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight_shared.centroids.add_(1.0)
    x = torch.randn(2, 4)
    assert not torch.allclose(twin(x), model(x))
    materialize(twin)
    assert hasattr(model[0], "weight_shared") and not hasattr(twin[0], "weight_shared")


def test_share_twice_and_unknown_layer_are_errors():
    model = nn.Sequential(nn.Linear(4, 3))
    share_weights(model, 2)
    with pytest.raises(ConfigError, match="already shares"):
        share_weights(model, 2)
    with pytest.raises(UnknownNameError, match="nearest layer names: 0"):
        share_weights(nn.Sequential(nn.Linear(4, 3)), 2, layers=["fc1"])


def test_cluster_model_copies_and_reports():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    original = model[0].weight.clone()
    clustered, report = cluster_model(model, 2, layers=["0"])
    assert torch.equal(model[0].weight, original)
    assert len(torch.unique(clustered[0].weight)) <= 4
    assert torch.equal(clustered[2].weight, model[2].weight)
    assert [r.layer for r in report] == ["0"] and report[0].clusters == 4 and report[0].mse > 0
