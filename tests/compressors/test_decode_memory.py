"""Memory a decoder keeps per distinct model parameter set stays bounded (hostile-fuzzing regression).

A Huffman decoder derives its code from the model parameters in each payload. Every
distinct parameter set used to build and cache a multi-symbol decode table plus the
encoder's pair tables (~1.4 MB each, 64 kept), so a stream of mutated parameters grew the
PS by ~90-140 MiB. The decoder builds no encoder tables, and it keeps decode tables (512 KiB
each) for the last two codes only: with 16 kept, 46 distinct codes left 8.1 MiB traced.
"""

from __future__ import annotations

import gc
import struct
import tracemalloc

import numpy as np
import pytest

from gradwire.compressors import entropy
from gradwire.compressors.base import CodecError, Encoded, RoundContext, TensorSpec
from gradwire.compressors.registry import create_codec

# Bytes kept after decoding any number of distinct parameter sets: two 512 KiB decode tables and the
# small code objects (16 of them, one entry per symbol), with room for numpy's and tracemalloc's own.
RETAINED_BOUND = 2 * 2**20


def _mutated_payloads(count: int) -> tuple[list[bytes], TensorSpec, object]:
    codec = create_codec("huffman:bits=8,model=gennorm")
    spec = TensorSpec("w", (1024,))
    x = np.random.default_rng(0).standard_normal(1024).astype(np.float32)
    payload = codec.make_encoder().encode(x, spec, RoundContext(round=0, rank=0, seed=0)).payload
    assert payload[0] == 0  # coded, not raw: kind u8, clip f32, beta f32, mu f32, alpha f32, stream
    clip, beta, mu, alpha = struct.unpack_from("<4f", payload, 1)
    out = []
    for k in range(count):  # shape and scale both move: every one gives a different code
        b = 0.4 + 2.6 * k / count
        a = alpha * (0.2 + 3.0 * ((k * 7919) % count) / count)
        out.append(payload[:1] + struct.pack("<4f", clip, b, mu, a) + payload[17:])
    return out, spec, codec


def test_huffman_decoder_memory_is_bounded_over_distinct_parameter_sets():
    payloads, spec, codec = _mutated_payloads(48)
    decoder = codec.make_decoder()
    ctx = RoundContext(round=0, rank=0, seed=0)
    codes = set()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for p in payloads:
            codes.add(codec.code_for(codec_pmf(codec, p)).tobytes())
            try:
                decoder.decode(Encoded(codec.spec, spec, p), ctx)
            except CodecError:
                pass  # the stream no longer matches the code: refused, as it should be
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(codes) >= 32, "the mutations must produce many distinct codes for the test to mean anything"
    assert retained < RETAINED_BOUND, f"{retained / 2**20:.1f} MiB kept after {len(codes)} distinct codes"


def codec_pmf(codec, payload: bytes) -> np.ndarray:
    from gradwire.compressors.entropy_coding.huffman import _model_pmf
    from gradwire.compressors.quantize import UniformQuantizer

    clip, *params = struct.unpack_from("<4f", payload, 1)
    return _model_pmf(codec.model, UniformQuantizer(codec.bits, clip, codec.grid_kind), tuple(params))


def test_decode_table_cache_is_small():
    info = entropy.decode_table_cache_info()
    assert info.maxsize is not None and info.maxsize <= 2


@pytest.mark.parametrize("lengths", [
    np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15], dtype=np.uint8),
    entropy.huffman_code_lengths(0.9 ** np.arange(256)),  # 8-bit symbols, lengths 3 to 16
], ids=["16 symbols", "256 symbols"])
def test_building_a_decode_table_costs_little_more_than_the_table(lengths):
    """A payload with new code lengths makes the PS build a 2^16-entry decode table: that table
    (512 KiB) may stay in the cache of two, but the build must not take full-size temporaries on
    the way, which set the PS's peak RSS when hostile peers send ever-new parameters: ~10 of them
    before it was built in slices (5.3 MiB traced), then the int64 single-symbol tables (1.9 MiB
    traced with 256 symbols, 1.4 MiB with 16; now 1.0 and 0.9 MiB)."""
    tracemalloc.start()
    try:
        table = entropy._Code(lengths).build_table()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert table.nbytes == 8 << 16
    assert peak <= 2.5 * table.nbytes, f"{peak / 2**20:.2f} MiB traced to build a {table.nbytes / 2**20:.2f} MiB table"


def test_m22_design_caches_stay_small_whatever_shapes_peers_send():
    """m22 derives its quantizer from the shape in each payload: hostile peers can ask for
    thousands of distinct designs, so what the PS caches is bounded by the cache sizes times the
    largest entry (8 bits; the bit width is the session's, not the payload's). Was 4,096 designs
    and 1,024 tables (~23 MiB at 8 bits); now under 2 MiB."""
    from gradwire.compressors.quantization import m22

    thresholds, centers, pmf, code, _ = m22._tables("gennorm", 0.777, m22.MAX_BITS, 0.0, "huffman")
    overhead = 4 * 128  # numpy array headers and the tuple
    entry = thresholds.nbytes + centers.nbytes + pmf.nbytes + (code.nbytes if code is not None else 0) + overhead
    design = thresholds.nbytes + centers.nbytes + overhead
    cached = m22.tables_cache_info().maxsize * entry + m22.design_cache_info().maxsize * design
    assert cached <= 2 * 2**20, f"m22 caches may hold {cached / 2**20:.1f} MiB"


def test_a_new_code_is_built_with_one_table_less_kept_beside_it():
    """With the cache full, a new code drops the least recent table before its own is built: a
    build never has two kept tables beside it (functools.lru_cache evicts afterwards, so three
    512 KiB tables were alive at the peak; hostile payloads miss the cache all the time)."""
    codes = [entropy._lengths_key(entropy.huffman_code_lengths(q ** np.arange(256))) for q in (0.9, 0.93, 0.95)]
    cache = entropy._TableCache(2)
    gc.collect()
    tracemalloc.start()  # before the kept tables are made: a block freed untraced would not count
    try:
        for key in codes[:2]:
            cache.get(key)
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        table = cache.get(codes[2])
        above = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert cache.info().currsize == 2 and table.nbytes == 8 << 16
    # the new table and its build's temporaries, less the table dropped first (1.06 x; 2.06 x before)
    assert above <= 1.5 * table.nbytes, f"{above / 2**20:.2f} MiB above the kept tables while building one"
