"""The entropy-coded codecs: ``huffman``, ``ans`` (uniform quantizer + model) and ``fp8``.

Golden bytes live in ``tests/compressors/golden/{huffman,ans,fp8}.json`` (sha256 of each
payload for one fixed input). A wire change must be deliberate: regenerate with
``GRADWIRE_UPDATE_GOLDEN=1 pytest tests/compressors/test_entropy_codecs.py -k golden``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from gradwire.compressors.base import CodecError, RoundContext, TensorSpec
from gradwire.compressors.quantize import fp8_values
from gradwire.compressors.registry import create_codec
from gradwire.compressors.spec import SpecError

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("GRADWIRE_UPDATE_GOLDEN") == "1"
CTX = RoundContext(round=3, rank=1, seed=42)

UNIFORM_SPECS = [
    "huffman",
    "huffman:clip=max",
    "ans:clip=max,grid=midrise,bits=5",
    "huffman:model=gennorm",
    "huffman:bits=2,model=normal",
    "huffman:bits=8,model=empirical",
    "huffman:bits=1",
    "huffman:bits=3,grid=midrise,rounding=stochastic",
    "huffman:clip=3",
    "huffman:ef=1",
    "huffman:block=1,bits=3",
    "ans",
    "ans:model=zgennorm",
    "ans:bits=6,model=gennorm",
    "ans:rounding=stochastic",
]
FP8_SPECS = [
    "fp8:format=143",
    "fp8:format=152",
    "fp8:format=143,coder=huffman",
    "fp8:format=152,coder=ans",
    "fp8:coder=ans,model=empirical",
    "fp8:coder=huffman,model=empirical,ef=1",
    "fp8:format=152,coder=huffman,model=gennorm",
]
ALL_SPECS = UNIFORM_SPECS + FP8_SPECS
SHAPES = [(), (0,), (1,), (7,), (10,), (33, 17), (5000,)]


def gradient_like(shape, seed=0, beta=0.8, zeros=0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    x = stats.gennorm.rvs(beta, scale=1e-3, size=n, random_state=rng)
    x[rng.random(n) < zeros] = 0.0  # ReLU networks produce exact zeros
    return x.astype(np.float32).reshape(shape)


def roundtrip(spec_text, x, ctx=CTX, name="w"):
    codec = create_codec(spec_text)
    spec = TensorSpec(name, tuple(x.shape))
    msg = codec.make_encoder().encode(x, spec, ctx)
    return msg, codec.make_decoder().decode(msg, ctx)


def error_bound(spec_text: str, x: np.ndarray, payload: bytes) -> np.ndarray | None:
    """Per-entry error bound for one encode (None for a raw-fallback payload)."""
    codec = create_codec(spec_text)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    slack = 1e-6 * peak + 1e-30
    if payload[0] in (1, 2):
        return None
    if codec.name == "fp8":
        vals = fp8_values(codec.format)
        scale = peak / np.nanmax(vals)
        tiny = np.min(np.abs(vals[(vals != 0) & ~np.isnan(vals)])) * scale
        mbits = 3 if codec.format == "143" else 2
        return np.abs(x) * 2.0 ** -(mbits + 1) * 1.001 + tiny + slack
    (c,) = struct.unpack_from("<f", payload, 1)  # the quantizer range, as sent
    if codec.grid_kind == "midrise":
        step = 2 * c / 2**codec.bits
        outer = c - step / 2
    else:
        step = c / (2 ** (codec.bits - 1) - 1)
        outer = c
    if codec.clip == "max":
        assert outer == pytest.approx(peak, rel=1e-5)
    assert outer <= peak * (1 + 1e-5)
    inside = step if codec.rounding == "stochastic" else step / 2
    # Inside the range: half a step (a full step when rounding stochastically); beyond: saturation.
    return np.maximum(inside, np.abs(x) - outer) * 1.0001 + slack


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("spec_text", ALL_SPECS)
def test_round_trip_shapes_and_error_bounds(spec_text, shape):
    x = gradient_like(shape, seed=len(shape) + int(np.prod(shape)))
    msg, y = roundtrip(spec_text, x)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    assert msg.payload_bytes == len(msg.payload)
    if x.size == 0:
        assert msg.payload == b""
        return
    raw_bytes = 1 + 4 * x.size
    assert len(msg.payload) <= raw_bytes  # the raw fallback caps every payload
    bound = error_bound(spec_text, x, msg.payload)
    if bound is not None:
        assert (np.abs(y - x) <= bound).all()


@pytest.mark.parametrize("spec_text", ["huffman", "ans", "huffman:clip=max", "fp8:coder=huffman", "fp8"])
@pytest.mark.parametrize("magnitude", [1e-30, 1e30, 1e-40])
def test_extreme_magnitudes(spec_text, magnitude):
    base = gradient_like((3000,), seed=5) / 1e-3
    x = (base * magnitude).astype(np.float32)
    _, y = roundtrip(spec_text, x)
    assert np.isfinite(y).all()
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    assert np.linalg.norm(y64 - x64) <= 0.35 * np.linalg.norm(x64)
    # Same relative error as at unit scale (float32 subnormals near 1e-40 lose a little).
    _, y1 = roundtrip(spec_text, base.astype(np.float32))
    unit = np.linalg.norm(y1 - base) / np.linalg.norm(base)
    assert np.linalg.norm(y64 - x64) / np.linalg.norm(x64) <= unit + (0.05 if magnitude < 1e-38 else 1e-3)


@pytest.mark.parametrize("spec_text", ALL_SPECS)
def test_zero_and_constant_tensors(spec_text):
    _, y = roundtrip(spec_text, np.zeros(4000, np.float32))
    assert (y == 0).all()
    _, y = roundtrip(spec_text, np.full(4000, -0.25, np.float32))
    assert np.allclose(y, -0.25, rtol=0.07)


@pytest.mark.parametrize("spec_text", ALL_SPECS)
def test_nan_and_inf_rejected(spec_text):
    codec = create_codec(spec_text)
    for bad in (np.nan, np.inf):
        x = np.ones(20, np.float32)
        x[3] = bad
        with pytest.raises(CodecError, match="NaN or Inf"):
            codec.make_encoder().encode(x, TensorSpec("w", (20,)), CTX)


def test_small_tensor_falls_back_to_raw():
    x = np.float32([0.5, -0.25, 1e-3])
    for spec_text in ("huffman", "ans", "fp8:coder=huffman"):
        msg, y = roundtrip(spec_text, x)
        assert msg.payload[0] == 1 and len(msg.payload) == 1 + 2 * 3  # float16 is the smallest
        np.testing.assert_allclose(y, x, rtol=1e-3)
    tiny = np.float32([1e-30, -2e-30])  # float16 would flush these: float32 instead
    msg, y = roundtrip("huffman", tiny)
    assert msg.payload[0] == 2 and np.array_equal(y, tiny)
    bias = gradient_like((10,), seed=2)
    msg, _ = roundtrip("huffman", bias)
    assert len(msg.payload) <= 1 + 2 * 10


def test_stochastic_rounding_is_reproducible():
    x = gradient_like((4000,), seed=9)
    a, _ = roundtrip("ans:rounding=stochastic", x)
    b, _ = roundtrip("ans:rounding=stochastic", x)
    c, _ = roundtrip("ans:rounding=stochastic", x, ctx=RoundContext(round=4, rank=1, seed=42))
    assert a.payload == b.payload != c.payload


@pytest.mark.parametrize("spec_text", ["huffman:ef=1", "fp8:coder=ans,ef=1"])
def test_error_feedback_telescopes(spec_text):
    codec = create_codec(spec_text)
    enc, dec = codec.make_encoder(), codec.make_decoder()
    spec = TensorSpec("w", (3000,))
    total_in = np.zeros(3000, np.float64)
    total_out = np.zeros(3000, np.float64)
    for r in range(6):
        x = gradient_like((3000,), seed=r)
        ctx = RoundContext(round=r, rank=0)
        total_in += x
        total_out += dec.decode(enc.encode(x, spec, ctx), ctx)
    residual = enc.residuals["w"].astype(np.float64)
    np.testing.assert_allclose(total_out + residual, total_in, atol=1e-8)


# ------------------------------------------------------------------ efficiency and statistics


def _run_stats(spec_text: str, beta: float, n: int = 100_000, zeros: float = 0.0, rounds: int = 2) -> dict[str, float]:
    codec = create_codec(spec_text)
    enc = codec.make_encoder()
    for r in range(rounds):
        enc.encode(gradient_like((n,), seed=r, beta=beta, zeros=zeros), TensorSpec("w", (n,)), RoundContext(r, 0))
    return enc.stats()


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_ans_default_within_one_percent_of_entropy(beta):
    s = _run_stats("ans:bits=4", beta, zeros=0.1)
    assert s["coded_bits_per_symbol"] <= 1.01 * s["symbol_entropy_bits"]


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_ans_gennorm_model_on_gennorm_data(beta):
    """With data that really is GenNorm, the paper's model alone is within 1 % too."""
    s = _run_stats("ans:bits=4,model=gennorm", beta)
    assert s["coded_bits_per_symbol"] <= 1.01 * s["symbol_entropy_bits"]
    assert s["beta_mean"] == pytest.approx(beta, rel=0.1)


