"""Pure codec tests of temporal predictive coding (``tpc``) and LAG (``lag``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwire.compressors.base import CodecError, Encoded, RoundContext, TensorSpec
from gradwire.compressors.predictive.engine import COEF_FORMATS, predict, solve_coefficients
from gradwire.compressors.predictive.tpc import TPCCodec
from gradwire.compressors.registry import create_codec
from gradwire.compressors.spec import SpecError
from gradwire.compressors.update import MODEL_TENSOR_NAME, UpdateDecoder, UpdateEncoder

GOLDEN = Path(__file__).parent / "golden" / "tpc_lag.json"
SPEC = TensorSpec("layer.weight", (6, 7))


def ctx(t: int, motion: tuple[float, ...] = (), workers: int = 1) -> RoundContext:
    return RoundContext(round=t, rank=0, seed=5, num_workers=workers, model_motion_sq=motion)


def smooth_gradients(rounds: int, numel: int, seed: int = 0, noise: float = 0.05) -> list[np.ndarray]:
    """Slowly rotating gradients with a little noise: temporally correlated, as in GD."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=numel), rng.normal(size=numel)
    out = []
    for t in range(rounds):
        g = np.cos(0.2 * t) * a + np.sin(0.2 * t) * b + noise * rng.normal(size=numel)
        out.append((g * 0.97**t).astype(np.float32))
    return out


def pair(spec_text: str):
    codec = create_codec(spec_text)
    return codec, codec.make_encoder(), codec.make_decoder()


def histories_equal(enc, dec, name: str = SPEC.name) -> bool:
    if name not in enc.cores:
        return name not in dec.cores
    he, hd = enc.history(name), dec.history(name)
    return he.shape == hd.shape and he.tobytes() == hd.tobytes()


def residual_decoder_of(codec):
    return codec._residual_codec.make_decoder(None)


# ------------------------------------------------------------------ spec


def test_spec_parsing_and_canonical_form():
    codec = create_codec("tpc:order=3,trigger=relative,eps=0.3,residual=(bf16)")
    assert isinstance(codec, TPCCodec)
    assert codec.order == 3 and codec.eps == 0.3 and codec.residual == "bf16"
    assert create_codec(codec.spec) == codec
    assert create_codec("tpc").scope == "model"
    assert create_codec("tpc:granularity=tensor").scope == "tensor"
    assert create_codec("lag").scope == "model"


@pytest.mark.parametrize(
    "bad",
    [
        "tpc:order=0",
        "tpc:trigger=sometimes",
        "tpc:eps=-1",
        "tpc:coef=fp8",
        "tpc:residual=nosuchcodec",
        "tpc:warmup=later",
        "tpc:granularity=row",
        "tpc:check=9",
        "tpc:window=0",
        "tpc:alpha=0",
        "lag:max_stale=-1",
        "tpc:bogus=1",
    ],
)
def test_bad_options_rejected(bad):
    with pytest.raises(SpecError):
        create_codec(bad)


