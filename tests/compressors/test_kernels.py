"""Fast codec kernels give the same results as the straightforward code they replace.

* ``Encoder.reconstruction`` (what the decoder will return, known to the encoder without
  decoding) must be bit-identical to the decoder's output, and error feedback that uses it
  must send exactly the bytes it sent when it decoded its own message.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradwire.compressors.base import RoundContext, TensorSpec
from gradwire.compressors.feedback import ErrorFeedbackEncoder
from gradwire.compressors.registry import create_codec

RECONSTRUCTING = [
    "qsgd:levels=16",
    "qsgd:levels=4,bucket=64",
    "qsgd:levels=300,coder=fixed",
    "m22:bits=2,M=2",
    "m22:bits=3,M=0,coder=huffman",
    "m22:bits=1,M=2,dist=dweibull",
    "m22:bits=8,M=0",
    "huffman:bits=4,ef=1",
    "huffman:bits=8,ef=1",
    "ans:bits=4,ef=1",
    "ans:bits=3,ef=1,rounding=stochastic",
]


def _tensors(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    g = rng.standard_normal(20_000).astype(np.float32) * np.float32(1e-3)
    g[rng.random(g.size) < 0.2] = 0  # exact zeros (ReLU-like)
    return [
        ("fit", g),
        ("small", rng.standard_normal(40).astype(np.float32)),
        ("const", np.full(300, 0.25, dtype=np.float32)),
        ("zeros", np.zeros(500, dtype=np.float32)),
        ("one_value_and_zeros", np.where(rng.random(5000) < 0.5, 0.5, 0.0).astype(np.float32)),
    ]


class _NoShortcut(ErrorFeedbackEncoder):
    """Error feedback that always decodes its own message (the behaviour before the shortcut)."""

    def encode(self, x, spec, ctx):
        inner_reconstruction = self.inner.reconstruction
        self.inner.reconstruction = lambda msg: None
        try:
            return super().encode(x, spec, ctx)
        finally:
            self.inner.reconstruction = inner_reconstruction


@pytest.mark.parametrize("spec_text", RECONSTRUCTING)
def test_reconstruction_is_what_the_decoder_returns(spec_text):
    codec = create_codec(spec_text)
    encoder = codec.make_encoder()
    inner = encoder.inner if isinstance(encoder, ErrorFeedbackEncoder) else encoder
    decoder = codec.make_decoder()
    rng = np.random.default_rng(7)
    known = 0
    for round_ in range(3):
        for name, x in _tensors(rng):
            spec = TensorSpec(name, x.shape)
            ctx = RoundContext(round=round_, rank=0, seed=3)
            msg = inner.encode(x, spec, ctx)
            got = inner.reconstruction(msg)
            want = decoder.decode(msg, ctx).reshape(-1)
            if got is None:
                continue
            known += 1
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
            assert inner.reconstruction(msg) is None  # only for the last message, once
    assert known >= 10


@pytest.mark.parametrize("spec_text", RECONSTRUCTING)
def test_error_feedback_sends_the_same_bytes_with_and_without_the_shortcut(spec_text):
    codec = create_codec(spec_text)
    fast = codec.make_encoder()
    if not isinstance(fast, ErrorFeedbackEncoder):
        pytest.skip("no error feedback in this spec")
    slow_inner = codec.make_encoder().inner
    slow = _NoShortcut(slow_inner, codec.make_decoder(), fast.decay, fast.momentum, fast.masking)
    rng = np.random.default_rng(11)
    for round_ in range(4):
        for name, x in _tensors(rng):
            spec = TensorSpec(name, x.shape)
            ctx = RoundContext(round=round_, rank=0, seed=5)
            assert fast.encode(x, spec, ctx).payload == slow.encode(x, spec, ctx).payload, (round_, name)
    for name in fast.residuals:
        np.testing.assert_array_equal(fast.residuals[name], slow.residuals[name])


# ------------------------------------------------------------------ zstd on symbols (coder=zstd)


def _gradient(n: int = 50_000, seed: int = 0) -> np.ndarray:
    from scipy import stats

    return stats.gennorm.rvs(0.8, scale=1e-3, size=n, random_state=np.random.default_rng(seed)).astype(np.float32)


@pytest.mark.parametrize(("zstd_spec", "reference_spec"), [
    ("fp8:format=143,coder=zstd", "fp8:format=143"),
    ("fp8:format=152,coder=zstd", "fp8:format=152,coder=ans"),
    ("m22:bits=2,M=2,coder=zstd", "m22:bits=2,M=2"),
    ("m22:bits=4,M=0,coder=zstd", "m22:bits=4,M=0,coder=huffman"),
])
def test_zstd_coder_decodes_to_the_same_values_as_the_other_coders(zstd_spec, reference_spec):
    x = _gradient()
    spec = TensorSpec("w", x.shape)
    ctx = RoundContext(round=0, rank=0, seed=1)
    decoded = []
    sizes = []
    for text in (zstd_spec, reference_spec):
        codec = create_codec(text)
        msg = codec.make_encoder().encode(x, spec, ctx)
        sizes.append(len(msg.payload))
        decoded.append(codec.make_decoder().decode(msg, ctx))
    np.testing.assert_array_equal(decoded[0].view(np.uint32), decoded[1].view(np.uint32))
    assert sizes[0] < 4 * x.size  # compressed, not raw
    entropy_coded = "coder=ans" in reference_spec or "coder=huffman" in reference_spec or reference_spec.startswith("m22")
    if entropy_coded:  # zstd pays something over a model-driven coder, but not much
        assert sizes[0] <= 1.35 * sizes[1] + 64, sizes


def test_zstd_coder_is_smaller_than_plain_fp8_codes():
    x = _gradient()
    spec = TensorSpec("w", x.shape)
    ctx = RoundContext(round=0, rank=0, seed=1)
    plain = create_codec("fp8:format=152").make_encoder().encode(x, spec, ctx)
    zstd = create_codec("fp8:format=152,coder=zstd").make_encoder().encode(x, spec, ctx)
    assert zstd.payload[0] == 3 and len(zstd.payload) < 0.85 * len(plain.payload)


def test_zstd_decode_refuses_hostile_streams():
    import zstandard

    from gradwire.compressors.base import CodecError
    from gradwire.compressors.entropy import varint_encode, zstd_decode, zstd_encode

    sym = np.random.default_rng(0).integers(1, 15, 5001).astype(np.uint8)  # odd: the last byte is padded
    good = zstd_encode(sym, 15)
    np.testing.assert_array_equal(zstd_decode(good, 15, sym.size), sym)
    head = varint_encode([sym.size])
    frame = good[len(head):]
    big = zstandard.ZstdCompressor(level=1).compress(bytes(10 * sym.size))  # declares 10x the count
    no_size = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(sym.tobytes())
    outside = zstd_encode(np.full(sym.size, 15, dtype=np.uint8), 16)  # 15 is outside 0..14
    cases = {
        "wrong count": zstd_encode(sym[:-1], 15),
        "frame larger than the count": head + big,
        "no declared size": head + no_size,
        "trailing bytes": good + b"\x00",
        "two frames": good + frame,
        "truncated": good[:-4],
        "garbage": head + b"\xff" * 64,
        "outside the alphabet": outside,
        "nonzero padding": head[:0] + varint_encode([sym.size - 1]) + frame,
    }
    for what, data in cases.items():
        with pytest.raises(CodecError):
            zstd_decode(data, 15, sym.size)
            pytest.fail(what)


def test_bf16_encoder_matches_the_uint64_reference_on_every_kind_of_float():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    extremes = np.array([0.0, -0.0, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                         np.finfo(np.float32).tiny, 1e-45, -1e-45, 1.0, -1.0], dtype=np.float32)
    x = np.concatenate([x, extremes])
    wide = x.view(np.uint32).astype(np.uint64)  # the straightforward version, in uint64
    want = np.minimum((wide + 0x7FFF + ((wide >> 16) & 1)) >> 16, 0xFFFF).astype("<u2").tobytes()
    spec = TensorSpec("w", x.shape)
    got = create_codec("bf16").make_encoder().encode(x, spec, RoundContext(round=0, rank=0, seed=0)).payload
    assert got == want


def test_fp16_encoder_matches_numpy_on_every_kind_of_float():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    edges = [65504, 65519.99, 65520, -65520, 1e30, -1e30, 6e-8, 3e-8, 2.98e-8, 5.96e-8, 0.0, -0.0]
    x = np.concatenate([x, np.array(edges, dtype=np.float32)])
    limit = np.finfo(np.float16).max
    want = np.clip(x, -limit, limit).astype("<f2").tobytes()  # the straightforward version
    spec = TensorSpec("w", x.shape)
    assert create_codec("fp16").make_encoder().encode(x, spec, RoundContext(round=0, rank=0, seed=0)).payload == want
