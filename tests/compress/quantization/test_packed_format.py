"""Packed low-bit weights: exact round trips for binary, ternary and uniform 2-8-bit weights (per-row
grids or value tables), float layers kept raw, corrupt files refused, and what `apply` ships."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from automl.compress.coding.deepcomp_format import load_compressed, read_compressed, save_packed
from automl.compress.quantization import qmath
from automl.compress.quantization.binary import binarize, ternarize
from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe


def quantized_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.Conv2d(32, 32, 3), nn.Flatten(),
                        nn.Linear(32 * 4, 64), nn.Linear(64, 300), nn.Linear(300, 10), nn.Linear(10, 10))
    with torch.no_grad():
        net[0].weight.copy_(binarize(net[0].weight))
        net[2].weight.copy_(ternarize(net[2].weight))
        scale = torch.rand(64, 1) * 0.1 + 0.01  # per-row 4-bit, some rows hit the clamp only
        net[4].weight.copy_((net[4].weight / scale).round().clamp(-8, 7) * scale)
        net[4].weight[:, :10] = 0  # pruned after quantizing: zero is one more value
        net[5].weight.copy_(qmath.fake_quantize_minmax(net[5].weight, bits=8))
        net[6].weight.copy_(qmath.fake_quantize_minmax(net[6].weight, bits=2))
    return net


def test_round_trip_is_exact_and_float_layers_stay_raw(tmp_path):
    net = quantized_net()
    report = save_packed(net, tmp_path / "m.packed")
    meta, tensors = read_compressed(tmp_path / "m.packed")
    assert all(torch.equal(tensors[k], v) for k, v in net.state_dict().items())
    kinds = {e["name"]: (e["kind"], e.get("levels"), e.get("bits")) for e in meta["tensors"]}
    assert kinds["0.weight"] == ("packed", "table", 1)  # +-alpha per row: a 2-value table, 1 bit
    assert kinds["2.weight"][:2] == ("packed", "grid") and kinds["2.weight"][2] == 2  # -a, 0, +a
    assert kinds["4.weight"] == ("packed", "grid", 4)
    assert kinds["5.weight"][:2] == ("packed", "grid") and kinds["5.weight"][2] <= 8
    assert kinds["7.weight"][0] == "raw"  # float weights: nothing to pack
    assert report.file_bytes < report.dense_bytes / 4
    again = load_compressed(tmp_path / "m.packed", quantized_net().apply(_scramble))
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(again.eval()(x), net.eval()(x))


def _scramble(module):
    for p in module.parameters(recurse=False):
        p.data.normal_()


def test_corrupt_table_is_refused(tmp_path):
    save_packed(quantized_net(), tmp_path / "m.packed")
    data = bytearray((tmp_path / "m.packed").read_bytes())
    data[-5] ^= 0xFF  # payload changed: the checksum catches it
    (tmp_path / "bad.packed").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checksum"):
        read_compressed(tmp_path / "bad.packed")


@pytest.mark.parametrize("stage,most_kb,bits", [
    ({"method": "binary", "config": {"finetune_epochs": 1, "keep_first_last": False}}, 233.5 / 20, {1}),
    ({"method": "qat", "config": {"w_bits": 4, "a_bits": 8, "finetune_epochs": 1}}, 233.5 / 6, {4, 5, 6, 7, 8})])
def test_apply_ships_the_packed_file(task, tmp_path, stage, most_kb, bits):
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": "cnn", "width": 32, "depth": 3},
                               "train": {"epochs": 2, "lr": 0.005, "seed": 0}, "stages": [stage]})
    result = apply_recipe(recipe, tmp_path, task=task)
    shipped = result.artifact.shipped
    assert shipped.suffix == ".packed" and result.metrics["file_kb"] == pytest.approx(shipped.stat().st_size / 1024)
    fp32_kb = (tmp_path / "model.onnx").stat().st_size / 1024
    assert result.metrics["file_kb"] < most_kb and fp32_kb > 200  # the bars: binary 20x, 4-bit 6x smaller
    _, tensors = read_compressed(shipped)
    assert all(torch.equal(tensors[k], v) for k, v in result.model.state_dict().items())
    packed = dict(item.split(":") for item in result.metrics["packed_bits"].split(","))
    assert len(packed) == 4 and {int(b) for b in packed.values()} <= bits  # every conv / linear packed
    assert np.isfinite(result.metrics["accuracy"])