def test_huffman_pairs_close_the_gap_on_low_entropy_symbols():
    """Most entries in the zero cell: single-symbol Huffman pays ~0.3 bit, pairs far less."""
    single = _run_stats("huffman:block=1", 0.7, zeros=0.6)
    pairs = _run_stats("huffman", 0.7, zeros=0.6)
    assert pairs["symbol_entropy_bits"] == pytest.approx(single["symbol_entropy_bits"])
    assert single["coded_bits_per_symbol"] - single["symbol_entropy_bits"] > 0.2
    assert pairs["coded_bits_per_symbol"] - pairs["symbol_entropy_bits"] < 0.12
    x = gradient_like((4001,), seed=4, zeros=0.5)  # odd count: the last symbol is paired with 0
    for pair_spec, single_spec in (
        ("huffman", "huffman:block=1"),
        ("huffman:block=2,bits=1", "huffman:block=1,bits=1"),
        ("huffman:block=2,bits=3,model=empirical", "huffman:block=1,bits=3,model=empirical"),
    ):
        assert np.array_equal(roundtrip(pair_spec, x)[1], roundtrip(single_spec, x)[1])


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_huffman_within_0_2_bit_of_entropy(beta):
    s = _run_stats("huffman:bits=4,clip=4", beta, zeros=0.1)
    assert s["coded_bits_per_symbol"] - s["symbol_entropy_bits"] < 0.2
    assert s["huffman_empirical_bits_per_symbol"] <= s["huffman_model_bits_per_symbol"] + 1e-9