# ------------------------------------------------------------------ closed loop


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    order=st.integers(1, 4),
    trigger=st.sampled_from(["relative", "absolute", "lag", "always"]),
    residual=st.sampled_from(["dense", "fp16", "bf16"]),
    coef=st.sampled_from(sorted(COEF_FORMATS)),
    warmup=st.sampled_from(["order", "full"]),
    ef=st.booleans(),
    max_stale=st.integers(0, 4),
    rounds=st.integers(1, 14),
    resets=st.lists(st.integers(0, 13), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_histories_identical_and_decode_is_prediction_plus_residual(
    order, trigger, residual, coef, warmup, ef, max_stale, rounds, resets, seed
):
    text = (
        f"tpc:order={order},trigger={trigger},residual={residual},coef={coef},warmup={warmup},"
        f"ef={int(ef)},max_stale={max_stale},eps=0.4,tau=2.0,alpha=3.0"
    )
    codec, enc, dec = pair(text)
    rdec = residual_decoder_of(codec)
    grads = smooth_gradients(rounds, SPEC.numel, seed)
    motion: tuple[float, ...] = ()
    for t, g in enumerate(grads):
        if t in resets:  # a reconnect: both ends reset, mid-stream
            enc.reset()
            dec.reset()
            rdec.reset()
        before = dec.history(SPEC.name) if SPEC.name in dec.cores else np.zeros((0, SPEC.numel), np.float32)
        msg = enc.encode(g.reshape(SPEC.shape), SPEC, ctx(t, motion))
        out = dec.decode(msg, ctx(t, motion)).reshape(-1)
        # decoded gradient == prediction (from the PS's prior history) + decoded residual
        n = len(msg.coefficients) // np.dtype(COEF_FORMATS[coef]).itemsize
        assert n <= before.shape[0]
        if n:
            a = np.frombuffer(msg.coefficients, COEF_FORMATS[coef]).astype(np.float32)
            pred = predict(before, list(range(n)), a)
        else:
            pred = None
            assert msg.residual is not None  # a full update always carries the residual
        if msg.residual is None:
            expected = pred
        else:
            r_hat = rdec.decode(msg.residual, ctx(t, motion)).reshape(-1).astype(np.float32)
            expected = r_hat if pred is None else pred + r_hat
        assert out.tobytes() == expected.tobytes()
        assert histories_equal(enc, dec)
        assert enc.history(SPEC.name)[0].tobytes() == out.tobytes()
        motion = (motion + (float(np.dot(out, out)) * 1e-3,))[-10:]
    # state_dict round trip: a restored pair continues bit-identically
    enc2, dec2 = codec.make_encoder(), codec.make_decoder()
    enc2.load_state_dict(enc.state_dict())
    dec2.load_state_dict(dec.state_dict())
    g = grads[-1] * 0.5
    m1, m2 = enc.encode(g, SPEC, ctx(99)), enc2.encode(g, SPEC, ctx(99))
    assert m1 == m2
    assert dec.decode(m1, ctx(99)).tobytes() == dec2.decode(m2, ctx(99)).tobytes()
    assert histories_equal(enc2, dec2) and histories_equal(enc, enc2)


def test_lossless_residual_reconstructs_gradient_when_triggered():
    _, enc, dec = pair("tpc:order=2,trigger=always,residual=dense")
    for t, g in enumerate(smooth_gradients(8, SPEC.numel)):
        out = dec.decode(enc.encode(g, SPEC, ctx(t)), ctx(t)).reshape(-1)
        np.testing.assert_allclose(out, g, rtol=0, atol=1e-6 * float(np.abs(g).max()))


def test_prediction_gain_on_correlated_gradients():
    _, enc, dec = pair("tpc:order=3,trigger=always,residual=dense")
    for t, g in enumerate(smooth_gradients(20, 500, noise=0.0)):
        dec.decode(enc.encode(g, TensorSpec("w", (500,)), ctx(t)), ctx(t))
    stats = enc.stats()
    assert stats["mean_prediction_gain"] > 100  # noiseless rotation: 2-term recurrence, p=3 nails it
    assert stats["trigger_rate"] == 1.0
    assert stats["coefficient_bits_per_round"] == pytest.approx(32 * (1 + 2 + 3 * 17) / 20)
    assert stats["residual_bits_per_entry"] == 32.0
    for key in ("coefficient_bits_per_entry", "check_bits_per_entry", "prediction_gain_db", "forced_rate"):
        assert key in stats
    assert dec.stats()["trigger_rate"] == 1.0


def test_reset_mid_stream_clears_both_histories():
    _, enc, dec = pair("tpc:order=3,trigger=always")
    grads = smooth_gradients(6, SPEC.numel)
    for t in range(4):
        dec.decode(enc.encode(grads[t], SPEC, ctx(t)), ctx(t))
    enc.reset()
    dec.reset()
    assert not enc.cores and not dec.cores
    msg = enc.encode(grads[4], SPEC, ctx(4))
    assert msg.coefficients == b"" and msg.residual is not None  # starts over with a full update
    dec.decode(msg, ctx(4))
    assert histories_equal(enc, dec)
    assert enc.stats()["resets"] == 1.0


# ------------------------------------------------------------------ warm-up


def test_warmup_full_sends_full_gradients():
    order = 3
    _, enc, dec = pair(f"tpc:order={order},warmup=full,trigger=relative,eps=1e9,max_stale=0,residual=dense")
    grads = smooth_gradients(6, SPEC.numel)
    for t, g in enumerate(grads):
        msg = enc.encode(g, SPEC, ctx(t))
        out = dec.decode(msg, ctx(t)).reshape(-1)
        if t < order:
            assert msg.coefficients == b""
            assert msg.residual is not None
            assert out.tobytes() == g.tobytes()  # the exact gradient (dense residual, no prediction)
        else:
            assert len(msg.coefficients) == 4 * order
            assert msg.residual is None  # huge eps: the prediction is used


def test_warmup_order_grows_with_history():
    _, enc, dec = pair("tpc:order=3,warmup=order,trigger=always,coef=fp16")
    sizes = []
    for t, g in enumerate(smooth_gradients(6, SPEC.numel)):
        msg = enc.encode(g, SPEC, ctx(t))
        dec.decode(msg, ctx(t))
        sizes.append(len(msg.coefficients))
    assert sizes == [0, 2, 4, 6, 6, 6]


# ------------------------------------------------------------------ triggers


def count_residuals(spec_text: str, rounds: int = 12, **ctx_kw) -> list[bool]:
    _, enc, dec = pair(spec_text)
    sent = []
    for t, g in enumerate(smooth_gradients(rounds, SPEC.numel)):
        msg = enc.encode(g, SPEC, ctx(t, **ctx_kw))
        dec.decode(msg, ctx(t, **ctx_kw))
        sent.append(msg.residual is not None)
    return sent


def test_relative_eps_zero_always_triggers():
    assert all(count_residuals("tpc:trigger=relative,eps=0,max_stale=0"))


def test_relative_huge_eps_triggers_only_at_staleness():
    assert count_residuals("tpc:trigger=relative,eps=1e9,max_stale=0") == [True] + [False] * 11
    sent = count_residuals("tpc:trigger=relative,eps=1e9,max_stale=4")
    # round 0 is the full update; then at most 3 skips in a row
    assert sent == [True, False, False, False, True, False, False, False, True, False, False, False]


def test_absolute_trigger():
    assert all(count_residuals("tpc:trigger=absolute,tau=0,max_stale=0"))
    assert count_residuals("tpc:trigger=absolute,tau=1e30,max_stale=0") == [True] + [False] * 11


def test_lag_trigger_follows_model_motion():
    # no motion yet: threshold 0, any nonzero residual triggers
    assert all(count_residuals("tpc:trigger=lag,max_stale=0", motion=()))
    # huge motion: never (after the full update)
    assert count_residuals("tpc:trigger=lag,max_stale=0", motion=(1e30,)) == [True] + [False] * 11
    # the threshold scales as 1/(alpha² N² D)
    _, enc, _ = pair("tpc:trigger=lag,max_stale=0,alpha=2,window=4")
    grads = smooth_gradients(3, SPEC.numel)
    enc.encode(grads[0], SPEC, ctx(0))
    enc.encode(grads[1], SPEC, ctx(1))
    state = enc.state_dict()
    hist = enc.cores[SPEC.name].history
    r = grads[2] - predict(hist.buf, hist.slots(hist.count), np.frombuffer(
        enc.encode(grads[2], SPEC, ctx(2)).coefficients, "<f4"))
    r2 = float(np.dot(r.astype(np.float64), r.astype(np.float64)))
    for scale, expect in ((0.9, True), (1.1, False)):
        enc.load_state_dict(state)
        # threshold = sum(motion[-4:]) / (4 · 9 · 4): put it at r2/scale
        motion = (1e9, 0.0, 0.0, 0.0, r2 * 4 * 9 * 4 * scale)  # the 1e9 is outside window=4
        msg = enc.encode(grads[2], SPEC, ctx(2, motion=motion, workers=3))
        assert (msg.residual is not None) is expect


# ------------------------------------------------------------------ least squares


@settings(max_examples=30, deadline=None)
@given(p=st.integers(1, 6), d=st.integers(8, 60), seed=st.integers(0, 2**16))
def test_gram_solve_matches_lstsq(p, d, seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(d, p))
    g = rng.normal(size=d)
    ours = solve_coefficients(h.T @ h, h.T @ g, ridge=1e-8)
    ref = np.linalg.lstsq(h, g, rcond=None)[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_encoder_coefficients_match_lstsq_on_its_history():
    d, p = 40, 3
    _, enc, dec = pair(f"tpc:order={p},trigger=always,residual=dense")
    rng = np.random.default_rng(3)
    spec = TensorSpec("w", (d,))
    for t in range(p):
        g = rng.normal(size=d).astype(np.float32)
        dec.decode(enc.encode(g, spec, ctx(t)), ctx(t))
    g = rng.normal(size=d).astype(np.float32)
    h = enc.history("w").T.astype(np.float64)  # d × p, newest first
    msg = enc.encode(g, spec, ctx(p))
    ours = np.frombuffer(msg.coefficients, "<f4")
    ref = np.linalg.lstsq(h, g.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_degenerate_history_gives_zero_coefficients():
    assert np.array_equal(solve_coefficients(np.zeros((2, 2)), np.zeros(2)), np.zeros(2))
    _, enc, dec = pair("tpc:order=2,trigger=always")
    zero = np.zeros(SPEC.numel, np.float32)
    for t in range(3):
        out = dec.decode(enc.encode(zero, SPEC, ctx(t)), ctx(t))
        assert not out.any()


# ------------------------------------------------------------------ LAG


def test_lag_reuses_last_gradient_when_not_triggered():
    codec, enc, dec = pair("lag")
    assert codec.config().fixed_unit
    grads = smooth_gradients(5, SPEC.numel)
    first = dec.decode(enc.encode(grads[0], SPEC, ctx(0)), ctx(0)).reshape(-1).copy()
    assert first.tobytes() == grads[0].tobytes()
    for t in range(1, 5):
        msg = enc.encode(grads[t], SPEC, ctx(t, motion=(1e30,)))
        assert msg.coefficients == b"" and msg.residual is None
        assert msg.payload_bytes == 1  # the one-byte history digest
        out = dec.decode(msg, ctx(t, motion=(1e30,))).reshape(-1)
        assert out.tobytes() == first.tobytes()
    # triggered: the PS gets last + innovation == the new gradient (dense innovation)
    msg = enc.encode(grads[4], SPEC, ctx(5, motion=(0.0,)))
    assert msg.residual is not None and msg.coefficients == b""
    out = dec.decode(msg, ctx(5)).reshape(-1)
    np.testing.assert_allclose(out, grads[4], atol=1e-6)
    assert histories_equal(enc, dec)
    assert enc.stats()["trigger_rate"] == pytest.approx(2 / 6)
    assert enc.stats()["coefficient_bits_per_entry"] == 0.0


def test_lag_max_stale_and_check_zero():
    _, enc, dec = pair("lag:max_stale=3,check=0")
    sent = []
    for t, g in enumerate(smooth_gradients(7, SPEC.numel)):
        msg = enc.encode(g, SPEC, ctx(t, motion=(1e30,)))
        dec.decode(msg, ctx(t))
        sent.append(msg.residual is not None)
        if msg.residual is None:
            assert msg.payload_bytes == 0  # nothing at all on a skipped round
    assert sent == [True, False, False, True, False, False, True]


# ------------------------------------------------------------------ malformed input


def test_nan_input_rejected():
    for text in ("tpc", "lag"):
        _, enc, _ = pair(text)
        g = np.ones(SPEC.numel, np.float32)
        g[3] = np.nan
        with pytest.raises(CodecError):
            enc.encode(g, SPEC, ctx(0))
        g[3] = np.inf
        with pytest.raises(CodecError):
            enc.encode(g, SPEC, ctx(0))
        with pytest.raises(CodecError):
            enc.encode(np.ones(5, np.float32), SPEC, ctx(0))


def primed(text: str = "tpc:order=2,trigger=always,residual=dense", rounds: int = 3):
    codec, enc, dec = pair(text)
    grads = smooth_gradients(rounds + 1, SPEC.numel)
    for t in range(rounds):
        dec.decode(enc.encode(grads[t], SPEC, ctx(t)), ctx(t))
    msg = enc.encode(grads[rounds], SPEC, ctx(rounds))
    return codec, dec, msg


def test_decoder_rejects_wrong_coefficient_length():
    _, dec, msg = primed()
    for coefs in (msg.coefficients[:-1], msg.coefficients + b"\0\0\0\0", msg.coefficients[:4]):
        state = dec.state_dict()
        with pytest.raises(CodecError, match="coefficient"):
            dec.decode(dataclasses.replace(msg, coefficients=coefs), ctx(3))
        # a rejected message leaves the decoder state untouched
        assert dec.state_dict()["tensors"][SPEC.name]["history"]["pushes"] == state["tensors"][SPEC.name]["history"]["pushes"]


def test_decoder_rejects_nonfinite_coefficients():
    _, dec, msg = primed()
    bad = np.frombuffer(msg.coefficients, "<f4").copy()
    bad[0] = np.nan
    with pytest.raises(CodecError, match="finite"):
        dec.decode(dataclasses.replace(msg, coefficients=bad.tobytes()), ctx(3))


def test_decoder_rejects_residual_spec_mismatch():
    _, dec, msg = primed()
    assert msg.residual is not None
    with pytest.raises(CodecError, match="residual"):
        dec.decode(dataclasses.replace(msg, residual=dataclasses.replace(msg.residual, codec="fp16")), ctx(3))
    other = TensorSpec("other", SPEC.shape)
    with pytest.raises(CodecError, match="residual spec"):
        dec.decode(dataclasses.replace(msg, residual=dataclasses.replace(msg.residual, spec=other)), ctx(3))
    short = dataclasses.replace(msg.residual, payload=msg.residual.payload[:-4])
    with pytest.raises(CodecError):
        dec.decode(dataclasses.replace(msg, residual=short), ctx(3))


def test_decoder_rejects_missing_residual_on_full_update_and_staleness():
    codec, enc, dec = pair("tpc:max_stale=2,trigger=relative,eps=1e9")
    g = smooth_gradients(3, SPEC.numel)
    msg = enc.encode(g[0], SPEC, ctx(0))
    with pytest.raises(CodecError, match="full update"):
        dec.decode(dataclasses.replace(msg, residual=None), ctx(0))
    dec.decode(msg, ctx(0))
    msg = enc.encode(g[1], SPEC, ctx(1))
    assert msg.residual is None
    dec.decode(msg, ctx(1))
    msg = enc.encode(g[2], SPEC, ctx(2))
    assert msg.residual is not None  # forced by max_stale=2
    with pytest.raises(CodecError, match="max_stale"):
        dec.decode(dataclasses.replace(msg, residual=None), ctx(2))


def test_decoder_detects_history_divergence():
    _, dec, msg = primed()
    dec.reset()  # the PS forgot (restart) but the worker did not: must not diverge silently
    with pytest.raises(CodecError):
        dec.decode(msg, ctx(3))
    _, dec, msg = primed()
    with pytest.raises(CodecError, match="digest"):
        dec.decode(dataclasses.replace(msg, payload=bytes(b ^ 0xFF for b in msg.payload)), ctx(3))
    with pytest.raises(CodecError, match="payload"):
        dec.decode(dataclasses.replace(msg, payload=msg.payload + b"\0"), ctx(3))


def test_digest_detects_one_flipped_bit_in_history():
    _, enc, dec = pair("tpc:order=2,trigger=always,check=4")
    grads = smooth_gradients(4, SPEC.numel)
    for t in range(2):
        dec.decode(enc.encode(grads[t], SPEC, ctx(t)), ctx(t))
    # the PS's stored history drifts (one mantissa bit; its digest is intact): the next
    # prediction differs, so its ĝ and chained digest differ, caught one round later
    dec.cores[SPEC.name].history.buf.view(np.uint32)[0, 0] ^= 1 << 20
    dec.decode(enc.encode(grads[2], SPEC, ctx(2)), ctx(2))
    with pytest.raises(CodecError, match="digest"):
        dec.decode(enc.encode(grads[3], SPEC, ctx(3)), ctx(3))


def test_decoder_rejects_wrong_codec_and_lag_coefficients():
    _, dec, msg = primed()
    with pytest.raises(CodecError, match="codec"):
        dec.decode(dataclasses.replace(msg, codec="tpc:order=5"), ctx(3))
    _, dec, msg = primed("lag:trigger=always")
    with pytest.raises(CodecError, match="no coefficients"):
        dec.decode(dataclasses.replace(msg, coefficients=b"\0\0\x80\x3f"), ctx(3))


def test_tensor_changing_size_rejected():
    _, enc, dec = pair("tpc")
    dec.decode(enc.encode(np.ones(SPEC.numel, np.float32), SPEC, ctx(0)), ctx(0))
    small = TensorSpec(SPEC.name, (3,))
    with pytest.raises(CodecError):
        enc.encode(np.ones(3, np.float32), small, ctx(1))


# ------------------------------------------------------------------ whole-model layer


@pytest.mark.parametrize("text", ["tpc", "tpc:granularity=tensor,residual=dense", "lag", "lag:granularity=tensor"])
def test_update_layer_scopes(text):
    codec = create_codec(text)
    specs = [TensorSpec("a.weight", (4, 3)), TensorSpec("a.bias", (4,)), TensorSpec("b.weight", (2, 4))]
    up_enc, up_dec = UpdateEncoder(codec, specs), UpdateDecoder(codec, specs)
    rng = np.random.default_rng(0)
    base = {s.name: rng.normal(size=s.shape).astype(np.float32) for s in specs}
    for t in range(6):
        grads = {k: (v * 0.9**t).astype(np.float32) for k, v in base.items()}
        msgs = up_enc.encode(grads, ctx(t))
        names = [m.spec.name for m in msgs]
        assert names == ([MODEL_TENSOR_NAME] if codec.scope == "model" else [s.name for s in specs])
        out = up_dec.decode(msgs, ctx(t))
        assert set(out) == set(base)
    for name in up_enc.encoder.cores:
        assert up_enc.encoder.history(name).tobytes() == up_dec.decoder.history(name).tobytes()
    assert "trigger_rate" in up_enc.stats()


# ------------------------------------------------------------------ golden bytes


GOLDEN_CASES = {
    "tpc": "tpc",
    "tpc_p2_fp16coef_dense": "tpc:order=2,coef=fp16,residual=dense,trigger=always",
    "tpc_warmup_full_eps": "tpc:order=2,warmup=full,eps=0.5,residual=bf16",
    "lag": "lag",
    "lag_stale2": "lag:max_stale=2,residual=fp16",
}


def golden_digest(text: str) -> str:
    """sha256 over every message field of a fixed 6-round run."""
    _, enc, dec = pair(text)
    spec = TensorSpec("w", (16,))
    h = hashlib.sha256()
    rng = np.random.default_rng(1234)
    g = rng.standard_normal(16).astype(np.float32)
    for t in range(6):
        g = (0.8 * g + 0.2 * rng.standard_normal(16)).astype(np.float32)
        msg = enc.encode(g, spec, ctx(t, motion=(0.05,) * t))
        dec.decode(msg, ctx(t))
        h.update(msg.codec.encode() + b"|" + msg.payload + b"|" + msg.coefficients + b"|")
        if msg.residual is not None:
            h.update(msg.residual.codec.encode() + b"|" + msg.residual.payload)
        h.update(b"#")
    return h.hexdigest()


def test_golden_bytes():
    got = {name: golden_digest(text) for name, text in GOLDEN_CASES.items()}
    if os.environ.get("GRADWIRE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"specs": GOLDEN_CASES, "sha256": got}, indent=2) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert want["specs"] == GOLDEN_CASES
    assert got == want["sha256"], "wire bytes changed: if deliberate, regenerate with GRADWIRE_UPDATE_GOLDEN=1"


def test_encoded_residual_is_nested_encoded():
    _, _, msg = primed()
    assert isinstance(msg.residual, Encoded)
    assert msg.payload_bytes == len(msg.payload) + len(msg.coefficients) + len(msg.residual.payload)
