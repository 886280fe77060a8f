"""Bandwidth-adaptive compression (compressors/adaptive.py): the wrapper, its error feedback across
rate changes, its state, hostile directives and link samples, and the choice from measurements."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwire.compressors.adaptive import COOLDOWN, DEFAULT_KEY, AdaptiveState, level_key
from gradwire.compressors.base import CodecError, LinkSample, RoundContext, TensorSpec
from gradwire.compressors.registry import create_codec
from gradwire.compressors.spec import SpecError
from gradwire.compressors.update import InvalidUpdate, UpdateDecoder, UpdateEncoder

LADDERS = {
    "ans": ("adaptive:family=ans,rates=(1,2,4,8,16,32)", ["ans:bits=1", "ans:bits=2", "ans:bits=4", "ans:bits=8",
                                                          "fp16", "dense"]),
    "topk": ("adaptive:family=topk,rates=(0.01,0.1,1)", ["topk:ratio=0.01,ef=0", "topk:ratio=0.1,ef=0",
                                                          "topk:ratio=1.0,ef=0"]),
    "powersgd": ("adaptive:family=powersgd,rates=(1,2,4)", ["powersgd:rank=1,ef=0", "powersgd:rank=2,ef=0",
                                                             "powersgd:rank=4,ef=0"]),
}
SPEC = TensorSpec("layer.weight", (24, 10))


def grad(seed: int = 0, shape=SPEC.shape) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 1e-2).astype(np.float32)


def ctx_at(level: int, round_: int = 0, rank: int = 1) -> RoundContext:
    return RoundContext(round=round_, rank=rank, seed=3, directive={level_key(rank): float(level), DEFAULT_KEY: 0.0})


@pytest.mark.parametrize("family", sorted(LADDERS))
def test_every_level_round_trips_exactly_as_its_inner_codec(family):
    spec_text, inner_specs = LADDERS[family]
    codec = create_codec(spec_text + ",ef=0")
    for level, inner_text in enumerate(inner_specs):
        inner = create_codec(inner_text)
        x = grad(level)
        ctx = ctx_at(level)
        msg = codec.make_encoder().encode(x, SPEC, ctx)
        want = inner.make_encoder().encode(x, SPEC, ctx)
        assert msg.codec == codec.spec and msg.payload == bytes([level]) + want.payload, (family, level)
        out = codec.make_decoder().decode(msg, ctx)
        assert np.array_equal(out, inner.make_decoder().decode(want, ctx)), (family, level)
    # the dense top of the ans ladder is exact
    if family == "ans":
        x = grad(9)
        msg = codec.make_encoder().encode(x, SPEC, ctx_at(5))
        assert np.array_equal(codec.make_decoder().decode(msg, ctx_at(5)), x)


@settings(max_examples=25, deadline=None)
@given(levels=st.lists(st.integers(0, 5), min_size=2, max_size=8), seed=st.integers(0, 2**16))
def test_error_feedback_loses_nothing_when_the_rate_changes(levels, seed):
    """One memory across levels: Σ decoded + memory = Σ inputs, whatever the sequence of levels."""
    codec = create_codec(LADDERS["ans"][0])
    enc, dec = codec.make_encoder(), codec.make_decoder()
    sent = np.zeros(SPEC.numel, dtype=np.float64)
    total = np.zeros(SPEC.numel, dtype=np.float64)
    for t, level in enumerate(levels):
        x = grad(seed + t)
        total += x.reshape(-1)
        ctx = ctx_at(level, round_=t)
        sent += dec.decode(enc.encode(x, SPEC, ctx), ctx).reshape(-1)
    memory = enc.residuals[SPEC.name].astype(np.float64)
    np.testing.assert_allclose(sent + memory, total, atol=1e-6)


def test_the_residual_of_a_coarse_level_goes_out_at_the_next_level():
    codec = create_codec(LADDERS["ans"][0])
    enc, dec = codec.make_encoder(), codec.make_decoder()
    x0, x1 = grad(1), grad(2)
    first = dec.decode(enc.encode(x0, SPEC, ctx_at(0, 0)), ctx_at(0, 0))  # 1 bit: a large error
    dropped = x0 - first
    assert np.abs(dropped).max() > 1e-3
    second = dec.decode(enc.encode(x1, SPEC, ctx_at(5, 1)), ctx_at(5, 1))  # dense: sends x1 + the error
    np.testing.assert_allclose(second, x1 + dropped, atol=1e-7)
    assert float(np.abs(enc.residuals[SPEC.name]).max()) == 0.0
    # without error feedback the dropped part is gone for good
    plain = create_codec(LADDERS["ans"][0] + ",ef=0")
    e2 = plain.make_encoder()
    e2.encode(x0, SPEC, ctx_at(0, 0))
    np.testing.assert_array_equal(plain.make_decoder().decode(e2.encode(x1, SPEC, ctx_at(5, 1)), ctx_at(5, 1)), x1)


@pytest.mark.parametrize("family", ["ans", "powersgd"])
def test_encoder_and_decoder_state_round_trip(family):
    codec = create_codec(LADDERS[family][0])
    enc, dec = codec.make_encoder(), codec.make_decoder()
    for t, level in enumerate([0, 2, 1]):
        dec.decode(enc.encode(grad(t), SPEC, ctx_at(level, t)), ctx_at(level, t))
    enc2, dec2 = codec.make_encoder(), codec.make_decoder()
    enc2.load_state_dict(enc.state_dict())
    dec2.load_state_dict(dec.state_dict())
    ctx = ctx_at(2, 3)
    a, b = enc.encode(grad(7), SPEC, ctx), enc2.encode(grad(7), SPEC, ctx)
    assert a.payload == b.payload
    assert np.array_equal(dec.decode(a, ctx), dec2.decode(b, ctx))
    with pytest.raises(CodecError):  # a state of another ladder is refused
        create_codec("adaptive:rates=(2,4)").make_encoder().load_state_dict(enc.state_dict())


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 1.5, 6.0, 1e300])
def test_hostile_directive_levels_are_refused_at_both_ends(value):
    codec = create_codec(LADDERS["ans"][0])
    bad = RoundContext(round=0, rank=1, directive={level_key(1): value})
    with pytest.raises(CodecError, match="directive level"):
        codec.make_encoder().encode(grad(), SPEC, bad)
    msg = codec.make_encoder().encode(grad(), SPEC, ctx_at(0))
    with pytest.raises(CodecError, match="directive level"):
        codec.make_decoder().decode(msg, bad)


def test_a_payload_at_another_level_than_the_directive_is_refused():
    codec = create_codec(LADDERS["ans"][0])
    msg = codec.make_encoder().encode(grad(), SPEC, ctx_at(3))
    with pytest.raises(CodecError, match="level 3"):
        codec.make_decoder().decode(msg, ctx_at(1))
    forged = type(msg)(msg.codec, msg.spec, bytes([200]) + msg.payload[1:])
    with pytest.raises(CodecError):
        codec.make_decoder().decode(forged, ctx_at(3))
    dec = UpdateDecoder(codec, [SPEC])
    with pytest.raises(InvalidUpdate):
        dec.decode([type(msg)(msg.codec, msg.spec, b"")], ctx_at(3))
    # the update layer passes the directive through: the same level decodes
    enc = UpdateEncoder(codec, [SPEC])
    from gradwire.compressors.base import Directive
    msgs = enc.encode({SPEC.name: grad()}, RoundContext(round=0, rank=1),
                      Directive(values={level_key(1): 5.0}))
    assert msgs[0].payload[0] == 5
    assert np.array_equal(dec.decode(msgs, ctx_at(5))[SPEC.name], grad())


@pytest.mark.parametrize("spec_text", [
    "adaptive:rates=()", "adaptive:rates=(4,2)", "adaptive:rates=(2,2)", "adaptive:rates=(9)",
    "adaptive:family=topk,rates=(0,0.5)", "adaptive:family=powersgd,rates=(0.5)", "adaptive:family=qsgd",
    "adaptive:target=-1", "adaptive:target=nan", "adaptive:budget=-5", "adaptive:start=4", "adaptive:headroom=0",
    "adaptive:rates=(1,2,3,4,5,6,7,8,16,32,1,2,3,4,5,6,7)",
])
def test_bad_options_are_refused(spec_text):
    with pytest.raises(SpecError):
        create_codec(spec_text)


# ------------------------------------------------------------------ the choice from measurements


DOWN = 250_000  # a dense LeNet-5 model message


def sample(round_: int, up: int, transfer: float, compute: float = 0.05) -> LinkSample:
    return LinkSample(round=round_, downlink_bytes=DOWN, uplink_bytes=up, transfer_seconds=transfer,
                      compute_seconds=compute)


def message_bytes(level: int) -> int:
    return {0: 16_000, 1: 31_000, 2: 62_000, 3: 247_000}[level]


def drive(state: AdaptiveState, rounds: int, seconds_per_byte: dict[int, float]) -> list[dict[int, int]]:
    """Rounds of open_round + one measured sample per rank at the bytes its level costs."""
    chosen = []
    for r in range(rounds):
        values = state.open_round(r, sorted(seconds_per_byte))
        levels = {rank: int(values[level_key(rank)]) for rank in seconds_per_byte}
        chosen.append(levels)
        for rank, spb in seconds_per_byte.items():
            up = message_bytes(levels[rank])
            state.observe_link(rank, sample(r, up, (DOWN + up) * spb))
    return chosen


def test_the_rate_follows_each_workers_measured_throughput():
    codec = create_codec("adaptive:rates=(2,4,8,32),target=0.45")
    state = codec.make_cross_worker_state()
    ten_mbit, hundred_mbit = 8 / 10e6, 8 / 100e6
    chosen = drive(state, 6, {0: ten_mbit, 1: ten_mbit, 2: hundred_mbit})
    assert chosen[0] == {0: 0, 1: 0, 2: 0}  # nothing measured yet: the start level
    # 10 Mbit/s: 0.2 s for the dense model down + 0.05 s compute; dense up (0.2 s) misses 0.9 x 0.45 s
    assert chosen[-1] == {0: 2, 1: 2, 2: 3}, chosen
    last = state.stats()["adaptive_rounds"][-1]
    assert last["rate"] == {"0": 8.0, "1": 8.0, "2": 32.0}
    assert last["throughput_mbit"]["0"] == pytest.approx(10.0) and last["throughput_mbit"]["2"] == pytest.approx(100.0)
    assert all(s <= 0.45 for s in last["measured_s"].values())
    # the link slows down: the choice follows within a few rounds
    slow = drive(state, 6, {0: 8 / 2e6, 1: ten_mbit, 2: hundred_mbit})
    assert slow[-1][0] == 0 and slow[-1][2] == 3


def test_a_byte_budget_caps_the_rate_whatever_the_link():
    state = create_codec("adaptive:rates=(2,4,8,32),budget=40000").make_cross_worker_state()
    chosen = drive(state, 6, {0: 8 / 1e9})
    assert chosen[-1] == {0: 1}  # 31 kB fits 40 kB, 62 kB does not


def test_hostile_or_empty_samples_are_ignored_and_a_departed_worker_is_measured_afresh():
    codec = create_codec("adaptive:rates=(2,4,8,32),target=0.45,start=1")
    state = codec.make_cross_worker_state()
    state.open_round(0, [0])
    for bad in (sample(0, 1000, math.nan), sample(0, 1000, 0.1, compute=-1.0), sample(0, 1000, math.inf),
                LinkSample(0, 0, 0, 0.1, 0.1)):
        state.observe_link(0, bad)
    assert state.links == {} and state.level_bytes == {}
    assert state.open_round(1, [0])[level_key(0)] == 1.0
    state.observe_link(0, sample(1, 31_000, 1e-9))  # a zero transfer (loopback): clamped, not infinite
    assert math.isfinite(state.links[0].throughput)
    # the fastest link there is, but levels 2 and 3 were never measured: one level up at a time
    assert state.open_round(2, [0])[level_key(0)] == 2.0
    state.forget_worker(0)
    assert state.open_round(3, [0])[level_key(0)] == 1.0


def test_the_state_survives_a_checkpoint():
    codec = create_codec("adaptive:rates=(2,4,8,32),target=0.45")
    state = codec.make_cross_worker_state()
    drive(state, 4, {0: 8 / 10e6, 2: 8 / 100e6})
    restored = codec.make_cross_worker_state()
    restored.load_state_dict(state.state_dict())
    assert restored.stats() == state.stats()
    assert restored.open_round(4, [0, 2]) == state.open_round(4, [0, 2])


def test_the_choice_counts_each_levels_encoding_time():
    """A slow encoder at the cheap levels (an entropy coder on a loaded machine) can cost more time
    than it saves: on a 10 Mbit/s link the PS then picks fp16, a cast, over 2-bit ans."""
    codec = create_codec("adaptive:rates=(2,4,8,16,32),target=0.45,headroom=0.8")
    state = codec.make_cross_worker_state()
    compute = {0: 0.30, 1: 0.30, 2: 0.30, 3: 0.02, 4: 0.02}  # training 0.02 s + encoding
    sizes = {0: 16_000, 1: 31_000, 2: 62_000, 3: 124_000, 4: 247_000}
    spb = {0: 8 / 10e6, 1: 8 / 100e6}
    chosen = []
    for r in range(8):
        values = state.open_round(r, [0, 1])
        levels = {rank: int(values[level_key(rank)]) for rank in spb}
        chosen.append(levels)
        for rank, level in levels.items():
            up = sizes[level]
            state.observe_link(rank, LinkSample(r, DOWN, up, (DOWN + up) * spb[rank], compute[level]))
    # 2 bits at 10 Mbit/s: 0.3 + 0.21 s; fp16: 0.02 + 0.30 s (fits 0.8 x 0.45 s); dense: 0.02 + 0.40 s
    assert chosen[-1] == {0: 3, 1: 4}, chosen
    assert state.level_compute_estimate(3) == pytest.approx(0.02)
    # a level never used borrows the nearest used level's compute time
    fresh = codec.make_cross_worker_state()
    fresh.level_compute = {0: [0.3], 4: [0.02, 0.5, 0.01]}  # the median: one slow round does not count
    assert fresh.level_compute_estimate(3) == 0.02 and fresh.level_compute_estimate(1) == 0.3
    assert fresh.level_compute_estimate(2) == 0.3  # a tie: the slower neighbour


def test_a_round_slowed_by_the_machine_does_not_swing_the_choice():
    """One round in a few takes many times the usual compute time on a loaded machine: the median
    of the last rounds ignores it, where an average would drop the rate for the rounds after."""
    state = create_codec("adaptive:rates=(2,4,8,16,32),target=0.45,headroom=0.8").make_cross_worker_state()
    sizes = {0: 16_000, 1: 31_000, 2: 62_000, 3: 124_000, 4: 247_000}
    chosen = []
    for r in range(16):
        level = int(state.open_round(r, [0])[level_key(0)])
        chosen.append(level)
        compute = 0.6 if r % 4 == 3 else 0.02
        state.observe_link(0, LinkSample(r, DOWN, sizes[level], (DOWN + sizes[level]) * 8 / 10e6, compute))
    # 10 Mbit/s: fp16 takes 0.02 + 0.30 s and fits 0.8 x 0.45 s; dense (0.42 s) does not. The
    # stalled rounds (0.6 s of training) miss the target at any level, so they bar nothing.
    assert chosen[:3] == [0, 1, 2] and chosen[3:] == [3] * 13, chosen  # climbing one level per round


def test_the_rate_climbs_one_level_at_a_time_into_levels_nobody_measured():
    """An entropy coder's bytes do not grow in proportion to its bits: scaled from 2 bits (1 kB),
    dense would look like 16 kB and fit a 5 Mbit/s link's 0.2 s target; it is 247 kB (0.42 s)."""
    state = create_codec("adaptive:rates=(2,4,8,16,32),target=0.2,headroom=0.8").make_cross_worker_state()
    down, sizes = 16_000, {0: 1_000, 1: 10_000, 2: 27_000, 3: 124_000, 4: 247_000}
    compute = {0: 0.04, 1: 0.04, 2: 0.04, 3: 0.01, 4: 0.01}  # the entropy coder's encoding, or a cast
    chosen, measured = [], []
    for r in range(30):
        level = int(state.open_round(r, [0])[level_key(0)])
        chosen.append(level)
        sample = LinkSample(r, down, sizes[level], (down + sizes[level]) * 8 / 5e6, compute[level])
        measured.append(sample.transfer_seconds + sample.compute_seconds)
        state.observe_link(0, sample)
    assert all(b - a <= 1 for a, b in zip(chosen, chosen[1:], strict=False)), chosen
    assert 4 not in chosen, chosen  # dense (0.42 s) never tried
    # fp16 is tried once (0.234 s, its scaled bytes said 0.15 s), then barred: 8 bits (0.11 s) fits
    assert sum(m > 0.2 for m in measured) == 1 and chosen[-1] == 2, (chosen, measured)