def test_zero_inflated_model_beats_plain_gennorm_on_sparse_data():
    plain = _run_stats("huffman:model=gennorm,clip=max", 1.0, zeros=0.3)  # same quantizer for both
    zero = _run_stats("huffman:model=zgennorm,clip=max", 1.0, zeros=0.3)
    assert zero["symbol_entropy_bits"] == pytest.approx(plain["symbol_entropy_bits"])
    assert zero["model_cross_entropy_bits"] < plain["model_cross_entropy_bits"]
    assert zero["model_cross_entropy_bits"] <= 1.01 * zero["symbol_entropy_bits"]


def test_stats_keys():
    s = _run_stats("huffman", 1.0, n=20_000, rounds=1)
    for key in (
        "symbol_entropy_bits",
        "coded_bits_per_symbol",
        "huffman_normal_bits_per_symbol",
        "huffman_empirical_bits_per_symbol",
        "huffman_model_bits_per_symbol",
        "model_cross_entropy_bits",
        "side_info_bits_per_entry",
        "beta_mean",
        "raw_fraction",
    ):
        assert key in s and np.isfinite(s[key])
    assert 0 < s["side_info_bits_per_entry"] < 0.1
    assert s["coded_bits_per_symbol"] >= s["symbol_entropy_bits"]


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "bad",
    [
        "huffman:bits=0",
        "huffman:bits=9",
        "huffman:model=laplace",
        "huffman:clip=-1",
        "huffman:clip=wide",
        "huffman:block=3",
        "huffman:block=2,bits=5",
        "ans:block=2",
        "huffman:bits=1,grid=midtread",  # a midtread grid needs 2 bits
        "ans:rounding=up",
        "ans:grid=square",
        "fp8:format=134",
        "fp8:coder=lz4",
        "fp8:model=normal",
        "fp8:model=max",
    ],
)
def test_bad_options(bad):
    with pytest.raises(SpecError):
        create_codec(bad)


