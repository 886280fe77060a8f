"""Pure codec tests of the baselines: ``topk``, ``randk``, ``qsgd``, ``sign``, ``powersgd``.

Golden bytes live in ``tests/compressors/golden/<codec>.json``; a wire change must be
deliberate: regenerate them with ``GRADWIRE_UPDATE_GOLDEN=1 pytest tests/compressors/test_baselines.py``
and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradwire.compressors.base import CodecError, Encoded, RoundContext, TensorSpec
from gradwire.compressors.entropy import varint_decode, varint_encode
from gradwire.compressors.feedback import ErrorFeedbackEncoder
from gradwire.compressors.lowrank.powersgd import lowrank_bits_per_entry, lowrank_layout
from gradwire.compressors.quantization.qsgd import MODE_ANS, MODE_FIXED
from gradwire.compressors.registry import available_codecs, create_codec
from gradwire.compressors.sparse import (
    INDEX_BITMAP,
    INDEX_RICE,
    log2_binomial,
    rice_decode,
    rice_encode,
    sparse_count,
)
from gradwire.compressors.sparsification.randk import randk_indices
from gradwire.compressors.spec import SpecError
from gradwire.compressors.update import UpdateDecoder, UpdateEncoder

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("GRADWIRE_UPDATE_GOLDEN") == "1"

SPECS = [
    "topk",
    "topk:ratio=0.3,ef=0",
    "topk:values=fp16",
    "randk",
    "randk:ratio=0.5,ef=0,scale=1",
    "randk:ratio=0.2,values=fp16",
    "topk:momentum=0.9",
    "randk:ratio=0.3,momentum=0.5,masking=0",
    "qsgd",
    "qsgd:levels=1",
    "qsgd:levels=5,bucket=7,coder=fixed",
    "qsgd:levels=255,coder=ans",
    "sign",
    "sign:ef=0",
    "powersgd",
    "powersgd:rank=1,ef=0",
]
EDGE_SHAPES = [(), (0,), (1,), (2,), (7,), (3, 5), (5, 1), (1, 9), (4, 3, 2), (2, 0, 3), (31,)]


def ctx(round_: int = 0, rank: int = 0, seed: int = 7) -> RoundContext:
    return RoundContext(round=round_, rank=rank, seed=seed)


def pair(spec_text: str):
    codec = create_codec(spec_text)
    return codec, codec.make_encoder(), codec.make_decoder()


def roundtrip(spec_text: str, x: np.ndarray, name: str = "w", c: RoundContext | None = None):
    codec, enc, dec = pair(spec_text)
    spec = TensorSpec(name, tuple(x.shape))
    c = c or ctx()
    msg = enc.encode(x, spec, c)
    return codec, msg, dec.decode(msg, c)


# ------------------------------------------------------------------ registry and options


def test_registered_with_canonical_specs():
    assert {"topk", "randk", "qsgd", "sign", "powersgd"} <= set(available_codecs())
    for text in SPECS:
        codec = create_codec(text)
        assert create_codec(codec.spec) == codec
    assert create_codec("topk").ef and create_codec("sign").ef and create_codec("powersgd").ef
    assert create_codec("topk:ratio=0.01").ratio == 0.01
    assert create_codec("qsgd:levels=16").levels == 16
    assert create_codec("powersgd:rank=2").rank == 2


@pytest.mark.parametrize(
    "bad",
    [
        "topk:ratio=0",
        "topk:ratio=1.5",
        "topk:values=fp8",
        "topk:decay=2",
        "randk:ratio=-0.1",
        "randk:scale=1",  # with the default ef=1: the memory would blow up
        "qsgd:levels=0",
        "qsgd:levels=70000",
        "qsgd:bucket=-1",
        "qsgd:coder=zip",
        "sign:decay=-1",
        "powersgd:rank=0",
        "topk:k=3",
        "topk:momentum=1",
        "topk:momentum=-0.1",
        "topk:momentum=0.9,ef=0",  # the velocity lives in the memory
        "randk:momentum=0.9,ef=0",
    ],
)
def test_bad_options_rejected_with_reason(bad):
    with pytest.raises(SpecError) as info:
        create_codec(bad)
    assert len(str(info.value)) > 20


# ------------------------------------------------------------------ edge shapes


@pytest.mark.parametrize("spec_text", SPECS)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
def test_edge_shapes_roundtrip(spec_text, shape):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    codec, msg, out = roundtrip(spec_text, x, name=f"t{shape}")
    assert out.shape == shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert msg.codec == codec.spec and msg.payload_bytes == len(msg.payload)
    if x.size == 0:
        assert msg.payload == b""


@pytest.mark.parametrize("spec_text", SPECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_rejected(spec_text, bad):
    x = np.ones((4, 5), dtype=np.float32)
    x[2, 3] = bad
    _, enc, _ = pair(spec_text)
    with pytest.raises(CodecError, match="NaN or Inf"):
        enc.encode(x, TensorSpec("w", (4, 5)), ctx())


@pytest.mark.parametrize("spec_text", SPECS)
def test_size_mismatch_rejected(spec_text):
    _, enc, _ = pair(spec_text)
    with pytest.raises(CodecError, match="entries"):
        enc.encode(np.ones(6, np.float32), TensorSpec("w", (7,)), ctx())


# ------------------------------------------------------------------ first-round invariants


def check_first_round(codec, x: np.ndarray, out: np.ndarray, c: RoundContext, name: str) -> None:
    """Per-codec error bounds of one encode/decode from a fresh encoder (empty memory)."""
    flat, dec = x.reshape(-1).astype(np.float64), out.reshape(-1).astype(np.float64)
    d = flat.size
    assert out.shape == x.shape and np.isfinite(out).all()
    if d == 0:
        return
    if codec.name == "topk":
        k = sparse_count(d, codec.ratio)
        kept = np.flatnonzero(dec)
        assert kept.size <= k
        if codec.values == "fp32":
            np.testing.assert_array_equal(dec[kept], flat[kept])
            if kept.size:
                dropped = np.setdiff1d(np.arange(d), kept)
                assert dropped.size == 0 or np.abs(flat[dropped]).max() <= np.abs(flat[kept]).min()
            assert kept.size == min(k, np.count_nonzero(flat))
        else:
            want = np.clip(flat[kept], -65504, 65504).astype(np.float16).astype(np.float64)
            np.testing.assert_array_equal(dec[kept], want)
    elif codec.name == "randk":
        k = sparse_count(d, codec.ratio)
        idx = randk_indices(d, k, name, c)
        assert idx.size == k and np.unique(idx).size == k
        rest = np.setdiff1d(np.arange(d), idx)
        assert not dec[rest].any()
        sent = flat[idx]
        if codec.values == "fp16":
            sent = np.clip(sent, -65504, 65504).astype(np.float16).astype(np.float64)
        sent = sent.astype(np.float32).astype(np.float64)
        if codec.scale:
            np.testing.assert_allclose(dec[idx], sent * d / k, rtol=1e-6)
        else:
            np.testing.assert_array_equal(dec[idx], sent)
    elif codec.name == "qsgd":
        bucket = codec.bucket or d
        starts = np.arange(0, d, bucket)
        norms = np.sqrt(np.add.reduceat(flat * flat, starts)).astype(np.float32).astype(np.float64)
        per = np.repeat(norms, np.diff(np.append(starts, d)))
        # Each entry lands on one of the two levels around it: error < one level step.
        assert (np.abs(dec - flat) <= per / codec.levels * (1 + 1e-5) + 1e-45).all()
        assert (dec * flat >= 0).all()
    elif codec.name == "sign":
        scale = np.float64(np.float32(np.mean(np.abs(flat))))
        np.testing.assert_array_equal(dec, np.where(flat < 0, -scale, scale))
    elif codec.name == "powersgd":
        if lowrank_layout(x.shape, codec.rank) is None:
            np.testing.assert_array_equal(dec, flat)
        else:  # the decoded tensor is a projection of M: never larger error than M itself
            assert np.linalg.norm(dec - flat) <= np.linalg.norm(flat) * (1 + 1e-4)
    else:  # pragma: no cover
        raise AssertionError(codec.name)


@st.composite
def edge_inputs(draw):
    shape = draw(st.sampled_from(EDGE_SHAPES))
    kind = draw(st.sampled_from(["zeros", "constant", "normal", "tiny", "huge", "wide", "sparse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n = int(np.prod(shape))
    if kind == "zeros":
        flat = np.zeros(n)
    elif kind == "constant":
        flat = np.full(n, draw(st.sampled_from([-3.0, 0.5, 1e-30, -1e30])))
    elif kind == "normal":
        flat = rng.standard_normal(n)
    elif kind == "tiny":
        flat = rng.standard_normal(n) * 1e-30
    elif kind == "huge":
        flat = rng.standard_normal(n) * 1e30
    elif kind == "wide":  # magnitudes from 1e-30 to 1e30 in one tensor
        flat = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-30, 30, n)
    else:
        flat = rng.standard_normal(n) * (rng.random(n) < 0.1)
    return flat.astype(np.float32).reshape(shape)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_text=st.sampled_from(SPECS), x=edge_inputs(), round_=st.integers(0, 5))
def test_first_round_bounds_on_edge_inputs(spec_text, x, round_):
    c = ctx(round_)
    codec, msg, out = roundtrip(spec_text, x, name="edge", c=c)
    check_first_round(codec, x, out, c, "edge")


@settings(max_examples=40, deadline=None)
@given(spec_text=st.sampled_from(SPECS), x=edge_inputs())
def test_every_round_stays_finite_with_memory(spec_text, x):
    """Several rounds of the same extreme input: error feedback never overflows to NaN/Inf."""
    _, enc, dec = pair(spec_text)
    spec = TensorSpec("w", x.shape)
    for t in range(4):
        out = dec.decode(enc.encode(x, spec, ctx(t)), ctx(t))
        assert np.isfinite(out).all() and out.shape == x.shape


# ------------------------------------------------------------------ error bounds on real-sized tensors


def gaussian(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_topk_keeps_exactly_the_largest_and_bounds_the_error():
    x = gaussian((128, 64))
    codec, msg, out = roundtrip("topk:ef=0", x)
    k = sparse_count(x.size, 0.01)
    assert np.count_nonzero(out) == k == 82
    err = np.sum((x - out) ** 2)
    assert err <= (1 - k / x.size) * np.sum(x**2)
    # Index bits: within 0.2 bit of log2 C(d, k)/k, far below 32-bit indices.
    index_bits = 8 * len(msg.payload) - 8 * 5 - 32 * k
    bound = log2_binomial(x.size, k) / k
    assert bound <= index_bits / k <= bound + 0.5
    assert msg.payload[0] & 3 == INDEX_RICE


def test_topk_picks_bitmap_when_dense_and_rice_when_sparse():
    # Rice with b = 0 is the bitmap cut after the last index (plus its parameter
    # byte), so the bitmap wins only when the last entries are kept, e.g. ratio=1.
    x = gaussian((4000,), 1)
    _, dense_msg, out = roundtrip("topk:ratio=1,ef=0", x)
    assert dense_msg.payload[0] & 3 == INDEX_BITMAP
    assert len(dense_msg.payload) == 5 + 4 * 4000 + 500
    np.testing.assert_array_equal(out, x)
    _, half_msg, out = roundtrip("topk:ratio=0.5,ef=0", x)
    assert len(half_msg.payload) <= 5 + 4 * 2000 + 500
    assert np.count_nonzero(out) == 2000
    _, sparse_msg, _ = roundtrip("topk:ratio=0.001,ef=0", x)
    assert sparse_msg.payload[0] & 3 == INDEX_RICE


def test_topk_fp16_values_halve_the_value_bytes():
    x = gaussian((100, 100), 2)
    _, m32, _ = roundtrip("topk:ef=0", x)
    _, m16, out16 = roundtrip("topk:ef=0,values=fp16", x)
    assert len(m32.payload) - len(m16.payload) == 2 * 100
    kept = np.flatnonzero(out16.reshape(-1))
    np.testing.assert_allclose(out16.reshape(-1)[kept], x.reshape(-1)[kept], rtol=2**-11)


def test_topk_all_zero_tensor_costs_only_the_header():
    _, msg, out = roundtrip("topk", np.zeros((50, 50), np.float32))
    assert len(msg.payload) == 5 and not out.any()


@pytest.mark.parametrize("gaps", [[0], [5], [0, 0, 0], [3, 1000, 2, 0, 77]])
@pytest.mark.parametrize("b", [0, 1, 4, 11])
def test_rice_streams_roundtrip(gaps, b):
    g = np.array(gaps, dtype=np.int64)
    low, unary = rice_encode(g, b)
    np.testing.assert_array_equal(rice_decode(low, unary, g.size, b, 10**6, "t"), g)


def test_randk_indices_identical_at_both_ends():
    x = gaussian((50, 40), 4) + 10.0  # no zero entries: the decoded support is the index set
    spec = TensorSpec("layer.w", x.shape)
    codec, enc, dec = pair("randk:ratio=0.05")
    c = ctx(round_=3, rank=1)
    msg = enc.encode(x, spec, c)
    assert len(msg.payload) == 4 * 100  # values only: no index on the wire
    out = dec.decode(msg, c).reshape(-1)
    idx = randk_indices(x.size, 100, spec.name, c)
    np.testing.assert_array_equal(np.flatnonzero(out), idx)
    np.testing.assert_array_equal(out[idx], x.reshape(-1)[idx])
    # The support depends on round, rank and tensor name: a PS with another context
    # would put the values elsewhere, which this test would catch.
    for other in (ctx(4, 1), ctx(3, 0), ctx(3, 1, seed=8)):
        assert not np.array_equal(randk_indices(x.size, 100, spec.name, other), idx)
    assert not np.array_equal(randk_indices(x.size, 100, "other", c), idx)


def test_randk_scaled_is_unbiased():
    x = gaussian((200,), 5)
    codec, enc, dec = pair("randk:ratio=0.1,ef=0,scale=1")
    spec = TensorSpec("w", x.shape)
    total = np.zeros(200)
    n = 3000
    for t in range(n):
        total += dec.decode(enc.encode(x, spec, ctx(t)), ctx(t))
    # Var of one decode per entry: x²(d/k − 1) = 9x²; the mean of n has std 3|x|/√n.
    z = (total / n - x) / (3 * np.abs(x) / np.sqrt(n))
    assert np.abs(z).max() < 5


def qsgd_decodes(x: np.ndarray, spec_text: str, n: int) -> np.ndarray:
    _, enc, dec = pair(spec_text)
    spec = TensorSpec("w", x.shape)
    return np.stack([dec.decode(enc.encode(x, spec, ctx(t)), ctx(t)) for t in range(n)])


def test_qsgd_is_unbiased_statistically():
    s, n = 4, 4000
    x = gaussian((40,), 6)
    outs = qsgd_decodes(x, f"qsgd:levels={s}", n).astype(np.float64)
    norm = float(np.float32(np.linalg.norm(x.astype(np.float64))))
    r = s * np.abs(x.astype(np.float64)) / norm
    p = r - np.floor(r)
    sigma = norm / s * np.sqrt(p * (1 - p))  # std of one decode, per entry
    se = sigma / np.sqrt(n)
    mean = outs.mean(axis=0)
    z = (mean - x) / np.where(se > 0, se, 1)
    assert np.abs(z).max() < 5, np.abs(z).max()
    # The observed spread matches the model, so the bound above is the right one ...
    np.testing.assert_allclose(outs.std(axis=0), sigma, rtol=0.15, atol=0.02 * norm / s)
    # ... and it is tight enough to catch a biased rounding (round to nearest level).
    nearest = np.sign(x) * np.round(r) * norm / s
    assert np.abs((nearest - x) / np.where(se > 0, se, 1)).max() > 20


def test_qsgd_variance_bound_of_the_paper():
    """E||Q(v) − v||² ≤ min(d/s², √d/s)·||v||² (Alistarh et al., Lemma 3.1)."""
    x = gaussian((1000,), 7)
    for s in (1, 4, 16):
        outs = qsgd_decodes(x, f"qsgd:levels={s}", 40)
        mse = np.mean(np.sum((outs - x) ** 2, axis=1))
        assert mse <= min(x.size / s**2, np.sqrt(x.size) / s) * np.sum(x**2)


def test_qsgd_ans_beats_fixed_width_and_is_counted():
    x = gaussian((128, 64), 8)
    _, fixed, out_f = roundtrip("qsgd:coder=fixed", x)
    _, auto, out_a = roundtrip("qsgd", x)
    assert fixed.payload[0] == MODE_FIXED and auto.payload[0] == MODE_ANS
    np.testing.assert_array_equal(out_f, out_a)  # same rounding (same rng), different code
    assert len(auto.payload) < 0.5 * len(fixed.payload)
    # Fixed width: ceil(log2(17)) = 5 bits per magnitude + 1 sign bit per nonzero + header.
    nnz = np.count_nonzero(out_f)
    assert len(fixed.payload) == 1 + 4 + (x.size * 5 + 7) // 8 + (nnz + 7) // 8


def test_qsgd_buckets_cut_the_error():
    x = gaussian((4096,), 9)
    whole = qsgd_decodes(x, "qsgd", 10)
    buckets = qsgd_decodes(x, "qsgd:bucket=256", 10)
    assert np.sum((buckets - x) ** 2) < 0.2 * np.sum((whole - x) ** 2)


def test_varint_roundtrip():
    v = np.array([0, 1, 127, 128, 300, 16383, 16384, 2**40, 2**62], dtype=np.uint64)
    data = varint_encode(v)
    got, end = varint_decode(data + b"\x05", 0, v.size, "t")
    assert end == len(data)
    np.testing.assert_array_equal(got, v.astype(np.int64))


def _varint_both_ways(monkeypatch, fn):
    """fn() with the small-count loop, then with the vectorized form only."""
    from gradwire.compressors import entropy

    def run():
        try:
            return fn()
        except CodecError as exc:
            return ("error", str(exc))

    small = run()
    monkeypatch.setattr(entropy, "_VARINT_SMALL", -1)
    vectorized = run()
    monkeypatch.undo()
    return small, vectorized


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 300), max_size=64))
def test_varint_small_count_loop_writes_the_vectorized_bytes(monkeypatch, values):
    small, vectorized = _varint_both_ways(monkeypatch, lambda: varint_encode(np.array(values, dtype=np.uint64)))
    assert small == vectorized


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=80) | st.lists(st.sampled_from([0x00, 0x05, 0x7F, 0x80, 0xFF]), max_size=80).map(bytes),
       st.integers(0, 64), st.integers(0, 4))
@example(b"\x80" * 10 + b"\x01", 2, 0)  # an over-long entry, then the payload ends: "ends inside" wins
@example(b"\x80" * 10 + b"\x01\x02", 2, 0)  # an over-long entry: "too long"
@example(b"\x01\x02", 1, 3)  # offset past the end
def test_varint_small_count_loop_reads_like_the_vectorized_form(monkeypatch, payload, count, offset):
    """Values, end offset and, for a malformed table, the same error (hostile payloads included)."""
    def decode():
        values, end = varint_decode(payload, offset, count, "t")
        return values.dtype.str, values.tolist(), end

    small, vectorized = _varint_both_ways(monkeypatch, decode)
    assert small == vectorized


def test_sign_payload_is_one_bit_per_entry_plus_scale():
    x = gaussian((33, 3), 10)
    _, msg, out = roundtrip("sign", x)
    assert len(msg.payload) == 4 + (99 + 7) // 8
    (scale,) = struct.unpack_from("<f", msg.payload)
    assert scale == np.float32(np.mean(np.abs(x.astype(np.float64))))


def test_powersgd_recovers_low_rank_matrices_exactly():
    rng = np.random.default_rng(11)
    m = (rng.standard_normal((40, 2)) @ rng.standard_normal((2, 30))).astype(np.float32)
    _, msg, out = roundtrip("powersgd:ef=0", m)
    assert len(msg.payload) == 4 * 2 * (40 + 30)
    np.testing.assert_allclose(out, m, rtol=0, atol=1e-5 * np.abs(m).max())


def test_powersgd_warm_start_converges_to_the_best_rank_r():
    rng = np.random.default_rng(12)
    u, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    v, _ = np.linalg.qr(rng.standard_normal((45, 45)))
    sv = 0.8 ** np.arange(45)
    m = (u[:, :45] * sv) @ v.T
    m = m.astype(np.float32)
    best = np.sqrt(np.sum(sv[2:] ** 2))  # Eckart–Young: error of the best rank-2 approximation
    _, enc, dec = pair("powersgd:ef=0")
    spec = TensorSpec("w", m.shape)
    errs = []
    for t in range(12):
        out = dec.decode(enc.encode(m, spec, ctx(t)), ctx(t))
        errs.append(np.linalg.norm(out - m))
    assert errs[-1] <= errs[0] + 1e-6
    assert errs[-1] <= best * 1.01
    stats = enc.stats()
    assert stats["lowrank_fraction"] == 1.0 and 0 < stats["approx_rel_error"] < 1


def test_powersgd_layout_and_cost():
    assert lowrank_layout((10,), 2) is None  # biases are sent dense
    assert lowrank_layout((), 2) is None
    assert lowrank_layout((3, 3), 2) is None  # 2·(3+3) >= 9: low rank would not save
    assert lowrank_layout((64, 3, 3, 3), 2) == (64, 27, 2)
    assert lowrank_bits_per_entry(128, 64, 2) == pytest.approx(32 * 2 * 192 / (128 * 64))
    x = gaussian((128, 64), 13)
    _, msg, _ = roundtrip("powersgd", x)
    assert 8 * len(msg.payload) / x.size == pytest.approx(lowrank_bits_per_entry(128, 64, 2))


def test_powersgd_state_dict_resumes_the_warm_start():
    xs = [gaussian((20, 12), s) for s in range(4)]
    spec = TensorSpec("w", (20, 12))
    _, enc, _ = pair("powersgd")
    for t in range(2):
        enc.encode(xs[t], spec, ctx(t))
    state = enc.state_dict()
    _, twin, _ = pair("powersgd")
    twin.load_state_dict(state)
    for t in (2, 3):
        assert enc.encode(xs[t], spec, ctx(t)).payload == twin.encode(xs[t], spec, ctx(t)).payload
    enc.reset()
    _, fresh, _ = pair("powersgd")
    assert enc.encode(xs[0], spec, ctx(9)).payload == fresh.encode(xs[0], spec, ctx(9)).payload


# ------------------------------------------------------------------ error feedback


@pytest.mark.parametrize(
    "spec_text", ["topk", "topk:values=fp16,ratio=0.05", "sign", "powersgd", "powersgd:rank=1", "randk:ratio=0.1"]
)
def test_error_feedback_telescopes(spec_text):
    """Σ decoded + final memory = Σ inputs: nothing is lost, only delayed."""
    _, enc, dec = pair(spec_text)
    assert isinstance(enc, ErrorFeedbackEncoder)
    specs = [TensorSpec("a", (24, 10)), TensorSpec("b", (7,))]
    rng = np.random.default_rng(14)
    sent = {s.name: np.zeros(s.shape, np.float64) for s in specs}
    got = {s.name: np.zeros(s.shape, np.float64) for s in specs}
    for t in range(15):
        for s in specs:
            g = rng.standard_normal(s.shape).astype(np.float32)
            sent[s.name] += g
            got[s.name] += dec.decode(enc.encode(g, s, ctx(t)), ctx(t))
    for s in specs:
        total = got[s.name] + enc.residuals[s.name].reshape(s.shape)
        np.testing.assert_allclose(total, sent[s.name], rtol=0, atol=1e-4)
    assert enc.stats()["ef_residual_norm"] > 0


def _heavy_ball(inputs: list[np.ndarray], m: float) -> list[np.ndarray]:
    velocity, out = None, []
    for g in inputs:
        velocity = g.astype(np.float32) if velocity is None else np.float32(m) * velocity + g
        out.append(velocity.copy())
    return out


def test_momentum_correction_without_masking_at_full_density_is_heavy_ball():
    """ratio=1 sends everything, so each round decodes to the heavy-ball velocity u_t = m·u_{t-1} + g_t."""
    _, enc, dec = pair("topk:ratio=1,momentum=0.9,masking=0")
    spec = TensorSpec("w", (5, 8))
    inputs = [gaussian((5, 8), 40 + t) for t in range(6)]
    for t, (g, u) in enumerate(zip(inputs, _heavy_ball(inputs, 0.9), strict=True)):
        np.testing.assert_allclose(dec.decode(enc.encode(g, spec, ctx(t)), ctx(t)), u, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec_text", ["topk:ratio=0.1,momentum=0.9", "randk:ratio=0.2,momentum=0.7,masking=0"])
def test_momentum_correction_telescopes_and_masks(spec_text):
    """Σ decoded + final memory = Σ velocities fed in; with masking, sent entries restart their velocity."""
    codec, enc, dec = pair(spec_text)
    spec = TensorSpec("w", (60,))
    rng = np.random.default_rng(3)
    fed = np.zeros(60, np.float64)
    got = np.zeros(60, np.float64)
    for t in range(12):
        g = rng.standard_normal(60).astype(np.float32)
        before = enc.velocities.get("w")
        velocity = g if before is None else np.float32(codec.momentum) * before + g
        fed += velocity
        out = dec.decode(enc.encode(g, spec, ctx(t)), ctx(t))
        got += out
        sent = out != 0
        assert sent.any()
        if codec.masking:
            assert not enc.velocities["w"][sent].any() and np.array_equal(enc.velocities["w"][~sent], velocity[~sent])
        else:
            np.testing.assert_array_equal(enc.velocities["w"], velocity)
    np.testing.assert_allclose(got + enc.residuals["w"], fed, rtol=0, atol=1e-4)
    assert enc.stats()["velocity_norm"] > 0
    state = enc.state_dict()
    _, twin, _ = pair(spec_text)
    twin.load_state_dict(state)
    x = rng.standard_normal(60).astype(np.float32)
    assert enc.encode(x, spec, ctx(12)).payload == twin.encode(x, spec, ctx(12)).payload
    enc.reset()
    assert enc.velocities == {} and enc.residuals == {}


def test_worker_momentum_is_declared_by_the_codec():
    assert create_codec("topk:momentum=0.9").worker_momentum == 0.9
    assert create_codec("randk:momentum=0.5").worker_momentum == 0.5
    for text in ("topk", "randk", "dense", "sign", "powersgd", "qsgd"):
        assert create_codec(text).worker_momentum == 0.0


def test_error_feedback_state_dict_roundtrip():
    _, enc, _ = pair("topk:ratio=0.1")
    spec = TensorSpec("w", (30,))
    enc.encode(gaussian((30,), 15), spec, ctx(0))
    _, twin, _ = pair("topk:ratio=0.1")
    twin.load_state_dict(enc.state_dict())
    x = gaussian((30,), 16)
    assert enc.encode(x, spec, ctx(1)).payload == twin.encode(x, spec, ctx(1)).payload
    enc.reset()
    assert enc.residuals == {}


@pytest.mark.parametrize(
    "spec_text, keys",
    [
        ("topk", {"density", "index_bits_per_nonzero", "index_bound_bits_per_nonzero", "bitmap_fraction", "ef_residual_norm"}),
        ("randk", {"density", "ef_residual_norm"}),
        ("qsgd", {"nonzero_fraction", "level_entropy_bits_per_entry", "ans_fraction"}),
        ("sign", {"mean_scale", "ef_residual_norm"}),
        ("powersgd", {"lowrank_fraction", "approx_rel_error", "ef_residual_norm"}),
    ],
)
def test_stats_are_reported(spec_text, keys):
    _, enc, _ = pair(spec_text)
    enc.encode(gaussian((64, 32), 17), TensorSpec("w", (64, 32)), ctx())
    stats = enc.stats()
    assert keys <= set(stats) and all(isinstance(v, float) and np.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("spec_text", ["topk", "randk", "qsgd", "sign", "powersgd"])
def test_whole_model_update_through_the_update_layer(spec_text):
    """The layer the worker and the PS call: every tensor of an MLP, several rounds, bytes counted."""
    codec = create_codec(spec_text)
    specs = [TensorSpec("l0.w", (128, 64)), TensorSpec("l0.b", (128,)), TensorSpec("l1.w", (10, 128)),
             TensorSpec("l1.b", (10,)), TensorSpec("scale", ())]
    up_enc, up_dec = UpdateEncoder(codec, specs), UpdateDecoder(codec, specs)
    rng = np.random.default_rng(19)
    for t in range(3):
        grads = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in specs}
        msgs = up_enc.encode(grads, ctx(t))
        out = up_dec.decode(msgs, ctx(t))
        assert {k: v.shape for k, v in out.items()} == {s.name: s.shape for s in specs}
    stats = up_enc.stats()
    assert 0 < stats["bits_per_entry"] < 8


# ------------------------------------------------------------------ malformed payloads


def malformed_cases():
    """(spec, shape, valid payload builder input, mutation, expected words)."""
    x = gaussian((20, 10), 18)
    cases = []

    def add(spec_text, arr, mutate, words):
        cases.append((spec_text, arr, mutate, words))

    # All codecs: truncation and a trailing byte.
    for spec_text in SPECS:
        add(spec_text, x, lambda p: p[:-1], "")
        add(spec_text, x, lambda p: p + b"\x00", "")
    add("topk:ef=0", x, lambda p: bytes([0x80]) + p[1:], "flag")
    add("topk:ef=0", x, lambda p: p[:1] + struct.pack("<I", 201) + p[5:], "announced")
    add("topk:ef=0", x, lambda p: p[:5] + bytes([40]) + p[6:], "rice parameter")
    add("topk:ef=0", x, lambda p: p[:6] + struct.pack("<f", np.nan) + p[10:], "nan")
    add("topk:ef=0", x, lambda p: p[:5], "")
    add("topk:ratio=0.5,ef=0", x, lambda p: p[:1] + struct.pack("<I", 99) + p[5:], "")
    add("topk:ratio=0.5,ef=0", x, lambda p: p[:-1] + bytes([p[-1] ^ 1]), "bitmap marks")
    add("topk:ratio=0.5,ef=0", x, lambda p: bytes([p[0] | 3]) + p[1:], "unknown index code")
    add("randk:ef=0", x, lambda p: struct.pack("<f", np.inf) + p[4:], "nan or inf")
    add("qsgd", x, lambda p: bytes([7]) + p[1:], "unknown level code")
    add("qsgd", x, lambda p: p[:1] + struct.pack("<f", -1.0) + p[5:], "norms")
    add("qsgd", x, lambda p: p[:1] + struct.pack("<f", np.nan) + p[5:], "norms")
    add("qsgd", x, lambda p: p[:5] + bytes([p[5] ^ 1]) + p[6:], "histogram")
    add("qsgd", x, lambda p: p[:-4] + bytes([p[-4] ^ 0x5A]) + p[-3:], "")
    add("qsgd:coder=fixed", x, lambda p: p[:5] + b"\xff" + p[6:], "exceeds levels")
    add("sign", x, lambda p: struct.pack("<f", -1.0) + p[4:], "scale")
    add("sign", x, lambda p: struct.pack("<f", np.nan) + p[4:], "scale")
    add("sign", np.ones(13, np.float32), lambda p: p[:-1] + bytes([p[-1] | 1]), "padding")
    add("powersgd", x, lambda p: struct.pack("<f", np.nan) + p[4:], "nan or inf")
    add("powersgd", np.ones(5, np.float32), lambda p: struct.pack("<f", np.inf) + p[4:], "nan or inf")
    return cases


@pytest.mark.parametrize("spec_text, x, mutate, words", malformed_cases())
def test_malformed_payload_raises_codec_error(spec_text, x, mutate, words):
    _, enc, dec = pair(spec_text)
    spec = TensorSpec("w", x.shape)
    msg = enc.encode(x, spec, ctx())
    bad = Encoded(msg.codec, spec, mutate(msg.payload))
    assert bad.payload != msg.payload
    with pytest.raises(CodecError) as info:
        dec.decode(bad, ctx())
    assert words.lower() in str(info.value).lower()
    assert "'w'" in str(info.value)  # the reason names the tensor


@pytest.mark.parametrize("spec_text", ["topk", "randk", "qsgd", "sign", "powersgd"])
def test_empty_tensor_rejects_a_non_empty_payload(spec_text):
    _, _, dec = pair(spec_text)
    with pytest.raises(CodecError):
        dec.decode(Encoded(spec_text, TensorSpec("w", (0, 4)), b"\x00\x00\x00\x00\x00"), ctx())


@settings(max_examples=150, deadline=None)
@given(
    spec_text=st.sampled_from(SPECS),
    seed=st.integers(0, 2**16),
    how=st.sampled_from(["truncate", "flip", "append", "random"]),
)
def test_fuzzed_payloads_never_crash(spec_text, seed, how):
    """A corrupt payload either raises CodecError or decodes to a finite tensor of the right shape."""
    rng = np.random.default_rng(seed)
    shape = EDGE_SHAPES[seed % len(EDGE_SHAPES)] if seed % 3 else (17, 9)
    x = rng.standard_normal(shape).astype(np.float32)
    _, enc, dec = pair(spec_text)
    spec = TensorSpec("w", shape)
    payload = bytearray(enc.encode(x, spec, ctx()).payload)
    if how == "truncate" and payload:
        payload = payload[: int(rng.integers(0, len(payload)))]
    elif how == "flip" and payload:
        i = int(rng.integers(0, len(payload)))
        payload[i] ^= 1 << int(rng.integers(0, 8))
    elif how == "append":
        payload += rng.bytes(int(rng.integers(1, 9)))
    else:
        payload = bytearray(rng.bytes(int(rng.integers(0, 64))))
    try:
        out = dec.decode(Encoded(spec_text, spec, bytes(payload)), ctx())
    except CodecError:
        return
    assert out.shape == shape and np.isfinite(out).all()


# ------------------------------------------------------------------ golden bytes


def golden_input() -> np.ndarray:
    """A fixed 37×23 input whose arithmetic is exact on every machine.

    Distinct magnitudes k/64 (no ties for top-k, whatever the partition algorithm),
    so sums of squares and means are exact in float64 and every derived float is
    a single correctly rounded operation.
    """
    rng = np.random.default_rng(2024)
    mags = rng.permutation(np.arange(1, 37 * 23 + 1)) / 64.0
    signs = rng.choice([-1.0, 1.0], mags.size)
    return (mags * signs).astype(np.float32).reshape(37, 23)


# Three rounds through one encoder, so error feedback and warm starts are covered.
GOLDEN_CASES = {
    "topk": ["topk", "topk:ratio=0.3,values=fp16"],
    "randk": ["randk", "randk:ratio=0.1,ef=0,scale=1,values=fp16"],
    "qsgd": ["qsgd", "qsgd:levels=3,coder=fixed", "qsgd:bucket=64"],
    "sign": ["sign", "sign:ef=0"],
}


def golden_payloads(spec_text: str) -> list[bytes]:
    _, enc, _ = pair(spec_text)
    x = golden_input()
    spec = TensorSpec("golden.weight", x.shape)
    return [enc.encode(x * np.float32(t + 1), spec, ctx(t)).payload for t in range(3)]


def _golden_file(codec: str) -> Path:
    return GOLDEN_DIR / f"{codec}.json"


def _compare_or_write(codec: str, record: dict) -> dict:
    path = _golden_file(codec)
    if UPDATE_GOLDEN:
        record = {
            "_comment": "Golden wire bytes of the codec; a change must be deliberate. Regenerate with "
            "GRADWIRE_UPDATE_GOLDEN=1 pytest tests/compressors/test_baselines.py and explain the change in the commit.",
            **record,
        }
        path.write_text(json.dumps(record, indent=2) + "\n")
    return json.loads(path.read_text())


@pytest.mark.parametrize("codec", sorted(GOLDEN_CASES))
def test_golden_bytes(codec):
    got = {}
    for text in GOLDEN_CASES[codec]:
        payloads = golden_payloads(text)
        got[text] = {
            "payload_bytes": [len(p) for p in payloads],
            "sha256": [hashlib.sha256(p).hexdigest() for p in payloads],
        }
    want = _compare_or_write(codec, {"cases": got})
    assert want["cases"] == got, f"{codec} wire bytes changed; if deliberate, regenerate (see {_golden_file(codec)})"


POWERSGD_GOLDEN_SPECS = ["powersgd", "powersgd:rank=1,ef=0"]


def test_golden_bytes_powersgd():
    """PowerSGD runs QR and matrix products through BLAS, whose last bits may differ by CPU.

    So the golden record pins the layout exactly (payload size, and the decoding
    of a stored payload, which is exact for rank <= 2: each output is a sum of at
    most two exact float64 products), and the encoder's floats to 1e-5.
    """
    x = golden_input()[:9, :7]
    spec = TensorSpec("golden.weight", x.shape)
    got = {}
    for text in POWERSGD_GOLDEN_SPECS:
        _, enc, dec = pair(text)
        payloads = [enc.encode(x * np.float32(t + 1), spec, ctx(t)).payload for t in range(3)]
        got[text] = {
            "payload_hex": [p.hex() for p in payloads],
            "decoded_sha256": [hashlib.sha256(dec.decode(Encoded(text, spec, p), ctx()).tobytes()).hexdigest()
                               for p in payloads],
        }
    want = _compare_or_write("powersgd", {"cases": got})["cases"]
    assert set(want) == set(got)
    for text in POWERSGD_GOLDEN_SPECS:
        _, _, dec = pair(text)
        stored = [bytes.fromhex(h) for h in want[text]["payload_hex"]]
        decoded = [hashlib.sha256(dec.decode(Encoded(text, spec, p), ctx()).tobytes()).hexdigest() for p in stored]
        assert decoded == want[text]["decoded_sha256"], "powersgd decoding changed"
        for new_hex, old in zip(got[text]["payload_hex"], stored, strict=True):
            new = bytes.fromhex(new_hex)
            assert len(new) == len(old), "powersgd payload layout changed"
            np.testing.assert_allclose(
                np.frombuffer(new, "<f4"), np.frombuffer(old, "<f4"), rtol=1e-5, atol=1e-5 * np.abs(np.frombuffer(old, "<f4")).max()
            )
