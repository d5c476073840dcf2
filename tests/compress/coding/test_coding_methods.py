"""Weight sharing (kmeans, Deep Compression files), low-rank factorization as stages, the MLP family."""

import pytest
import torch
import torch.nn as nn

from automl.compress import ApplyContext
from automl.compress.coding.deepcomp_format import load_compressed
from automl.errors import ConfigError, LifecycleError
from automl.modelstats import count_params
from automl.recipe import Recipe, apply_recipe
from automl.recipe.apply import train_with_stages
from repo_paths import REPO

RECIPES = REPO / "recipes"
MLP = """version: 1
task: digits
arch: {family: mlp, width: %d, depth: 2, shrink: 2}
train: {epochs: %d, lr: 0.005, batch_size: 32}
stages: %s
"""


def train(task, stages, epochs=4, width=32, text=MLP):
    recipe = Recipe.loads(text % (width, epochs, stages))
    return train_with_stages(recipe, task, ApplyContext(task=task, work_dir=".", epochs=epochs))


def test_mlp_family_is_lenet_300_100_shaped(task):
    model = task.build_model("mlp", {})
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names == ["fc1", "fc2", "head"]
    assert [model.fc1.out_features, model.fc2.out_features] == [300, 100]
    assert count_params(model) == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert model(task.example_input(3)).shape == (3, 10)
    assert isinstance(task.build_model("mlp", {"depth": 0}).head, nn.Linear)


def test_kmeans_centroids_are_trained_and_weights_shared(task, monkeypatch):
    from automl.compress.quantization import kmeans

    seen = {}
    original = kmeans.KMeans._share

    def spy(self, model):
        original(self, model)
        seen.update({n: sw.centroids.detach().clone() for n, (_, sw) in self.shared.items()})

    monkeypatch.setattr(kmeans.KMeans, "_share", spy)
    torch.manual_seed(0)
    model, (handler,) = train(task, "[{method: kmeans, start_epoch: 2, config: {bits: 3}}]")
    slots = {id(p) for p in handler.trainable_parameters()}
    for name, (_, sw) in handler.shared.items():
        assert id(sw.centroids) in slots
        assert not torch.equal(seen[name], sw.centroids.detach())  # fine-tuned
        weight = model.get_submodule(name).weight
        assert isinstance(weight, nn.Parameter) and len(torch.unique(weight.detach())) <= 8
    assert handler.stats["kmeans_layers"] == 3 and handler.stats["kmeans_max_clusters"] == 8


def test_kmeans_refuses_dual_mode_masks(task):
    stages = ("[{method: magnitude, start_epoch: 0, config: {ratio: 0.5, mode: dual}}, "
              "{method: kmeans, start_epoch: 1}]")
    with pytest.raises(ConfigError, match=r"fc1: kmeans cannot share a weight .* dual mode"):
        train(task, stages, epochs=2)


def test_pruning_plus_kmeans_file_reloads_into_the_same_model(task, tmp_path):
    stages = ("[{method: magnitude, start_epoch: 2, config: {ratio: 0.8, finetune_epochs: 4}}, "
              "{method: kmeans, start_epoch: 4, config: {bits: 4, finetune_epochs: 2}}]")
    recipe = Recipe.loads(MLP % (64, 6, stages))
    result = apply_recipe(recipe, tmp_path, task=task)
    shipped = result.artifact.shipped
    assert shipped is not None and shipped.suffix == ".deepc" and shipped.parent == tmp_path
    assert result.metrics["file_kb"] == pytest.approx(shipped.stat().st_size / 1024)
    assert result.metrics["file_kb"] < result.artifact.path.stat().st_size / 1024 / 5
    restored = load_compressed(shipped, task.build_model("mlp", recipe.arch))
    expected = result.model.state_dict()
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in expected.items())
    zeros = sum(int((result.model.get_submodule(n).weight == 0).sum()) for n in ("fc1", "fc2", "head"))
    assert zeros / sum(result.model.get_submodule(n).weight.numel() for n in ("fc1", "fc2", "head")) == \
        pytest.approx(0.8, abs=1e-3)
    assert result.metrics["precision"].startswith("fp32 (shared weights")
    assert result.metrics["deepc_ratio"] > 5


