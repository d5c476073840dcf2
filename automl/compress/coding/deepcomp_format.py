"""Compressed model files: Deep Compression (clustered, sparse, Huffman-coded weights) and packed
low-bit weights, in one binary container.

Layout (little-endian)::

    magic  8 bytes  b"AMLDEEPC"
    version u16, metadata length u32, CRC-32 of (metadata + payload) u32
    metadata  zlib-deflated UTF-8 JSON: per state_dict tensor its name, shape, dtype, kind and
              section sizes (deflated because it repeats keys and is a tenth of a small file)
    payload   the sections of every tensor, in metadata order

A clustered weight stores its centroid table (float32 or float16) and Huffman-coded cluster
indices. With ``sparse`` storage only the nonzeros' indices are kept, plus their positions as
Huffman-coded gaps (zeros skipped between two nonzeros) over ``2**g`` symbols whose last symbol is
an escape meaning "skip 2**g - 1 and continue"; ``g`` is chosen per layer for the fewest bytes.

A packed weight (``save_packed``: binary, ternary and 2-8-bit quantized models) stores per output row
the row's distinct values (float32, at most ``2**b``) and every weight's index into them, bit-packed
at ``b`` bits: exact whatever the quantizer (per-channel scales, learned steps, zeros from pruning).
Every other tensor (biases, BatchNorm statistics, float layers) is stored raw. Files are written
atomically.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch
import torch.nn as nn

from automl.compress.coding import huffman
from automl.compress.quantization.clustering import cluster_weight
from automl.compress.layers import select_layers
from automl.errors import ConfigError
from automl.io import atomic_write_bytes

MAGIC = b"AMLDEEPC"
VERSION = 1
_FIXED = struct.Struct("<8sHII")
CENTROID_DTYPES = {"float32": np.float32, "float16": np.float16}
_GAP_BITS = range(1, 13)
MAX_PACKED_BITS = 8  # wider indices save little over float32 and cost a large value table


@dataclass
class LayerStorage:
    layer: str
    clusters: int
    nonzeros: int
    numel: int
    storage: str  # "sparse" or "dense"
    bytes: int
    max_abs_change: float  # 0.0: the file holds the model's weights exactly


@dataclass
class CompressionReport:
    path: str
    file_bytes: int
    dense_bytes: int  # the state_dict at float32 (non-float tensors at their own size)
    layers: List[LayerStorage] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.file_bytes, 1)


def _encode_gaps(positions: np.ndarray, gap_bits: int) -> np.ndarray:
    escape = 2 ** gap_bits - 1
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    skips, rest = gaps // escape, gaps % escape
    ends = np.cumsum(skips + 1) - 1
    symbols = np.full(int(ends[-1]) + 1 if len(ends) else 0, escape, dtype=np.int64)
    symbols[ends] = rest
    return symbols


def _decode_gaps(symbols: np.ndarray, gap_bits: int) -> np.ndarray:
    escape = 2 ** gap_bits - 1
    steps = np.where(symbols == escape, escape, symbols + 1)
    return (np.cumsum(steps) - 1)[symbols != escape]


def _best_gap_bits(positions: np.ndarray) -> int:
    return min(_GAP_BITS, key=lambda g: _stream_bytes(_encode_gaps(positions, g)))


def _stream_bytes(symbols: np.ndarray) -> int:
    """Approximate size of a Huffman stream: payload plus one table byte per symbol value."""
    freqs = np.bincount(symbols, minlength=1)
    return huffman.coded_bits(freqs) // 8 + len(freqs)


def _encode_clustered(weight: torch.Tensor, bits: int, sparse: bool, centroid_dtype: str):
    result = cluster_weight(weight, bits)
    table = result.centroids.detach().cpu().float().numpy().astype(CENTROID_DTYPES[centroid_dtype])
    index = result.index.reshape(-1).cpu().numpy()
    entry = {"kind": "clustered", "zero_slot": result.zero_slot, "centroid_dtype": centroid_dtype}
    sections = [table.tobytes()]
    use_sparse = False
    if sparse and result.zero_slot:  # positions + nonzero indices, if smaller than all indices
        live = np.flatnonzero(index != 0)
        gap_bits = _best_gap_bits(live)
        gaps = _encode_gaps(live, gap_bits)
        use_sparse = _stream_bytes(index[live] - 1) + _stream_bytes(gaps) < _stream_bytes(index)
    if use_sparse:
        entry.update(storage="sparse", nonzeros=len(live), gap_bits=gap_bits)
        sections += [huffman.encode(index[live] - 1), huffman.encode(gaps)]
    else:
        entry.update(storage="dense", nonzeros=int((index != 0).sum()) if result.zero_slot else len(index))
        sections.append(huffman.encode(index))
    restored = torch.from_numpy(table.astype(np.float64)).to(weight.dtype)[result.index]
    change = float((restored - weight.detach().cpu()).abs().max()) if weight.numel() else 0.0
    return entry, sections, len(table) - int(result.zero_slot), change


def _decode_clustered(entry: dict, sections: List[bytes], numel: int, dtype: torch.dtype) -> torch.Tensor:
    table = np.frombuffer(sections[0], dtype=CENTROID_DTYPES[entry["centroid_dtype"]])
    if entry["storage"] == "sparse":
        values = huffman.decode(sections[1])
        positions = _decode_gaps(huffman.decode(sections[2]), entry["gap_bits"])
        if len(values) != entry["nonzeros"] or len(positions) != len(values) or (
                len(positions) and positions[-1] >= numel):
            raise huffman.HuffmanError("sparse index does not match the tensor size")
        index = np.zeros(numel, dtype=np.int64)
        index[positions] = values + 1
    else:
        index = huffman.decode(sections[1])
        if len(index) != numel:
            raise huffman.HuffmanError(f"{len(index)} indices for {numel} weights")
    if len(index) and index.max() >= len(table):
        raise huffman.HuffmanError("cluster index outside the centroid table")
    return torch.from_numpy(table.astype(np.float64)).to(dtype)[torch.from_numpy(index)]


def _grid(levels: np.ndarray):
    """(scale, integer steps) with ``float32(step * scale) == level`` exactly for every level of a row
    (what a uniform quantizer computes: (q - zero_point) * scale), or None."""
    nonzero = levels[levels != 0]
    if not len(nonzero):
        return np.float32(1.0), np.zeros(len(levels), np.int64)
    anchor = abs(float(nonzero[np.abs(nonzero).argmin()]))  # the level nearest zero: a small multiple of scale
    gap = float(np.diff(levels.astype(np.float64)).min()) if len(levels) > 1 else anchor
    # a grid of at most 2**8 steps spans at most 255 scales, so anchor / scale is at most this
    most = int(anchor * (2 ** MAX_PACKED_BITS - 1) / max(float(levels[-1]) - float(levels[0]), anchor)) + 1
    for multiple in (max(1, round(anchor / gap)), *range(1, min(most, 2 ** MAX_PACKED_BITS) + 1)):
        first = np.float32(anchor / multiple)
        up, down = np.nextafter(first, np.float32(np.inf)), np.nextafter(first, np.float32(0))
        for scale in (first, up, down, np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))):
            steps = np.round(levels.astype(np.float64) / float(scale)).astype(np.int64)
            if scale > 0 and np.array_equal(steps.astype(np.float32) * scale, levels):
                return np.float32(scale), steps
    return None


def _pack_codes(codes: np.ndarray, bits: int) -> bytes:
    planes = ((codes.reshape(-1)[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1)).tobytes()


def _unpack_codes(data: bytes, numel: int, bits: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if len(planes) < numel * bits:
        raise huffman.HuffmanError("packed indices are shorter than the tensor")
    return (planes[:numel * bits].reshape(numel, bits).astype(np.int64) << np.arange(bits)).sum(1)


def _encode_grid(rows: np.ndarray, levels: List[np.ndarray]):
    grids = [_grid(v) for v in levels]
    if any(g is None for g in grids):
        return None
    offsets = np.array([g[1].min() for g in grids], np.int64)
    bits = max(1, math.ceil(math.log2(max(int(g[1].max() - g[1].min()) + 1 for g in grids))))
    if bits > MAX_PACKED_BITS or np.abs(offsets).max() >= 2 ** 31:
        return None
    scales = np.array([g[0] for g in grids], np.float32)
    codes = np.round(rows.astype(np.float64) / scales[:, None].astype(np.float64)).astype(np.int64) - offsets[:, None]
    return {"kind": "packed", "levels": "grid", "bits": bits}, [scales.tobytes(), offsets.astype(np.int32).tobytes(),
                                                                 _pack_codes(codes, bits)]


def _encode_table(rows: np.ndarray, levels: List[np.ndarray]):
    bits = max(1, math.ceil(math.log2(max(len(v) for v in levels))))
    if bits > MAX_PACKED_BITS:
        return None
    table = np.zeros((len(rows), 2 ** bits), np.float32)
    for i, v in enumerate(levels):
        table[i, :len(v)] = v
    codes = np.stack([np.searchsorted(v, r) for v, r in zip(levels, rows)])
    return {"kind": "packed", "levels": "table", "bits": bits}, [table.tobytes(), _pack_codes(codes, bits)]


def _encode_packed(weight: torch.Tensor):
    """(entry, sections) of a float32 weight with few distinct values per output row, or None when
    packing would not make it smaller: per row a scale and offset when the values lie on a uniform grid
    (exactly), else a table of the row's values."""
    if weight.dtype != torch.float32 or weight.dim() < 2 or not weight.numel():
        return None
    rows = weight.detach().cpu().reshape(weight.shape[0], -1).numpy()
    levels = [np.unique(r) for r in rows]  # sorted
    if max(len(v) for v in levels) > 2 ** MAX_PACKED_BITS:
        return None
    options = [p for p in (_encode_grid(rows, levels), _encode_table(rows, levels)) if p is not None]
    best = min(options, key=lambda p: sum(map(len, p[1])), default=None)
    return best if best is not None and sum(map(len, best[1])) < weight.numel() * 4 else None


