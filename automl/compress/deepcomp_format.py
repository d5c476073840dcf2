"""Deep Compression file format: clustered, sparse, Huffman-coded weights in one binary file.

Layout (little-endian)::

    magic  8 bytes  b"AMLDEEPC"
    version u16, metadata length u32, CRC-32 of (metadata + payload) u32
    metadata  zlib-deflated UTF-8 JSON: per state_dict tensor its name, shape, dtype, kind and
              section sizes (deflated because it repeats keys and is a tenth of a small file)
    payload   the sections of every tensor, in metadata order

A clustered weight stores its centroid table (float32 or float16) and Huffman-coded cluster
indices. With ``sparse`` storage only the nonzeros' indices are kept, plus their positions as
Huffman-coded gaps (zeros skipped between two nonzeros) over ``2**g`` symbols whose last symbol is
an escape meaning "skip 2**g - 1 and continue"; ``g`` is chosen per layer for the fewest bytes. Every
other tensor (biases, BatchNorm statistics) is stored raw. Files are written atomically.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch
import torch.nn as nn

from automl.compress import huffman
from automl.compress.clustering import cluster_weight
from automl.compress.layers import select_layers
from automl.errors import ConfigError
from automl.io import atomic_write_bytes

MAGIC = b"AMLDEEPC"
VERSION = 1
_FIXED = struct.Struct("<8sHII")
CENTROID_DTYPES = {"float32": np.float32, "float16": np.float16}
_GAP_BITS = range(1, 13)


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
                                  fix="call automl.compress.clustering.materialize(model) before saving")
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
            sections = [tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()]
        entry["sections"] = [len(s) for s in sections]
        entries.append(entry)
        payload += sections
    meta = zlib.compress(json.dumps({"bits": bits, "tensors": entries}, separators=(",", ":")).encode(), 9)
    body = meta + b"".join(payload)
    data = _FIXED.pack(MAGIC, VERSION, len(meta), zlib.crc32(body)) + body
    atomic_write_bytes(path, data)
    return CompressionReport(str(path), len(data), dense_bytes, report_layers)


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
