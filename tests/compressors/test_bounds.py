"""Bounded decoding: what a hostile payload can make the PS allocate, and what is refused unparsed."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from gradwire import protocol
from gradwire.compressors.base import CodecError, Encoded, RoundContext, TensorSpec
from gradwire.compressors.bounds import max_payload_bytes
from gradwire.compressors.registry import create_codec
from gradwire.compressors.sparse import HEADER, INDEX_RICE, decode_sparse
from gradwire.compressors.update import InvalidUpdate, UpdateDecoder, UpdateEncoder

# Options that make each codec's honest payload as large as it gets.
LARGEST_OPTIONS = [
    "dense", "fp16", "bf16", "fp8", "fp8:coder=huffman", "sign", "randk:ratio=1", "topk:ratio=1", "topk:ratio=0.5",
    "topk:ratio=1,values=fp16", "qsgd:levels=256", "qsgd:levels=256,bucket=1", "qsgd:bucket=2,coder=fixed", "qsgd:levels=256,bucket=1,coder=fixed",
    "huffman:bits=8", "huffman:bits=8,block=1", "huffman:bits=4,block=2", "ans:bits=8", "m22:bits=8",
    "powersgd:rank=64", "tpc:residual=dense,order=1", "tpc:residual=(huffman:bits=8,block=1)",
    "lag:residual=(topk:ratio=1)",
]
SHAPES = [(1,), (3,), (10,), (64, 10), (7, 3, 3, 3), (300, 200)]
# The largest allocation a decode may make, in multiples of (decoded float32 tensor + message).
MAX_ALLOCATION_FACTOR = 20


def _encode(spec_text: str, spec: TensorSpec, rounds: int = 3) -> list[Encoded]:
    codec = create_codec(spec_text)
    enc = UpdateEncoder(codec, [spec])
    rng = np.random.default_rng(1)
    scale = 1.0
    out = []
    for r in range(rounds):
        scale *= 10.0  # growing gradients: predictive codecs must send full residuals
        grads = {spec.name: (rng.standard_normal(spec.shape) * scale).astype(np.float32)}
        # as the PS receives them: bytes off the wire (a dense payload leaves the worker as a view
        # of its gradient, which the mutations below would not treat as bytes)
        out.extend(protocol.encoded_from_bytes(protocol.encoded_to_bytes(m))
                   for m in enc.encode(grads, RoundContext(round=r, rank=0)))
    return out


@pytest.mark.parametrize("spec_text", LARGEST_OPTIONS)
def test_honest_payloads_stay_within_the_bound(spec_text):
    for shape in SHAPES:
        spec = TensorSpec("w", shape)
        for e in _encode(spec_text, spec):
            assert e.payload_bytes <= max_payload_bytes(spec), (spec_text, shape, e.payload_bytes)


def _rice_payload(count: int, unary: bytes) -> bytes:
    """A top-k payload: Rice code with b = 0, ``count`` fp32 values, then ``unary`` as the unary stream."""
    return HEADER.pack(INDEX_RICE, count) + bytes([0]) + np.ones(count, "<f4").tobytes() + unary


def _peak_bytes(fn) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    error = None
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned to the test
        error = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


def test_a_long_rice_unary_stream_is_refused_before_it_is_unpacked():
    # 8 MiB of 0xff: 64 Mi one-bits. Unpacking it and listing the ones cost ~600 MiB before.
    spec = TensorSpec("w", (2**21,))
    payload = _rice_payload(16, b"\xff" * (8 * 2**20))
    peak, error = _peak_bytes(lambda: decode_sparse(payload, spec, "topk"))
    assert isinstance(error, CodecError) and "unary stream" in str(error)
    assert peak < len(payload), f"decoding a {len(payload)}-byte payload allocated {peak} bytes"


def test_a_rice_stream_within_the_tensor_still_decodes_and_a_longer_one_does_not():
    spec = TensorSpec("w", (64,))
    # 3 gaps of 0 with b = 0: unary "111", then the longest honest stream: gaps summing to 61.
    indices, _ = decode_sparse(_rice_payload(3, bytes([0b11100000])), spec, "topk")
    assert indices.tolist() == [0, 1, 2]
    longest = "0" * 61 + "111"
    indices, _ = decode_sparse(_rice_payload(3, int(longest, 2).to_bytes(8, "big")), spec, "topk")
    assert indices.tolist() == [61, 62, 63]
    with pytest.raises(CodecError, match="unary stream"):
        decode_sparse(_rice_payload(3, b"\x00" * 8 + b"\xe0"), spec, "topk")


def test_an_oversized_encoded_tensor_is_refused_before_decoding():
    spec = TensorSpec("w", (100,))
    codec = create_codec("topk")
    big = Encoded(codec.spec, spec, b"\x00" * (max_payload_bytes(spec) + 1))
    with pytest.raises(InvalidUpdate, match="at most"):
        UpdateDecoder(codec, [spec]).decode([big], RoundContext(round=0, rank=0))


def _mutations(e: Encoded, limit: int, rng: np.random.Generator):
    def with_payload(p: bytes) -> Encoded:
        return Encoded(e.codec, e.spec, p, e.coefficients, e.residual)

    room = limit - e.payload_bytes
    yield with_payload(e.payload + rng.integers(0, 256, room, dtype=np.uint8).tobytes())
    yield with_payload(e.payload + b"\xff" * room)
    yield with_payload(b"\xff" * (room + len(e.payload)))
    for k in range(min(len(e.payload), 12)):
        for v in (0, 0x7F, 0x80, 0xFF):
            q = bytearray(e.payload)
            q[k] = v
            yield with_payload(bytes(q))
    if e.residual is not None:
        r = e.residual
        yield Encoded(e.codec, e.spec, e.payload, e.coefficients, Encoded(r.codec, r.spec, r.payload + b"\xff" * room))


@pytest.mark.parametrize("spec_text", ["topk", "randk", "sign", "qsgd:levels=256", "huffman:bits=8", "ans:bits=8",
                                       "fp8", "m22", "powersgd", "dense", "tpc:residual=topk", "lag"])
def test_hostile_payloads_allocate_at_most_a_constant_times_the_tensor(spec_text):
    spec = TensorSpec("w", (200, 500))
    codec = create_codec(spec_text)
    honest = _encode(spec_text, spec, rounds=1)[0]
    rng = np.random.default_rng(7)
    for hostile in _mutations(honest, max_payload_bytes(spec), rng):
        decoder = UpdateDecoder(codec, [spec])
        peak, error = _peak_bytes(lambda m=hostile, d=decoder: d.decode([m], RoundContext(round=0, rank=0)))
        assert error is None or isinstance(error, InvalidUpdate), f"{spec_text}: {type(error).__name__}: {error}"
        budget = MAX_ALLOCATION_FACTOR * (4 * spec.numel + hostile.payload_bytes)
        assert peak <= budget, f"{spec_text}: {peak} bytes allocated for a {hostile.payload_bytes}-byte payload"


def _nested_spec(depth: int, size: int) -> str:
    inner = "dense:" + ",".join(f"k{i}=v" for i in range(size // (6 * depth) or 1))
    for _ in range(depth):
        inner = f"tpc:residual=({inner})"
    return inner[:size] if len(inner) > size else inner + "x" * (size - len(inner))


def test_a_megabyte_nested_codec_spec_is_refused_in_well_under_a_second():
    spec = TensorSpec("w", (10,))
    codec = create_codec("tpc:granularity=tensor")
    hostile_spec = _nested_spec(150, 2**20)
    assert len(hostile_spec) >= 2**20
    for where in ("tensor", "residual"):
        honest = _encode(codec.spec, spec, rounds=1)[0]
        if where == "tensor":
            msg = Encoded(hostile_spec, spec, honest.payload, honest.coefficients, honest.residual)
        else:
            r = honest.residual
            msg = Encoded(honest.codec, spec, honest.payload, honest.coefficients, Encoded(hostile_spec, r.spec, r.payload))
        started = time.perf_counter()
        with pytest.raises(InvalidUpdate, match="characters|codec"):
            UpdateDecoder(codec, [spec]).decode([msg], RoundContext(round=0, rank=0))
        assert time.perf_counter() - started < 0.1


def test_a_non_canonical_spec_is_refused_not_parsed():
    spec = TensorSpec("w", (10,))
    honest = _encode("topk:ratio=0.5", spec, rounds=1)[0]
    msg = Encoded("topk:ratio=0.50", spec, honest.payload)
    with pytest.raises(InvalidUpdate, match="agreed on 'topk:ratio=0.5'"):
        UpdateDecoder(create_codec("topk:ratio=0.5"), [spec]).decode([msg], RoundContext(round=0, rank=0))


@pytest.mark.parametrize("field", ["residual", "coefficients"])
def test_fields_a_codec_does_not_use_are_refused(field):
    spec = TensorSpec("w", (10,))
    honest = _encode("topk", spec, rounds=1)[0]
    extra = {"residual": Encoded("dense", spec, b"\x00" * 40)} if field == "residual" else {"coefficients": b"\x00" * 4}
    msg = Encoded(honest.codec, spec, honest.payload, **extra)
    with pytest.raises(InvalidUpdate, match="no residual and no predictor coefficients"):
        UpdateDecoder(create_codec("topk"), [spec]).decode([msg], RoundContext(round=0, rank=0))