def _decode_packed(entry: dict, sections: List[bytes], shape: Tuple[int, ...]) -> torch.Tensor:
    bits, numel, count = int(entry["bits"]), int(np.prod(shape, dtype=np.int64)), shape[0]
    if not 1 <= bits <= MAX_PACKED_BITS:
        raise huffman.HuffmanError("packed bit-width out of range")
    codes = _unpack_codes(sections[-1], numel, bits).reshape(count, -1)
    if entry["levels"] == "grid":
        scales, offsets = np.frombuffer(sections[0], np.float32), np.frombuffer(sections[1], np.int32)
        if len(scales) != count or len(offsets) != count:
            raise huffman.HuffmanError("packed scales do not match the tensor")
        values = (codes + offsets[:, None]).astype(np.float32) * scales[:, None]
    else:
        if len(sections[0]) != count * 2 ** bits * 4:
            raise huffman.HuffmanError("packed value table does not match the tensor")
        values = np.take_along_axis(np.frombuffer(sections[0], np.float32).reshape(count, 2 ** bits), codes, axis=1)
    return torch.from_numpy(values.astype(np.float32))


def _dtype(name: str, where) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError("unknown tensor dtype in file", file=where[0], key=where[1], value=name,
                          fix="the file is corrupt or from a newer version; re-save it")
    return dtype


