"""Deep Compression file: exact round trips, sparse gap coding, corrupt files, and the digits MLP."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from automl.compress.coding import deepcomp_format as fmt
from automl.compress.quantization.clustering import cluster_model, materialize, share_weights
from automl.compress.coding.deepcomp_format import load_compressed, read_compressed, save_compressed
from automl.compress.pruning.magnitude import magnitude_masks
from automl.errors import ConfigError


def small_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 3))


def pruned(model, ratio=0.7):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    masks = magnitude_masks({n: m.weight for n, m in layers.items()}, ratio)
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.mul_(masks[n])
    return model


def trained_bn(model):
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 2, 5, 5))  # non-trivial running statistics
    return model.eval()


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    clustered, _ = cluster_model(pruned(trained_bn(small_net())), 4)
    report = save_compressed(clustered, tmp_path / "m.dc", bits=4)
    restored = load_compressed(tmp_path / "m.dc", small_net())
    for name, tensor in clustered.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    x = torch.randn(3, 2, 5, 5)
    assert torch.equal(restored.eval()(x), clustered(x))
    assert all(layer.max_abs_change == 0.0 for layer in report.layers)
    assert report.file_bytes == (tmp_path / "m.dc").stat().st_size
    assert report.ratio == report.dense_bytes / report.file_bytes > 3


def test_unclustered_weights_are_clustered_on_save(tmp_path):
    torch.manual_seed(0)
    model = pruned(small_net())
    report = save_compressed(model, tmp_path / "m.dc", bits=3)
    assert all(layer.max_abs_change > 0 for layer in report.layers)
    expected, _ = cluster_model(model, 3)
    restored = load_compressed(tmp_path / "m.dc", small_net())
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in expected.state_dict().items())


def test_storage_choice_and_dense_layers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 50), nn.Linear(50, 4))
    with torch.no_grad():
        model[0].weight[torch.rand(50, 200) < 0.97] = 0.0  # very sparse; layer 1 has no zeros
    report = save_compressed(model, tmp_path / "a.dc", bits=2)
    assert [layer.storage for layer in report.layers] == ["sparse", "dense"]
    assert report.layers[1].nonzeros == 200 and report.layers[1].clusters == 4
    dense = save_compressed(model, tmp_path / "b.dc", bits=2, sparse=False)
    assert [layer.storage for layer in dense.layers] == ["dense", "dense"]
    assert dense.file_bytes > report.file_bytes
    a = load_compressed(tmp_path / "a.dc", nn.Sequential(nn.Linear(200, 50), nn.Linear(50, 4)))
    b = load_compressed(tmp_path / "b.dc", nn.Sequential(nn.Linear(200, 50), nn.Linear(50, 4)))
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[0].weight == 0, model[0].weight == 0)


@pytest.mark.parametrize("gap_bits", [1, 2, 4])
def test_gap_coding_with_escapes(gap_bits):
    positions = np.array([0, 1, 5, 6, 40, 41, 1000, 5000])
    symbols = fmt._encode_gaps(positions, gap_bits)
    assert symbols.max() <= 2 ** gap_bits - 1
    assert np.array_equal(fmt._decode_gaps(symbols, gap_bits), positions)
    assert fmt._decode_gaps(fmt._encode_gaps(np.array([], dtype=np.int64), gap_bits), gap_bits).size == 0


def test_long_zero_runs_and_all_zero_layers(tmp_path):
    model = nn.Sequential(nn.Linear(100, 100, bias=False), nn.Linear(100, 2, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 3] = 1.5
        model[0].weight[99, 99] = -2.0
        model[1].weight.zero_()
    save_compressed(model, tmp_path / "z.dc", bits=4)
    restored = load_compressed(tmp_path / "z.dc", nn.Sequential(nn.Linear(100, 100, bias=False),
                                                               nn.Linear(100, 2, bias=False)))
    assert torch.equal(restored[0].weight, model[0].weight)
    assert torch.equal(restored[1].weight, model[1].weight)


def test_float16_centroids_round_the_shared_values(tmp_path):
    torch.manual_seed(0)
    clustered, _ = cluster_model(pruned(nn.Sequential(nn.Linear(30, 20))), 4)
    small = save_compressed(clustered, tmp_path / "h.dc", bits=4, centroid_dtype="float16")
    big = save_compressed(clustered, tmp_path / "f.dc", bits=4)
    assert small.file_bytes < big.file_bytes and small.layers[0].max_abs_change > 0
    restored = load_compressed(tmp_path / "h.dc", nn.Sequential(nn.Linear(30, 20)))
    assert torch.equal(restored[0].weight, clustered[0].weight.half().float())
    with pytest.raises(ConfigError, match="centroid dtype"):
        save_compressed(clustered, tmp_path / "x.dc", centroid_dtype="int8")


def test_write_is_atomic_and_replaces(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    save_compressed(model, tmp_path / "m.dc")
    save_compressed(model, tmp_path / "m.dc", bits=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.dc"]
    meta, tensors = read_compressed(tmp_path / "m.dc")
    assert meta["bits"] == 2 and set(tensors) == {"0.weight", "0.bias"}


def test_shared_weights_must_be_materialized_first(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    share_weights(model, 2)
    with pytest.raises(ConfigError, match="materialize"):
        save_compressed(model, tmp_path / "m.dc")
    materialize(model)
    save_compressed(model, tmp_path / "m.dc", bits=2)


def rebuild(data, meta=None, body_payload=None, version=None, fix_crc=True):
    """Re-assemble a file from parts, optionally with new metadata, payload or version."""
    magic, ver, meta_len, crc = struct.unpack_from("<8sHII", data)
    head = 18
    old_meta, payload = data[head:head + meta_len], data[head + meta_len:]
    new_meta = old_meta if meta is None else zlib.compress(json.dumps(meta).encode())
    payload = payload if body_payload is None else body_payload
    body = new_meta + payload
    crc = zlib.crc32(body) if fix_crc else crc
    return struct.pack("<8sHII", magic, ver if version is None else version, len(new_meta), crc) + body


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    save_compressed(pruned(small_net()), tmp_path / "m.dc", bits=4)
    return tmp_path / "m.dc"


def meta_of(path):
    data = path.read_bytes()
    meta_len = struct.unpack_from("<8sHII", data)[2]
    return json.loads(zlib.decompress(data[18:18 + meta_len]))


def test_wrong_magic_version_and_checksum(saved):
    data = saved.read_bytes()
    bad = saved.with_name("bad.dc")
    bad.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ConfigError, match=r"bad\.dc.*wrong magic"):
        load_compressed(bad, small_net())
    bad.write_bytes(rebuild(data, version=9))
    with pytest.raises(ConfigError, match=r"bad\.dc: version: unsupported.*got 9"):
        load_compressed(bad, small_net())
    flipped = bytearray(data)
    flipped[-5] ^= 0x40
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match="corrupt"):
        load_compressed(bad, small_net())
    bad.write_bytes(data[:-10])
    with pytest.raises(ConfigError, match="corrupt"):
        load_compressed(bad, small_net())
    with pytest.raises(ConfigError, match="not found"):
        load_compressed(saved.with_name("missing.dc"), small_net())


def test_corrupt_layer_is_named(saved):
    data = saved.read_bytes()
    meta = meta_of(saved)
    entry = next(e for e in meta["tensors"] if e["name"] == "4.weight")
    entry["nonzeros"] += 1
    bad = saved.with_name("bad.dc")
    bad.write_bytes(rebuild(data, meta=meta))
    with pytest.raises(ConfigError, match=r"bad\.dc: 4\.weight: cannot decode"):
        load_compressed(bad, small_net())
    meta = meta_of(saved)
    meta["tensors"][0]["dtype"] = "float99"
    bad.write_bytes(rebuild(data, meta=meta))
    with pytest.raises(ConfigError, match=r"0\.weight.*dtype"):
        load_compressed(bad, small_net())
    bad.write_bytes(rebuild(data, body_payload=data[18 + struct.unpack_from("<8sHII", data)[2]:] + b"x"))
    with pytest.raises(ConfigError, match="trailing bytes"):
        load_compressed(bad, small_net())


def test_architecture_mismatch_names_the_layer(saved):
    wider = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 17), nn.ReLU(), nn.Linear(17, 3))
    with pytest.raises(ConfigError, match=r"m\.dc: 4\.weight: shape in the file \(16, 100\) differs"
                                          r".*\(17, 100\)"):
        load_compressed(saved, wider)
    deeper = nn.Sequential(*small_net(), nn.Linear(3, 3))
    with pytest.raises(ConfigError, match=r"7\.weight: model tensor missing"):
        load_compressed(saved, deeper)
    shallower = nn.Sequential(*list(small_net())[:5])
    with pytest.raises(ConfigError, match=r"6\.weight: file tensor has no counterpart"):
        load_compressed(saved, shallower)


def test_digits_mlp_deep_compression(tmp_path):
    """Han et al.'s LeNet-300-100 pipeline on digits: train, prune, share, fine-tune, store, reload."""
    from automl.tasks import get_task

    torch.manual_seed(0)
    task = get_task("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared machine
    try:
        _deep_compression(task, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _deep_compression(task, tmp_path):

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                             nn.Linear(100, 10))

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(15):
        task.train_epoch(model, opt, task.train_loader(64, epoch))
    baseline = task.evaluate(model, task.test_loader())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ratios = {"1": 0.95, "3": 0.95, "5": 0.8}  # per layer, like Han et al. (last layer kept denser)
    masks = {n: magnitude_masks({n: m.weight}, ratios[n])[n] for n, m in layers.items()}

    def apply_masks():
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.mul_(masks[n])

    apply_masks()
    for epoch in range(10):
        task.train_epoch(model, opt, task.train_loader(64, 100 + epoch), after_step=apply_masks)
    share_weights(model, 4)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(5):  # centroid fine-tuning; the zero slot keeps pruned weights at zero
        task.train_epoch(model, opt, task.train_loader(64, 200 + epoch))
    materialize(model)
    accuracy = task.evaluate(model, task.test_loader())

    report = save_compressed(model, tmp_path / "mlp.dc", bits=4)
    restored = load_compressed(tmp_path / "mlp.dc", mlp())
    x = task.example_input(256)
    model.eval()
    assert torch.equal(restored.eval()(x), model(x))
    kept = sum(layer.nonzeros for layer in report.layers)
    sparsity = 1 - kept / sum(layer.numel for layer in report.layers)
    print(f"digits MLP: sparsity {sparsity:.3f}, accuracy {baseline:.3f} -> {accuracy:.3f}, "
          f"{report.dense_bytes} -> {report.file_bytes} bytes, ratio {report.ratio:.1f}x")
    assert sparsity > 0.94
    assert report.ratio >= 20
    assert accuracy >= baseline - 0.05