def test_deep_compression_recipe(task, tmp_path):
    """The shipped recipe: about 35x smaller on disk than the fp32 ONNX model, close in accuracy."""
    recipe = Recipe.load(RECIPES / "digits_mlp_deep_compression.yaml")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    result = apply_recipe(recipe, tmp_path, task=task)
    onnx_kb = result.artifact.path.stat().st_size / 1024
    assert onnx_kb / result.metrics["file_kb"] >= 30
    assert result.metrics["test_accuracy"] >= 0.95
    assert result.metrics["pruned_sparsity"] == pytest.approx(0.937, abs=0.01)


def test_lowrank_factors_are_trained_and_renamed(task, monkeypatch):
    from automl.compress.factorization import method as lowrank_method

    seen = {}
    original = lowrank_method.LowRank._factorize

    def spy(self, model, ctx, epoch, reserved):
        original(self, model, ctx, epoch, reserved)
        seen["w"] = model.fc1[0].weight.detach().clone()
        seen["epoch"] = epoch

    monkeypatch.setattr(lowrank_method.LowRank, "_factorize", spy)
    torch.manual_seed(0)
    model, (handler,) = train(task, "[{method: lowrank, start_epoch: 2, config: {rank_rule: rank, rank: 4}}]",
                              width=64)
    assert seen["epoch"] == 2
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == \
        ["fc1.0", "fc1.1", "fc2.0", "fc2.1", "head.0", "head.1"]
    assert model.fc1[0].weight.shape == (4, 64)
    assert id(model.fc1[0].weight) in {id(p) for p in handler.trainable_parameters()}
    assert not torch.equal(seen["w"], model.fc1[0].weight.detach())  # trained after factorizing
    assert handler.stats["lowrank_layers"] == 3 and handler.stats["lowrank_mac_ratio"] < 0.2


def test_lowrank_then_pruning(task):
    both = "[{method: lowrank, start_epoch: %d, config: {rank_rule: macs, mac_ratio: 0.5}}, " \
           "{method: magnitude, start_epoch: 3, config: {ratio: 0.5}}]"
    # factorized at prepare: pruning selects the factors and prunes them
    model, (_, pruning) = train(task, both % 0, width=64)
    assert "fc1.0" in pruning.layers and pruning.stats["pruned_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert float((model.fc1[0].weight == 0).float().mean()) > 0.3
    # factorized later: pruning still holds the replaced layers and is told so
    with pytest.raises(LifecycleError, match=r"'fc1' was replaced by low-rank factors .* start lowrank at epoch 0"):
        train(task, both % 2, width=64)


def test_lowrank_after_quantization_started_is_refused(task):
    stages = "[{method: lowrank, start_epoch: 3}, {method: qat, start_epoch: 1}]"
    with pytest.raises(LifecycleError, match=r"quantization stage started before the factorization"):
        train(task, stages)


def test_lowrank_on_a_cnn_at_finalize(task):
    text = MLP.replace("{family: mlp, width: %d, depth: 2, shrink: 2}", "{family: cnn, width: %d, depth: 2}")
    model, (handler,) = train(task, "[{method: lowrank, config: {rank_rule: macs, "
                                    "mac_ratio: 0.6, layers: [features.4]}}]", epochs=2, width=16, text=text)
    assert isinstance(model.features[4], nn.Sequential) and len(model.features[4]) == 2  # spatial SVD
    assert handler.report[0].scheme == "spatial" and handler.report[0].macs_after <= 0.6 * handler.report[0].macs_before
    assert model(task.example_input(2)).shape == (2, 10)