def test_canonical_spec_strings():
    assert create_codec("huffman:bits=1").grid_kind == "midrise"
    assert create_codec("huffman:bits=2").grid_kind == "midtread"
    assert create_codec("huffman:bits=4").spec == "huffman"
    assert create_codec("ans:bits=4,model=empirical").spec == "ans"
    assert create_codec("fp8:format=152,coder=ans").spec == "fp8:format=152,coder=ans"


# ------------------------------------------------------------------ malformed payloads


def _decode(spec_text, payload, shape):
    codec = create_codec(spec_text)
    from gradwire.compressors.base import Encoded

    return codec.make_decoder().decode(Encoded(codec.spec, TensorSpec("w", shape), payload), CTX)


@pytest.mark.parametrize("spec_text", ALL_SPECS)
def test_malformed_payloads(spec_text):
    x = gradient_like((3000,), seed=11)
    msg, _ = roundtrip(spec_text, x)
    p = msg.payload
    for bad in (b"", p[:3], p[:-1], p + b"\x00", bytes([9]) + p[1:], p[:5]):
        with pytest.raises(CodecError):
            _decode(spec_text, bad, (3000,))
    with pytest.raises(CodecError):
        _decode(spec_text, p, (2999,))
    with pytest.raises(CodecError):
        _decode(spec_text, b"\x00", (0,))


def test_bad_model_parameters_rejected():
    msg, _ = roundtrip("huffman:model=gennorm", gradient_like((3000,), seed=1))
    nan_beta = msg.payload[:5] + struct.pack("<f", float("nan")) + msg.payload[9:]
    with pytest.raises(CodecError, match="model parameters"):
        _decode("huffman:model=gennorm", nan_beta, (3000,))
    msg, _ = roundtrip("huffman", gradient_like((3000,), seed=1))
    bad_p0 = msg.payload[:5] + struct.pack("<f", 1.5) + msg.payload[9:]
    with pytest.raises(CodecError, match="zero fraction"):
        _decode("huffman", bad_p0, (3000,))
    negative_clip = msg.payload[:1] + struct.pack("<f", -1.0) + msg.payload[5:]
    with pytest.raises(CodecError, match="clip"):
        _decode("huffman", negative_clip, (3000,))


def test_fp8_kinds():
    x = gradient_like((3000,), seed=1)
    coded, _ = roundtrip("fp8:coder=ans", x)
    assert coded.payload[0] == 3
    with pytest.raises(CodecError, match="coder=none"):
        _decode("fp8", coded.payload, (3000,))
    plain, y = roundtrip("fp8", x)
    assert plain.payload[0] == 0 and len(plain.payload) == 5 + 3000
    # A coded decoder accepts plain codes: the encoder falls back to them when coding does not pay.
    np.testing.assert_array_equal(_decode("fp8:coder=ans", plain.payload, (3000,)), y)
    noise = np.random.default_rng(0).uniform(-1, 1, 3000).astype(np.float32)  # ~8 bits of entropy per code
    msg, _ = roundtrip("fp8:format=143,coder=huffman,model=gennorm", noise)
    assert len(msg.payload) <= 5 + 3000


@pytest.fixture(scope="module")
def payloads():
    x = gradient_like((3000,), seed=13)
    return {s: roundtrip(s, x)[0].payload for s in ("huffman", "ans", "huffman:bits=8,model=empirical", "fp8:coder=huffman", "fp8:coder=ans,model=empirical")}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupt_payloads_never_crash(payloads, data):
    spec_text = data.draw(st.sampled_from(sorted(payloads)))
    raw = bytearray(payloads[spec_text])
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        y = _decode(spec_text, bytes(raw), (3000,))
    except CodecError:
        return
    assert y.shape == (3000,) and np.isfinite(y).all()


# ------------------------------------------------------------------ golden bytes