def _raw_tensor(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)


def _clustered_keys(model: nn.Module, layers: Iterable[str]) -> Dict[str, str]:
    """state_dict key of each selected layer's weight -> layer name."""
    chosen = {id(m): n for n, m in select_layers(model, layers).items()}
    keys = {}
    for full, module in model.named_modules():
        if id(module) in chosen:
            if hasattr(module, "weight_shared"):
                raise ConfigError("layer still shares its weights", key=chosen[id(module)],
                                  fix="call automl.compress.quantization.clustering.materialize(model) before saving")
            keys[f"{full}.weight" if full else "weight"] = chosen[id(module)]
    return keys


def save_compressed(model: nn.Module, path, *, bits: int = 4, sparse: bool = True,
                    layers: Iterable[str] = ("re:.*",), centroid_dtype: str = "float32") -> CompressionReport:
    """Write ``model``'s state_dict with the selected Conv/Linear weights clustered to ``bits``.

    Weights that already hold at most ``2**bits`` distinct nonzero values (a clustered or
    fine-tuned-and-materialized model) are stored exactly; others are clustered now (see
    ``max_abs_change`` in the report). ``float16`` centroids round the shared values.
    """
    if centroid_dtype not in CENTROID_DTYPES:
        raise ConfigError("unknown centroid dtype", key="centroid_dtype", value=centroid_dtype,
                          fix=f"use one of {', '.join(CENTROID_DTYPES)}")
    clustered = _clustered_keys(model, layers)
    entries, payload, report_layers, dense_bytes = [], [], [], 0
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        dense_bytes += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
        entry = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        if name in clustered:
            extra, sections, clusters, change = _encode_clustered(tensor, bits, sparse, centroid_dtype)
            entry.update(extra)
            report_layers.append(LayerStorage(clustered[name], clusters, extra["nonzeros"], tensor.numel(),
                                              extra["storage"], sum(map(len, sections)), change))
        else:
            entry["kind"] = "raw"
            sections = _raw_sections(tensor)
        entry["sections"] = [len(s) for s in sections]
        entries.append(entry)
        payload += sections
    size = _write(path, {"bits": bits, "tensors": entries}, payload)
    return CompressionReport(str(path), size, dense_bytes, report_layers)


