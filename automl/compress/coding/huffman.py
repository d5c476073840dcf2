"""Canonical Huffman coding of integer symbol streams, bit-packed, in numpy.

A code is fully described by one length per symbol (canonical codes are assigned in order of
(length, symbol)), so a stream is stored as: alphabet size, symbol count, the length table and the
packed bits. Encoding and decoding are vectorised except one pass that walks symbol boundaries;
300k symbols take well under a second.
"""
from __future__ import annotations

import heapq
import struct
from typing import Sequence, Tuple

import numpy as np

MAX_CODE_LENGTH = 32  # windows of this many bits must fit an int64 during decoding
_HEADER = struct.Struct("<II")  # alphabet size (length-table entries), symbol count


class HuffmanError(ValueError):
    """A Huffman stream is malformed (truncated or corrupt bytes)."""


def code_lengths(freqs: Sequence[int], max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal prefix-code length per symbol (0 for symbols that never occur).

    A lone used symbol gets length 1 so every coded symbol costs at least one bit. Ties are broken
    by symbol order, so the result is deterministic. If the optimal code is longer than
    ``max_length`` (only for Fibonacci-like counts) frequencies are halved until it fits.
    """
    freqs = np.asarray(freqs, dtype=np.int64)
    if freqs.ndim != 1 or (freqs < 0).any():
        raise ValueError("frequencies must be a 1-D array of non-negative counts")
    lengths = np.zeros(len(freqs), dtype=np.int64)
    used = np.flatnonzero(freqs)
    if len(used) == 1:
        lengths[used] = 1
    if len(used) <= 1:
        return lengths.astype(np.uint8)
    weights = freqs[used].copy()
    while True:
        depth = _tree_depths(weights)
        if depth.max() <= max_length:
            break
        weights = (weights + 1) // 2
    lengths[used] = depth
    return lengths.astype(np.uint8)


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Leaf depths of a Huffman tree over ``weights`` (all positive, at least two)."""
    n = len(weights)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    node = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for i in range(2 * n - 3, -1, -1):  # parents have larger ids: walk from the root down
        depth[i] = depth[parent[i]] + 1
    return depth[:n]


def canonical_codes(lengths: Sequence[int]) -> np.ndarray:
    """Canonical code value per symbol: shorter codes first, ties in symbol order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for sym in np.lexsort((np.arange(len(lengths)), lengths)):
        length = int(lengths[sym])
        if length == 0:
            continue
        code <<= length - prev
        codes[sym] = code
        code += 1
        prev = length
    return codes


def _check_kraft(lengths: np.ndarray) -> None:
    used = lengths[lengths > 0].astype(np.int64)
    if len(used) and (used.max() > MAX_CODE_LENGTH or  # Kraft: sum of 2**-length <= 1, in integers
                      int(np.left_shift(1, MAX_CODE_LENGTH - used).sum()) > 2 ** MAX_CODE_LENGTH):
        raise HuffmanError("code lengths do not form a prefix code")


def encode_bits(symbols: np.ndarray, lengths: np.ndarray) -> Tuple[bytes, int]:
    """Pack ``symbols`` with the canonical code of ``lengths``; returns (bytes, bit count)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if len(symbols) == 0:
        return b"", 0
    lengths = np.asarray(lengths, dtype=np.int64)
    lens = lengths[symbols]
    if (lens == 0).any():
        raise ValueError("a symbol without a code (length 0) occurs in the stream")
    codes = canonical_codes(lengths)[symbols]
    total = int(lens.sum())
    owner = np.repeat(np.arange(len(symbols)), lens)
    starts = np.cumsum(lens) - lens
    shift = lens[owner] - 1 - (np.arange(total) - starts[owner])
    bits = ((codes[owner] >> shift) & 1).astype(np.uint8)
    return np.packbits(bits).tobytes(), total


def decode_bits(payload: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols from packed ``payload`` coded with the canonical ``lengths``."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if not (lengths > 0).any():
        raise HuffmanError("stream has symbols but the code table is empty")
    _check_kraft(lengths)
    width = int(lengths.max())
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8)).astype(np.int64)
    nbits = len(bits)
    if nbits < count:
        raise HuffmanError(f"stream truncated: {nbits} bits for {count} symbols")
    # Every bit position's next ``width`` bits as an integer, so each position decodes at once.
    padded = np.concatenate([bits, np.zeros(width, dtype=np.int64)])
    window = np.zeros(nbits, dtype=np.int64)
    for k in range(width):
        window = (window << 1) | padded[k:k + nbits]
    per_length = np.bincount(lengths[lengths > 0], minlength=width + 1)
    first = np.zeros(width + 2, dtype=np.int64)  # first canonical code of each length
    for l in range(1, width + 1):
        first[l + 1] = (first[l] + per_length[l]) << 1
    levels = np.arange(1, width + 1)
    limits = (first[1:width + 1] + per_length[1:]) << (width - levels)  # left-justified ends
    level = np.searchsorted(limits, window, side="right")  # code length - 1
    valid = level < width
    level = np.minimum(level, width - 1)
    code_len = level + 1
    order = np.lexsort((np.arange(len(lengths)), lengths))[int((lengths == 0).sum()):]
    offset = np.concatenate([[0], np.cumsum(per_length[1:])])  # symbols shorter than each length
    rank = offset[level] + (window >> (width - code_len)) - first[code_len]
    rank = np.clip(rank, 0, len(order) - 1)
    # The only sequential part: hop from one symbol start to the next.
    hop = (np.arange(nbits) + code_len).tolist()
    hop.append(nbits)  # a walk that runs off the end stays there and is caught below
    starts, p = [], 0
    for _ in range(count):
        starts.append(p)
        p = hop[min(p, nbits)]
    starts = np.asarray(starts, dtype=np.int64)
    if p > nbits or starts[-1] >= nbits:
        raise HuffmanError(f"stream truncated: {nbits} bits do not hold {count} symbols")
    if not valid[starts].all():
        raise HuffmanError("stream holds an invalid code")
    return order[rank[starts]]


def encode(symbols, alphabet_size: int | None = None) -> bytes:
    """Self-contained stream: header, length table (one byte per symbol) and packed bits."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if len(symbols) and symbols.min() < 0:
        raise ValueError("symbols must be non-negative integers")
    size = int(symbols.max()) + 1 if len(symbols) else 0
    if alphabet_size is not None:
        if size > alphabet_size:
            raise ValueError(f"symbol {size - 1} outside the alphabet of {alphabet_size}")
        size = alphabet_size
    lengths = code_lengths(np.bincount(symbols, minlength=size))
    payload, _ = encode_bits(symbols, lengths)
    return _HEADER.pack(len(lengths), len(symbols)) + lengths.tobytes() + payload


def decode(blob: bytes) -> np.ndarray:
    """Inverse of :func:`encode`; raises HuffmanError on malformed bytes."""
    if len(blob) < _HEADER.size:
        raise HuffmanError("stream shorter than its header")
    size, count = _HEADER.unpack_from(blob)
    if len(blob) < _HEADER.size + size:
        raise HuffmanError("stream shorter than its code table")
    lengths = np.frombuffer(blob, dtype=np.uint8, count=size, offset=_HEADER.size)
    return decode_bits(blob[_HEADER.size + size:], lengths, count)


def coded_bits(freqs: Sequence[int]) -> int:
    """Payload bits a Huffman code spends on a stream with these symbol counts."""
    freqs = np.asarray(freqs, dtype=np.int64)
    return int((code_lengths(freqs).astype(np.int64) * freqs).sum())
