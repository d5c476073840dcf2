"""Canonical Huffman coding: optimal lengths, prefix-free canonical codes, lossless round trips."""
import math

import numpy as np
import pytest

from automl.compress.coding import huffman


def kraft(lengths):
    return sum(2.0 ** -int(l) for l in lengths if l)


def test_textbook_lengths_are_optimal():
    # CLRS 16.3: a..f with frequencies 45, 13, 12, 16, 9, 5 (thousands) -> 224 bits
    freqs = [45, 13, 12, 16, 9, 5]
    lengths = huffman.code_lengths(freqs)
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4]
    assert huffman.coded_bits(freqs) == 224
    assert kraft(lengths) == 1.0


def test_unused_symbols_get_no_code():
    lengths = huffman.code_lengths([0, 5, 0, 5, 10])
    assert lengths.tolist() == [0, 2, 0, 2, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_length_within_one_bit_of_entropy(seed):
    freqs = np.random.default_rng(seed).integers(1, 1000, size=40)
    p = freqs / freqs.sum()
    entropy = float(-(p * np.log2(p)).sum())
    average = huffman.coded_bits(freqs) / freqs.sum()
    assert entropy <= average < entropy + 1
    assert kraft(huffman.code_lengths(freqs)) == pytest.approx(1.0)


def test_canonical_codes_are_ordered_and_prefix_free():
    codes = huffman.canonical_codes([2, 1, 3, 3])
    words = [format(int(c), f"0{l}b") for c, l in zip(codes, [2, 1, 3, 3])]
    assert words == ["10", "0", "110", "111"]
    for a in words:
        assert not any(b != a and b.startswith(a) for b in words)


def test_length_limit_keeps_a_valid_code():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    assert huffman.code_lengths(fib).max() == 29  # the optimal code is that deep
    lengths = huffman.code_lengths(fib, max_length=8)
    assert lengths.max() <= 8 and kraft(lengths) <= 1.0
    symbols = np.repeat(np.arange(30), 3)
    payload, nbits = huffman.encode_bits(symbols, lengths)
    assert nbits == int(lengths[symbols].astype(int).sum())
    assert np.array_equal(huffman.decode_bits(payload, lengths, len(symbols)), symbols)


@pytest.mark.parametrize("kind", ["uniform", "skewed", "wide"])
def test_round_trip_random(kind):
    rng = np.random.default_rng(0)
    symbols = {"uniform": rng.integers(0, 16, 5000),
               "skewed": np.minimum(rng.geometric(0.2, 5000) - 1, 63),
               "wide": rng.zipf(1.3, 5000) % 3000}[kind]
    blob = huffman.encode(symbols)
    assert np.array_equal(huffman.decode(blob), symbols)


def test_skewed_stream_is_smaller_than_fixed_width():
    symbols = np.minimum(np.random.default_rng(0).geometric(0.5, 10000) - 1, 15)
    blob = huffman.encode(symbols, alphabet_size=16)
    assert len(blob) < 10000 * 4 / 8 * 0.6  # ~2 bits per symbol instead of 4


def test_single_symbol_and_empty_streams():
    assert np.array_equal(huffman.decode(huffman.encode([7] * 1000)), np.full(1000, 7))
    assert len(huffman.encode([7] * 1000)) <= 8 + 8 + 125  # one bit per symbol
    assert np.array_equal(huffman.decode(huffman.encode([3])), [3])
    out = huffman.decode(huffman.encode([]))
    assert out.shape == (0,)
    assert np.array_equal(huffman.decode(huffman.encode([], alphabet_size=4)), [])


def test_large_stream_round_trip():
    symbols = np.minimum(np.random.default_rng(1).geometric(0.1, 300_000) - 1, 255)
    assert np.array_equal(huffman.decode(huffman.encode(symbols)), symbols)


def test_alphabet_size_pads_the_table():
    blob = huffman.encode([0, 1, 1], alphabet_size=10)
    assert np.array_equal(huffman.decode(blob), [0, 1, 1])
    with pytest.raises(ValueError, match="outside the alphabet"):
        huffman.encode([0, 12], alphabet_size=10)
    with pytest.raises(ValueError, match="non-negative"):
        huffman.encode([0, -1])


def test_truncated_or_corrupt_streams_raise():
    symbols = np.random.default_rng(0).integers(0, 5, 2000)
    blob = huffman.encode(symbols)
    with pytest.raises(huffman.HuffmanError, match="truncated"):
        huffman.decode(blob[: len(blob) // 2])
    with pytest.raises(huffman.HuffmanError, match="header"):
        huffman.decode(blob[:3])
    with pytest.raises(huffman.HuffmanError):
        huffman.decode(blob[:9])  # cut inside the code table
    bad = bytearray(huffman.encode([1, 1, 1]))
    bad[-1] = 0xFF  # a lone symbol's code is "0"; a 1 bit is not a code
    with pytest.raises(huffman.HuffmanError, match="invalid code"):
        huffman.decode(bytes(bad))
    table = bytearray(huffman.encode([0, 1, 2, 3]))
    table[8] = 1  # lengths 1, 2, 2, 2 break the Kraft inequality
    with pytest.raises(huffman.HuffmanError, match="prefix code"):
        huffman.decode(bytes(table))


def test_code_lengths_rejects_bad_frequencies():
    with pytest.raises(ValueError):
        huffman.code_lengths([1, -2])
    assert huffman.code_lengths([]).shape == (0,)
    assert math.isclose(kraft(huffman.code_lengths([3, 3])), 1.0)