def _write(path, header: dict, payload: List[bytes]) -> int:
    meta = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = meta + b"".join(payload)
    data = _FIXED.pack(MAGIC, VERSION, len(meta), zlib.crc32(body)) + body
    atomic_write_bytes(path, data)
    return len(data)


def _raw_sections(tensor: torch.Tensor) -> List[bytes]:
    return [tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()]


def save_packed(model: nn.Module, path) -> CompressionReport:
    """Write ``model``'s state_dict with every weight that has at most ``2**8`` distinct values per output
    row bit-packed (see the module doc); the file reloads exactly (``load_compressed``)."""
    entries, payload, layers, dense_bytes = [], [], [], 0
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        dense_bytes += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
        entry = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        packed = _encode_packed(tensor)
        extra, sections = packed if packed is not None else ({"kind": "raw"}, _raw_sections(tensor))
        entry.update(extra, sections=[len(x) for x in sections])
        if packed is not None:
            layers.append(LayerStorage(name, 2 ** extra["bits"], int((tensor != 0).sum()), tensor.numel(), "packed",
                                       sum(map(len, sections)), 0.0))
        entries.append(entry)
        payload += sections
    return CompressionReport(str(path), _write(path, {"tensors": entries}, payload), dense_bytes, layers)


def read_compressed(path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """The metadata and the restored state_dict of a compressed file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError("compressed model file not found", file=path, fix="check the path") from None
    if len(data) < _FIXED.size or data[:len(MAGIC)] != MAGIC:
        raise ConfigError("not a compressed model file (wrong magic bytes)", file=path,
                          fix="pass a file written by save_compressed")
    magic, version, meta_len, crc = _FIXED.unpack_from(data)
    if version != VERSION:
        raise ConfigError(f"unsupported file format version (this build reads {VERSION})", file=path,
                          key="version", value=version, fix="re-save the model with this version of automl")
    body = data[_FIXED.size:]
    if zlib.crc32(body) != crc or meta_len > len(body):
        raise ConfigError("file is corrupt (checksum mismatch)", file=path,
                          fix="the file was truncated or altered; save the model again")
    try:
        meta = json.loads(zlib.decompress(body[:meta_len]).decode("utf-8"))
        entries = meta["tensors"]
    except (ValueError, KeyError, TypeError, zlib.error):
        raise ConfigError("file metadata is not valid", file=path, fix="save the model again") from None
    tensors, offset = {}, meta_len
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError("file metadata is not valid", file=path, fix="save the model again")
        name = entry.get("name", "?")
        try:
            sections = []
            for size in entry["sections"]:
                sections.append(body[offset:offset + size])
                offset += size
            if offset > len(body):
                raise huffman.HuffmanError("sections run past the end of the file")
            dtype, shape = _dtype(entry["dtype"], (path, name)), tuple(entry["shape"])
            numel = int(np.prod(shape, dtype=np.int64))
            if entry["kind"] == "clustered":
                tensor = _decode_clustered(entry, sections, numel, dtype)
            elif entry["kind"] == "packed":
                tensor = _decode_packed(entry, sections, shape).to(dtype)
            else:
                tensor = _raw_tensor(sections[0], dtype)
            tensors[name] = tensor.reshape(shape)
        except (huffman.HuffmanError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"cannot decode this tensor ({exc})", file=path, key=name,
                              fix="the file is corrupt; save the model again") from None
    if offset != len(body):
        raise ConfigError("file has trailing bytes after the last tensor", file=path,
                          fix="the file is corrupt; save the model again")
    return meta, tensors


def load_compressed(path, model: nn.Module) -> nn.Module:
    """Load a compressed file into ``model`` (same architecture as when saved), in place."""
    _, tensors = read_compressed(path)
    expected = model.state_dict()
    for name in expected:
        if name not in tensors:
            raise ConfigError("model tensor missing from the file", file=path, key=name,
                              fix="build the model with the architecture it was saved from")
    for name, tensor in tensors.items():
        if name not in expected:
            raise ConfigError("file tensor has no counterpart in the model", file=path, key=name,
                              fix="build the model with the architecture it was saved from")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConfigError(f"shape in the file {tuple(tensor.shape)} differs from the model's "
                              f"{tuple(expected[name].shape)}", file=path, key=name,
                              fix="build the model with the architecture parameters it was saved with")
    model.load_state_dict(tensors)
    return model