GOLDEN_SPECS = {
    "huffman": ["huffman", "huffman:model=gennorm", "huffman:bits=2,model=normal", "huffman:bits=8,model=empirical,grid=midrise"],
    "ans": ["ans", "ans:model=zgennorm", "ans:rounding=stochastic,grid=midrise"],
    "fp8": [
        "fp8:format=143",
        "fp8:format=152",
        "fp8:format=143,coder=huffman",
        "fp8:format=152,coder=ans,model=empirical",
        "fp8:format=143,coder=ans,model=gennorm",
    ],
}


def golden_input() -> tuple[np.ndarray, np.ndarray]:
    """A 4000-entry Laplace-like tensor with exact zeros, and a 10-entry bias (numpy's PCG64: stable)."""
    rng = np.random.default_rng(20240501)
    w = (rng.laplace(size=4000) * 1e-3).astype(np.float32)
    w[rng.random(4000) < 0.15] = 0.0
    b = (rng.standard_normal(10) * 1e-2).astype(np.float32)
    return w, b


def golden_digests(spec_text: str) -> list[str]:
    codec = create_codec(spec_text)
    enc = codec.make_encoder()
    out = []
    for name, x in zip(("golden.weight", "golden.bias"), golden_input(), strict=True):
        msg = enc.encode(x, TensorSpec(name, x.shape), CTX)
        out.append(hashlib.sha256(msg.payload).hexdigest() + f":{len(msg.payload)}")
    return out


@pytest.mark.parametrize("codec", sorted(GOLDEN_SPECS))
def test_golden_bytes(codec):
    path = GOLDEN_DIR / f"{codec}.json"
    got = {s: golden_digests(s) for s in GOLDEN_SPECS[codec]}
    if UPDATE_GOLDEN or not path.exists():
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps({"input": "tests/test_entropy_codecs.py::golden_input", "sha256:len": got}, indent=2) + "\n")
        if not UPDATE_GOLDEN:
            pytest.skip(f"wrote new golden file {path}")
    want = json.loads(path.read_text())["sha256:len"]
    assert want == got, f"{codec} wire bytes changed; if deliberate, regenerate with GRADWIRE_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("spec_text", ["ans:bits=6", "huffman:bits=4", "fp8", "fp8:coder=huffman"])
def test_huffman_statistics_wait_for_stats_and_match_eager(spec_text, monkeypatch):
    """Encoding builds no Huffman code for the statistics (the codec's own code for ``huffman`` is
    built elsewhere and not counted): ``stats()`` does, with the figures an eager count gives."""
    from gradwire.compressors.entropy_coding import symbols

    built = {"n": 0}
    real = symbols.huffman_code_lengths

    def counting(pmf, *args):
        built["n"] += 1
        return real(pmf, *args)

    monkeypatch.setattr(symbols, "huffman_code_lengths", counting)
    codec = create_codec(spec_text)
    lazy, eager = codec.make_encoder(), codec.make_encoder()
    eager.acc.PENDING_LIMIT = 1  # settles every tensor as it is added: the figures as computed before
    specs = [TensorSpec("w", (3000,)), TensorSpec("v", (40, 50))]
    for r in range(3):
        for i, spec in enumerate(specs):
            x = gradient_like(spec.shape, seed=10 * r + i, beta=1.0, zeros=0.1)
            before = built["n"]
            lazy.encode(x, spec, RoundContext(r, 0))
            assert built["n"] == before, "the lazy encoder built a Huffman code while encoding"
            eager.encode(x, spec, RoundContext(r, 0))
    assert built["n"] > 0
    lazy_stats, eager_stats = lazy.stats(), eager.stats()
    assert lazy_stats["huffman_normal_bits_per_symbol"] > 0
    assert lazy_stats == eager_stats
    assert lazy.acc._pending == []


def test_pending_huffman_statistics_are_bounded():
    enc = create_codec("ans:bits=4").make_encoder()
    enc.acc.PENDING_LIMIT = 4
    spec = TensorSpec("w", (500,))
    for r in range(9):
        enc.encode(gradient_like(spec.shape, seed=r), spec, RoundContext(r, 0))
        assert len(enc.acc._pending) < 4
