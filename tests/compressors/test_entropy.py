"""compressors.entropy: entropy, canonical Huffman (length-limited), ANS; malformed data."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from gradwire.compressors.base import CodecError
from gradwire.compressors.entropy import (
    ans_decode,
    ans_encode,
    canonical_codes,
    empirical_entropy_bits,
    entropy_from_counts,
    huffman_bits,
    huffman_block_symbols,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
)
from gradwire.compressors.quantize import UniformQuantizer


def _reference_huffman_cost(p: np.ndarray) -> float:
    """Expected codeword length of an (unlimited) Huffman code, by the textbook heap algorithm."""
    heap = [float(v) for v in p]
    heapq.heapify(heap)
    cost = 0.0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def _gennorm_symbols(beta: float, n: int, bits: int = 4, seed: int = 0) -> tuple[np.ndarray, int]:
    """GenNorm samples on a 2^bits midtread grid clipped at 4 standard deviations."""
    x = stats.gennorm.rvs(beta, size=n, random_state=np.random.default_rng(seed)).astype(np.float32)
    q = UniformQuantizer(bits, 4 * float(x.std()), "midtread")
    return q.quantize(x), q.alphabet_size


# ------------------------------------------------------------------ entropy


def test_empirical_entropy_known_values():
    assert empirical_entropy_bits(np.array([0, 1, 2, 3] * 5), 4) == pytest.approx(2.0)
    assert empirical_entropy_bits(np.full(7, 3), 5) == 0.0
    assert empirical_entropy_bits(np.zeros(0, dtype=np.int64), 3) == 0.0
    assert empirical_entropy_bits(np.array([0, 0, 0, 1]), 2) == pytest.approx(0.8112781244591328)
    assert entropy_from_counts(np.array([2, 2, 0])) == pytest.approx(1.0)


def test_symbols_are_validated():
    with pytest.raises(CodecError, match="outside the alphabet"):
        empirical_entropy_bits(np.array([0, 4]), 4)
    with pytest.raises(CodecError, match="NaN"):
        empirical_entropy_bits(np.array([0.0, np.nan]), 4)
    with pytest.raises(CodecError, match="outside the alphabet"):
        huffman_encode(np.array([-1]), np.array([1, 1]))


# ------------------------------------------------------------------ Huffman lengths


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=64))
def test_huffman_lengths_are_optimal_and_complete(weights):
    p = np.asarray(weights) + 1e-9
    p /= p.sum()
    lengths = huffman_code_lengths(p, max_length=20)
    assert np.sum(2.0 ** -lengths.astype(float)) == pytest.approx(1.0)  # complete prefix code
    # Same expected length as a textbook Huffman code, unless the 20-bit limit bound.
    if lengths.max() < 20:
        assert float(np.dot(p, lengths)) == pytest.approx(_reference_huffman_cost(p), rel=1e-9, abs=1e-9)


def test_huffman_lengths_deterministic_and_every_symbol_coded():
    p = np.array([0.5, 0.0, 0.25, 0.0, 0.25])
    a = huffman_code_lengths(p)
    assert np.array_equal(a, huffman_code_lengths(p.copy()))
    assert (a >= 1).all()  # zero-probability symbols still have a code
    assert np.array_equal(huffman_code_lengths(np.ones(5)), [3, 3, 2, 2, 2])  # fixed tie-breaking
    assert np.array_equal(huffman_code_lengths(np.array([1.0])), [1])


def test_length_limit_is_respected():
    p = 2.0 ** -np.arange(1, 31)  # unlimited Huffman would use 29-30 bits
    unlimited = huffman_code_lengths(p, max_length=20)
    assert unlimited.max() == 20
    for limit in (5, 8, 12, 16):
        lengths = huffman_code_lengths(p, max_length=limit)
        assert lengths.max() <= limit
        assert np.sum(2.0 ** -lengths.astype(float)) <= 1.0 + 1e-12
        sym = np.random.default_rng(limit).choice(p.size, size=3000, p=p / p.sum())
        assert np.array_equal(huffman_decode(huffman_encode(sym, lengths), lengths, sym.size), sym)
    with pytest.raises(CodecError):
        huffman_code_lengths(np.ones(300), max_length=8)


def test_canonical_codes_are_prefix_free():
    lengths = huffman_code_lengths(np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05]))
    codes = canonical_codes(lengths)
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths, strict=True)]
    for i, a in enumerate(words):
        for j, b in enumerate(words):
            assert i == j or not b.startswith(a)


def test_bad_lengths_rejected():
    with pytest.raises(CodecError, match="Kraft"):
        huffman_encode(np.array([0, 1, 2]), np.array([1, 1, 1]))
    with pytest.raises(CodecError):
        huffman_encode(np.array([0]), np.array([0, 1]))


# ------------------------------------------------------------------ round trips

EDGE_SIZES = [0, 1, 2, 3, 7, 2047, 2048, 2049, 4097, 10_001]


@pytest.mark.parametrize("n", EDGE_SIZES)
def test_round_trip_edge_sizes(n):
    rng = np.random.default_rng(n)
    p = rng.dirichlet(np.ones(16) * 0.3)
    sym = rng.choice(16, size=n, p=p)
    lengths = huffman_code_lengths(p)
    assert np.array_equal(huffman_decode(huffman_encode(sym, lengths), lengths, n), sym)
    assert np.array_equal(ans_decode(ans_encode(sym, p), p, n), sym)
    # Constant input: a single symbol, with a pmf that gives it (almost) everything.
    const = np.full(n, 5)
    q = np.full(16, 1e-12)
    q[5] = 1.0
    lq = huffman_code_lengths(q)
    assert np.array_equal(huffman_decode(huffman_encode(const, lq), lq, n), const)
    assert np.array_equal(ans_decode(ans_encode(const, q), q, n), const)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    alphabet=st.sampled_from([1, 2, 3, 15, 16, 17, 255, 256, 300]),
    n=st.integers(0, 6000),
    concentration=st.sampled_from([0.05, 0.5, 5.0]),
    seed=st.integers(0, 2**31),
    limit=st.sampled_from([16, 20]),
)
def test_round_trip_property(alphabet, n, concentration, seed, limit):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(alphabet) * concentration) if alphabet > 1 else np.ones(1)
    model = p.copy()
    model[rng.random(alphabet) < 0.2] = 0.0  # some symbols the model thinks impossible
    if model.sum() == 0:
        model[0] = 1.0
    sym = rng.choice(alphabet, size=n, p=p)
    lengths = huffman_code_lengths(model, max_length=limit)
    data = huffman_encode(sym, lengths)
    assert np.array_equal(huffman_decode(data, lengths, n), sym)
    assert huffman_bits(sym, lengths) <= 8 * len(data)
    assert np.array_equal(ans_decode(ans_encode(sym, model), model, n), sym)


def test_incomplete_code_round_trip_and_invalid_pattern():
    lengths = np.array([1, 2])  # codes 0 and 10; 11 is not a codeword
    sym = np.array([0, 1, 1, 0] * 100)
    data = huffman_encode(sym, lengths)
    assert np.array_equal(huffman_decode(data, lengths, sym.size), sym)
    bad = bytearray(data)
    bad[-3] = 0xFF
    with pytest.raises(CodecError, match="not a codeword"):
        huffman_decode(bytes(bad), lengths, sym.size)


# ------------------------------------------------------------------ efficiency


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_huffman_within_0_2_bit_and_ans_within_1_percent(beta):
    sym, alphabet = _gennorm_symbols(beta, 200_000)
    counts = np.bincount(sym, minlength=alphabet)
    h = entropy_from_counts(counts)
    pmf = counts / counts.sum()
    lengths = huffman_code_lengths(pmf)
    huff = 8 * len(huffman_encode(sym, lengths)) / sym.size
    assert huffman_bits(sym, lengths) / sym.size - h < 0.2
    assert huff - h < 0.2  # the real bytes, block table and count included
    ans = 8 * len(ans_encode(sym, pmf)) / sym.size
    assert h <= ans <= 1.01 * h


def test_block_size_depends_on_count_only():
    assert huffman_block_symbols(10) == 10
    assert huffman_block_symbols(2048) == 2048
    assert huffman_block_symbols(2049) == 1024
    assert huffman_block_symbols(10_000_000) == 2048


# ------------------------------------------------------------------ malformed data


@pytest.fixture(scope="module")
def coded():
    sym, alphabet = _gennorm_symbols(1.0, 20_000, seed=3)
    pmf = np.bincount(sym, minlength=alphabet) + 1.0
    lengths = huffman_code_lengths(pmf)
    return sym, pmf, lengths, huffman_encode(sym, lengths), ans_encode(sym, pmf)


def test_huffman_malformed(coded):
    sym, _, lengths, data, _ = coded
    n = sym.size
    for bad, count in [(data[:-1], n), (data + b"\0", n), (data[:12], n), (b"", n), (data, n + 1), (data, n - 1)]:
        with pytest.raises(CodecError):
            huffman_decode(bad, lengths, count)
    table = bytearray(data)
    table[8] ^= 0x40  # inside the block table
    with pytest.raises(CodecError):
        huffman_decode(bytes(table), lengths, n)
    with pytest.raises(CodecError):
        huffman_decode(data, lengths, -1)


def test_ans_malformed(coded):
    sym, pmf, _, _, data = coded
    n = sym.size
    for bad, count in [(data[:-4], n), (data[:-1], n), (data, n + 1), (data, n - 1), (b"", n), (data + b"\0\0\0\0", n)]:
        with pytest.raises(CodecError):
            ans_decode(bad, pmf, count)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_corrupt_streams_never_crash(coded, data):
    """Random corruption: either CodecError, or the right number of in-alphabet symbols."""
    sym, pmf, lengths, huff, ans = coded
    for blob, decode in ((huff, lambda b: huffman_decode(b, lengths, sym.size)), (ans, lambda b: ans_decode(b, pmf, sym.size))):
        raw = bytearray(blob)
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
        try:
            out = decode(bytes(raw))
        except CodecError:
            continue
        assert out.shape == sym.shape and out.min() >= 0 and out.max() < pmf.size
