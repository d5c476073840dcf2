"""The families' `ghost` option: GhostNet modules in place of the convolutions, about 1/ratio of the
MACs, and models that trace, export, thin and train like the plain ones."""
import pytest
import torch

from automl.arch.ghost import GhostConv
from automl.compress.pruning.structured import StructuredPruning, StructuredPruningConfig
from automl.compress import ApplyContext
from automl.hardware.layers import trace_layers
from automl.modelstats import count_macs
from automl.runtime import export_onnx, OrtModel
from automl.tasks import get_task

FAMILIES = {"cnn": {"width": 32, "depth": 3}, "resnet": {"width": 16, "stages": 2}}


@pytest.fixture(scope="module")
def task():
    return get_task("digits")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ghost_families_cost_about_one_over_ratio(task, family):
    x = task.example_input(2)
    plain = task.build_model(family, FAMILIES[family]).eval()
    ghost = task.build_model(family, {**FAMILIES[family], "ghost": 2}).eval()
    assert not any(isinstance(m, GhostConv) for m in plain.modules())
    assert sum(isinstance(m, GhostConv) for m in ghost.modules()) >= 3
    ratio = count_macs(ghost, x[:1]) / count_macs(plain, x[:1])
    assert 0.45 < ratio < 0.65
    assert ghost(x).shape == plain(x).shape == (2, task.num_classes)
    ops = {t.key.op for t in trace_layers(ghost, x[:1])}  # a profile can price it: cheap filters and concat
    assert {"conv", "dwconv", "cat"} <= ops and "dwconv" not in {t.key.op for t in trace_layers(plain, x[:1])}


def test_a_ghost_model_exports_and_thins(task, tmp_path):
    model = task.build_model("cnn", {**FAMILIES["cnn"], "ghost": 2}).eval()
    x = task.example_input(4)
    path = export_onnx(model, x[:1], tmp_path / "ghost.onnx").path
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(OrtModel(path)(x.numpy())), model(x), atol=1e-4)
    handler = StructuredPruning(StructuredPruningConfig(ratio=0.5, round_to=1, finetune_epochs=0), start_epoch=0)
    ctx = ApplyContext(task=task, work_dir=None, epochs=0, seed=0, steps_per_epoch=1)
    masked = handler.prepare(model, ctx)
    handler.on_epoch_start(masked, 0, ctx)
    thinned = handler.finalize(masked, ctx)
    assert handler.stats["thinned_parity"] < 1e-4 and handler.stats["mac_reduction"] > 1.5
    assert thinned(x).shape == (4, task.num_classes)