def test_a_round_over_the_target_bars_the_level_for_a_while_and_longer_after_each_miss():
    """A link hiccup (1.5 x the transfer time) makes fp16 miss the 0.45 s target where 8 bits would
    have made it: the worker drops below fp16 for COOLDOWN rounds, then for twice as long after a
    second miss, instead of returning at once (its median throughput ignores one slow round)."""
    codec = create_codec("adaptive:rates=(2,4,8,16,32),target=0.45,headroom=0.8")
    state = codec.make_cross_worker_state()
    sizes = {0: 16_000, 1: 31_000, 2: 62_000, 3: 124_000, 4: 247_000}
    chosen = []
    for r in range(40):
        if r == 10:  # the bars survive a checkpoint
            restored = codec.make_cross_worker_state()
            restored.load_state_dict(state.state_dict())
            state = restored
        level = int(state.open_round(r, [0])[level_key(0)])
        chosen.append(level)
        hiccup = 1.5 if r in (6, 16) else 1.0
        state.observe_link(0, LinkSample(r, DOWN, sizes[level], hiccup * (DOWN + sizes[level]) * 8 / 10e6, 0.02))
    first_bar, second_bar = range(7, 7 + COOLDOWN), range(17, 17 + 2 * COOLDOWN)
    assert chosen[:4] == [0, 1, 2, 3] and chosen[6] == chosen[16] == 3, chosen
    assert all(chosen[r] == 2 for r in (*first_bar, *second_bar)), chosen
    assert chosen[7 + COOLDOWN] == 3 and chosen[17 + 2 * COOLDOWN:] == [3] * (40 - 17 - 2 * COOLDOWN), chosen


def test_the_prediction_is_at_least_the_workers_own_measured_round_trips_at_the_level():
    state = create_codec("adaptive:rates=(2,4,8,16,32),target=0.45").make_cross_worker_state()
    drive(state, 3, {0: 8 / 10e6})
    model = state.predicted_seconds(0, 1)
    assert model is not None and model < 0.3
    state.measured[0] = {1: [(1, 0.5), (2, 0.6)]}
    assert state.predicted_seconds(0, 1, 3) == model  # two rounds: one stalled round would be the median
    state.measured[0][1].append((3, 0.55))
    assert state.predicted_seconds(0, 1, 4) == pytest.approx(0.55)
    assert state.predicted_seconds(0, 1, 60) == model  # older than MEASURED_AGE rounds: the link may have changed
