"""Bandwidth-adaptive compression (``adaptive``): each round's rate chosen per worker from its measured link.

A wrapper around a *ladder* of settings of one inner codec family, cheapest first:

* ``family=ans`` (the default): ``rates`` are bit widths 1..8 of the entropy-coded uniform quantizer
  ``ans:bits=b`` (docs/algorithms.md §2), 16 means ``fp16`` and 32 ``dense`` (float32, exact). A
  biased, contracting quantizer, as error feedback needs (QSGD's unbiased levels are not: its
  error at few levels exceeds the signal, and a memory of it grows without bound);
* ``family=topk``: ``rates`` are top-k ratios in (0, 1];
* ``family=powersgd``: ``rates`` are PowerSGD ranks.

**Who chooses.** Codecs are pure (no clock, no I/O), so the rate is chosen by the codec's PS-wide
state (``AdaptiveState``, a ``CrossWorkerState``) from link measurements the round engine feeds it
through ``CrossWorkerState.observe_link``: for every accepted update, the bytes of the model message
the PS sent the worker before it, the bytes of the update, and the transfer time (arrival − send −
the worker's reported compute time). At ``open_round`` the state picks one ladder level per worker
and publishes it in the round's directive values (``adaptive.level.<rank>``, plus
``adaptive.level.default`` for a worker that joins during the round). The same values reach the
worker's encoder and the PS's decoder through ``RoundContext.directive``, so both ends always agree
on the rate; the payload's first byte repeats the level and the decoder refuses a mismatch.

**The choice.** Per worker, with throughput B (bytes/s, the median of its last rounds), compute
time c(ℓ) and downlink message bytes D from its measurements, and U(ℓ) the predicted uplink bytes
at level ℓ: the highest level with ``c(ℓ) + (D + U(ℓ)) / B ≤ headroom · target`` (``target``
seconds per round) and ``U(ℓ) ≤ budget`` (``budget`` bytes per update); when no level fits, the
one predicted fastest (within the budget). Either limit may be off (0). U(ℓ) is the average
observed message size at ℓ once ℓ has been used; before, it is scaled from the nearest observed
level in proportion to the rate (bits, ratio or rank: the inner payloads grow linearly in it).
The compute time the worker reports includes encoding, which differs by level (an entropy coder
costs tens of milliseconds per update on a loaded machine, more than it saves on a fast link), so
c(ℓ) is the worker's own average plus the difference between the levels' average compute times
over all workers (a level not used yet: that of the nearest used level). The link model lumps the fixed per-message costs
(parsing, the worker loading the model) into B; that is what the target is measured against.
Once the worker has used ℓ in ``MEASURED_MIN`` rounds or more, the prediction is at least the median
of its own measured round trips at ℓ over the last ``MEASURED_AGE`` rounds (the model misjudges fixed costs when it scales B).

**Staying within the target** (three rules on top of the prediction):

* *climb one level at a time into the unknown*: a level above the worker's current one whose bytes
  and compute time nobody has measured yet may only be the next level up (its bytes are scaled
  from a neighbour's, and an entropy coder's bytes do not grow in proportion to the bits); levels
  already measured (by any worker) and every lower level may be chosen directly;
* *react to a miss*: a round whose measured round trip exceeds the target at level ℓ bars ℓ and
  every level above it for that worker for ``COOLDOWN`` rounds, doubled for each further miss at
  ℓ (at most ``MAX_COOLDOWN``), so the worker does not oscillate between a level that misses and
  one below. A miss that no cheaper level would have avoided under that round's own measured
  throughput and compute time (the machine stalled the worker's training) bars nothing: the
  median estimates already ignore such a round, and dropping the rate would not help;
* *headroom*: levels are planned against ``headroom · target``.

**Error feedback** (``ef=1``, the default) is kept by the wrapper, not the inner codecs (which run
with ``ef=0``): one memory per tensor, ``v = x + e; send C_ℓ(v); e ← v − C_ℓ⁻¹(C_ℓ(v))``, whatever
ℓ is this round. When the level changes, what the old level dropped is still in ``e`` and goes out
at the new level: nothing is lost at a switch (per-level memories would strand the residual of a
level that is not used again). Inner codecs with state of their own (PowerSGD's warm start) keep
it per level; both ends update a level's state only in rounds that use it, so they stay mirrored.

Payload: ``u8 level`` + the inner codec's payload.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from gradwire.compressors.base import (
    Codec,
    CodecError,
    CrossWorkerState,
    Decoder,
    Encoded,
    Encoder,
    LinkSample,
    RoundContext,
    TensorSpec,
    check_input,
)
from gradwire.compressors.registry import create_codec, register

FAMILIES = ("ans", "topk", "powersgd")
LEVEL_KEY = "adaptive.level"
DEFAULT_KEY = f"{LEVEL_KEY}.default"
MAX_LEVELS = 16  # the level travels in one payload byte; a longer ladder is no use anyway
HALF_BITS, DENSE_BITS = 16, 32
# Exponential averaging of the message sizes: half the weight on the newest round.
SMOOTHING = 0.5
# Throughput and compute time are the median of a worker's last WINDOW rounds: on a loaded machine
# one round in five or so takes several times the usual compute time, which an average would carry
# into the next rounds' choices; the median ignores such rounds and still follows a link that
# changes within WINDOW // 2 + 1 rounds.
WINDOW = 9
# Transfers measured shorter than this are clamped (loopback, clock granularity): no division by ~0.
MIN_TRANSFER_S = 1e-3
# Rounds of choices kept for the summary and the checkpoint (a bound on memory for long runs).
MAX_HISTORY = 100_000
# A worker's own measured round trips at a level count for the prediction this many rounds long: long
# enough to span a stay at a level, short enough that a link that got faster is tried again.
MEASURED_AGE = 50
MEASURED_MIN = 3  # fewer samples: one stalled round would be the median
# After a round over the target at a level, the level (and those above) is barred for the worker for
# this many rounds, doubled at each further miss there, at most MAX_COOLDOWN.
COOLDOWN = 8
MAX_COOLDOWN = 64


def level_key(rank: int) -> str:
    return f"{LEVEL_KEY}.{rank}"


def parse_rates(family: str, text: str) -> tuple[float, ...]:
    """The ladder's rates, cheapest first; raises ValueError with the reason."""
    parts = [p.strip() for p in text.replace("/", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError("rates is empty; give the ladder, e.g. rates=(2,4,8)")
    if len(parts) > MAX_LEVELS:
        raise ValueError(f"at most {MAX_LEVELS} rates, got {len(parts)}")
    try:
        rates = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"rates must be numbers, got {text!r}") from None
    if any(not math.isfinite(r) for r in rates) or list(rates) != sorted(set(rates)):
        raise ValueError(f"rates must be finite and strictly increasing (cheapest first), got {text!r}")
    if family == "ans":
        if any(r != int(r) or not (1 <= r <= 8 or r in (HALF_BITS, DENSE_BITS)) for r in rates):
            raise ValueError(f"ans rates are bit widths 1..8, 16 (fp16) or 32 (dense); got {text!r}")
    elif family == "topk":
        if any(not 0 < r <= 1 for r in rates):
            raise ValueError(f"topk rates are ratios in (0, 1]; got {text!r}")
    elif family == "powersgd":
        if any(r != int(r) or not 1 <= r <= 1024 for r in rates):
            raise ValueError(f"powersgd rates are ranks 1..1024; got {text!r}")
    return rates


def inner_spec(family: str, rate: float) -> str:
    """The inner codec of one ladder level, its own error feedback off (the wrapper keeps one)."""
    if family == "ans":
        bits = int(rate)
        return {HALF_BITS: "fp16", DENSE_BITS: "dense"}.get(bits, f"ans:bits={bits}")
    if family == "topk":
        return f"topk:ratio={rate!r},ef=0"
    return f"powersgd:rank={int(rate)},ef=0"


def level_from_directive(directive: Mapping[str, float], rank: int, levels: int, start: int) -> int:
    """This worker's ladder level from the round's directive values.

    No level in the directive at all (a codec used outside a PS run, e.g. ``gradwire.codecs``): the
    ``start`` level, on both ends alike. A value that is present must be an integer index of the
    ladder: a directive comes from the PS, and a corrupt or hostile one is refused, not clamped, so
    that a worker never encodes at a level its PS did not ask for.
    """
    raw = directive.get(level_key(rank), directive.get(DEFAULT_KEY))
    if raw is None:
        return start
    value = float(raw)
    if not math.isfinite(value) or value != int(value) or not 0 <= value < levels:
        raise CodecError(f"adaptive: directive level {raw!r} for rank {rank} is not a level 0..{levels - 1}")
    return int(value)


@register
@dataclass(frozen=True)
class AdaptiveCodec(Codec):
    name = "adaptive"
    stateless_decoder = False  # per-level inner state (PowerSGD), and the rate comes from a directive
    has_cross_worker_state = True
    family: str = "ans"
    rates: str = "2,4,8,32"
    target: float = 0.0  # seconds per round (compute + transfer of each worker); 0 = no time target
    budget: int = 0  # uplink message bytes per update; 0 = no byte budget
    start: int = 0  # level before a worker's link has been measured (0: the cheapest)
    headroom: float = 0.9  # plan for this fraction of the target: measurements are noisy
    ef: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        rates = parse_rates(self.family, self.rates)
        if not (math.isfinite(self.target) and self.target >= 0):
            raise ValueError(f"target must be seconds >= 0 (0: none), got {self.target}")
        if self.budget < 0:
            raise ValueError(f"budget must be bytes >= 0 (0: none), got {self.budget}")
        if not 0 <= self.start < len(rates):
            raise ValueError(f"start must be a level 0..{len(rates) - 1}, got {self.start}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")

    @cached_property
    def rate_values(self) -> tuple[float, ...]:
        return parse_rates(self.family, self.rates)

    @cached_property
    def inner_codecs(self) -> tuple[Codec, ...]:
        return tuple(create_codec(inner_spec(self.family, r)) for r in self.rate_values)

    def make_encoder(self) -> Encoder:
        return AdaptiveEncoder(self)

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return AdaptiveDecoder(self)

    def make_cross_worker_state(self) -> CrossWorkerState:
        return AdaptiveState(self)


class AdaptiveEncoder(Encoder):
    def __init__(self, codec: AdaptiveCodec):
        self.codec = codec
        self.inner = [c.make_encoder() for c in codec.inner_codecs]
        # What the PS will decode at each level, for the wrapper's one error-feedback memory.
        self.mirrors = [c.make_decoder() for c in codec.inner_codecs]
        self.residuals: dict[str, np.ndarray] = {}
        self.level_rounds = [0] * len(self.inner)
        self.switches = 0
        self.last_level: int | None = None

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        c = self.codec
        level = level_from_directive(ctx.directive, ctx.rank, len(self.inner), c.start)
        flat = check_input(x, spec)
        memory = self.residuals.get(spec.name) if c.ef else None
        corrected = flat if memory is None else flat + memory
        msg = self.inner[level].encode(corrected, spec, ctx)
        if msg.coefficients or msg.residual is not None:  # the ladder's families send neither
            raise CodecError(f"adaptive: inner codec {msg.codec!r} sent fields the wrapper cannot carry")
        if c.ef:
            decoded = self.mirrors[level].decode(msg, ctx)
            self.residuals[spec.name] = corrected - np.asarray(decoded, dtype=np.float32).reshape(-1)
        self.level_rounds[level] += 1
        if self.last_level is not None and level != self.last_level:
            self.switches += 1
        self.last_level = level
        return Encoded(c.spec, spec, bytes([level]) + msg.payload)

    def reset(self) -> None:
        self.residuals.clear()
        for encoder in self.inner:
            encoder.reset()
        for decoder in self.mirrors:
            decoder.reset()
        self.level_rounds = [0] * len(self.inner)
        self.switches = 0
        self.last_level = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "residuals": {k: v.copy() for k, v in self.residuals.items()},
            "inner": [e.state_dict() for e in self.inner],
            "mirrors": [d.state_dict() for d in self.mirrors],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["inner"]) != len(self.inner) or len(state["mirrors"]) != len(self.mirrors):
            raise CodecError(f"adaptive: state has {len(state['inner'])} levels, this ladder {len(self.inner)}")
        self.residuals = {k: np.array(v, dtype=np.float32).reshape(-1) for k, v in state["residuals"].items()}
        for encoder, s in zip(self.inner, state["inner"], strict=True):
            encoder.load_state_dict(s)
        for decoder, s in zip(self.mirrors, state["mirrors"], strict=True):
            decoder.load_state_dict(s)

    def stats(self) -> dict[str, float]:
        used = sum(self.level_rounds)  # tensor encodings, by level
        out = {"adaptive_level_switches": float(self.switches)}
        if used:
            rates = self.codec.rate_values
            out["adaptive_mean_rate"] = float(sum(n * r for n, r in zip(self.level_rounds, rates, strict=True)) / used)
        if self.codec.ef:
            out["ef_residual_norm"] = float(np.sqrt(sum(float(np.dot(r, r)) for r in self.residuals.values())))
        return out


class AdaptiveDecoder(Decoder):
    def __init__(self, codec: AdaptiveCodec):
        self.codec = codec
        self.inner = [c.make_decoder() for c in codec.inner_codecs]

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        if not msg.payload:
            raise CodecError(f"adaptive payload for {msg.spec.name!r} is empty (no level byte)")
        level = msg.payload[0]
        expected = level_from_directive(ctx.directive, ctx.rank, len(self.inner), self.codec.start)
        if level != expected:
            raise CodecError(f"adaptive: {msg.spec.name!r} is encoded at level {level}; "
                             f"this round's directive says {expected}")
        inner = Encoded(self.codec.inner_codecs[level].spec, msg.spec, msg.payload[1:])
        return self.inner[level].decode(inner, ctx)

    def reset(self) -> None:
        for d in self.inner:
            d.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [d.state_dict() for d in self.inner]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["inner"]) != len(self.inner):
            raise CodecError(f"adaptive: state has {len(state['inner'])} levels, this ladder {len(self.inner)}")
        for d, s in zip(self.inner, state["inner"], strict=True):
            d.load_state_dict(s)


@dataclass
class LinkEstimate:
    """One worker's link as the PS measured it over its last ``WINDOW`` rounds."""

    throughputs: list[float]  # bytes per second, downlink message + uplink message over the transfer time
    computes: list[float]  # seconds of training and encoding, as the worker reported them
    downlink_bytes: float  # the last model message
    samples: int = 1
    level: int | None = None  # the level of the last measured round

    @property
    def throughput(self) -> float:
        return float(np.median(self.throughputs))

    @property
    def compute_s(self) -> float:
        return float(np.median(self.computes))

    def update(self, sample: LinkSample) -> None:
        self.throughputs = [*self.throughputs, sample_throughput(sample)][-WINDOW:]
        self.computes = [*self.computes, sample.compute_seconds][-WINDOW:]
        self.downlink_bytes = float(sample.downlink_bytes)
        self.samples += 1


def sample_throughput(sample: LinkSample) -> float:
    return (sample.downlink_bytes + sample.uplink_bytes) / max(sample.transfer_seconds, MIN_TRANSFER_S)


def clean_sample(sample: LinkSample) -> LinkSample | None:
    """The sample with its figures checked: the compute time comes from the worker (hostile input),
    the rest from the PS's own clock and counters. None when nothing usable is left."""
    nums = (sample.downlink_bytes, sample.uplink_bytes, sample.transfer_seconds, sample.compute_seconds)
    if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in nums):
        return None
    if sample.downlink_bytes + sample.uplink_bytes <= 0:
        return None
    return sample


@dataclass
class RoundChoice:
    """What the state chose for one round and, once the updates arrived, what it measured."""

    round: int
    levels: dict[int, int]
    predicted_s: dict[int, float] = field(default_factory=dict)
    measured_s: dict[int, float] = field(default_factory=dict)  # compute + transfer, as measured
    throughput: dict[int, float] = field(default_factory=dict)  # bytes/s of this round's sample
    uplink_bytes: dict[int, int] = field(default_factory=dict)

    def to_dict(self, rates: tuple[float, ...]) -> dict[str, Any]:
        return {
            "round": self.round,
            "level": {str(r): lv for r, lv in sorted(self.levels.items())},
            "rate": {str(r): rates[lv] for r, lv in sorted(self.levels.items())},
            "predicted_s": {str(r): v for r, v in sorted(self.predicted_s.items())},
            "measured_s": {str(r): v for r, v in sorted(self.measured_s.items())},
            "throughput_mbit": {str(r): 8e-6 * v for r, v in sorted(self.throughput.items())},
            "uplink_bytes": {str(r): v for r, v in sorted(self.uplink_bytes.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundChoice:
        def ints(m: Mapping[str, Any]) -> dict[int, Any]:
            return {int(k): v for k, v in m.items()}

        return cls(int(d["round"]), {int(k): int(v) for k, v in d["level"].items()}, ints(d["predicted_s"]),
                   ints(d["measured_s"]), {int(k): v / 8e-6 for k, v in d["throughput_mbit"].items()},
                   ints(d["uplink_bytes"]))


class AdaptiveState(CrossWorkerState):
    """The PS side of the choice: link estimates per worker, message sizes per level, the choices."""

    def __init__(self, codec: AdaptiveCodec):
        self.codec = codec
        self.links: dict[int, LinkEstimate] = {}
        self.level_bytes: dict[int, float] = {}  # average uplink message bytes observed at each level
        self.level_compute: dict[int, list[float]] = {}  # the last compute times (training + encoding) at each level
        self.history: list[RoundChoice] = []
        self.open: RoundChoice | None = None
        self.current: dict[int, int] = {}  # each worker's level in its last chosen round
        self.measured: dict[int, dict[int, list[tuple[int, float]]]] = {}  # rank -> level -> (round, seconds)
        self.misses: dict[int, dict[int, int]] = {}  # rank -> level -> rounds over the target there
        self.barred: dict[int, dict[int, int]] = {}  # rank -> level -> round from which it may be used again

    # -------------------------------------------------------------- the choice

    def predicted_bytes(self, level: int) -> float | None:
        if level in self.level_bytes:
            return self.level_bytes[level]
        if not self.level_bytes:
            return None
        rates = self.codec.rate_values
        nearest = min(self.level_bytes, key=lambda j: abs(j - level))
        return self.level_bytes[nearest] * rates[level] / rates[nearest]

    def level_compute_estimate(self, level: int) -> float | None:
        """A level's median compute time over all workers; for a level not used yet, that of the
        nearest used level (on a tie, the slower one). Encoding costs differ by family more than by
        neighbouring rates (fp16 is a cast like dense, a 2-bit entropy coder is not), so the nearest
        level is the best guess the ladder offers until the level has been tried."""
        medians = {j: float(np.median(v)) for j, v in self.level_compute.items() if v}
        if level in medians:
            return medians[level]
        if not medians:
            return None
        nearest = min(medians, key=lambda j: (abs(j - level), -medians[j]))
        return medians[nearest]

    def predicted_compute(self, est: LinkEstimate, level: int) -> float:
        here = self.level_compute_estimate(level)
        there = None if est.level is None else self.level_compute_estimate(est.level)
        if here is None or there is None:
            return est.compute_s
        return max(0.0, est.compute_s + here - there)

    def measured_seconds(self, rank: int, level: int, round_: int) -> float | None:
        """The median of the worker's own round trips at ``level`` in the last ``MEASURED_AGE`` rounds."""
        recent = [s for r, s in self.measured.get(rank, {}).get(level, []) if round_ - r <= MEASURED_AGE]
        return float(np.median(recent)) if len(recent) >= MEASURED_MIN else None

    def predicted_seconds(self, rank: int, level: int, round_: int | None = None) -> float | None:
        est, up = self.links.get(rank), self.predicted_bytes(level)
        if est is None or up is None:
            return None
        model = self.predicted_compute(est, level) + (est.downlink_bytes + up) / max(est.throughput, 1.0)
        seen = None if round_ is None else self.measured_seconds(rank, level, round_)
        return model if seen is None else max(model, seen)

    def allowed(self, rank: int, level: int, round_: int) -> bool:
        """Whether the climbing and miss rules let the worker use ``level`` in round ``round_``."""
        if any(lv <= level and round_ < until for lv, until in self.barred.get(rank, {}).items()):
            return False
        current = self.current.get(rank, self.codec.start)
        known = level in self.level_bytes and level in self.level_compute
        return level <= current + 1 or known

    def choose(self, rank: int, round_: int) -> int:
        c = self.codec
        if rank not in self.links or not self.level_bytes:
            return c.start
        best, fastest, fastest_s = None, None, math.inf
        for level in range(len(c.rate_values)):
            up = self.predicted_bytes(level)
            seconds = self.predicted_seconds(rank, level, round_)
            if up is None or seconds is None or (c.budget and up > c.budget) or not self.allowed(rank, level, round_):
                continue
            if seconds < fastest_s:
                fastest, fastest_s = level, seconds
            if not c.target or seconds <= c.headroom * c.target:
                best = level
        if best is not None:
            return best
        return fastest if fastest is not None else 0  # level 0 is never barred

    def react_to_miss(self, rank: int, level: int, sample: LinkSample) -> None:
        """A round over the target at ``level``: bar it and the levels above for a while, unless no
        cheaper level would have made the target under this round's own throughput and compute time."""
        c = self.codec
        seconds = sample.compute_seconds + sample.transfer_seconds
        if not c.target or seconds <= c.target or level == 0:
            return
        throughput = max(sample_throughput(sample), 1.0)
        known = self.level_compute_estimate(level)
        here = sample.compute_seconds if known is None else known

        def then(j: int) -> float:  # this round's conditions at level j
            estimate = self.level_compute_estimate(j)
            compute = sample.compute_seconds + (here if estimate is None else estimate) - here
            return max(0.0, compute) + (sample.downlink_bytes + (self.predicted_bytes(j) or 0.0)) / throughput

        if not any(then(j) <= c.target for j in range(level)):
            return
        misses = self.misses.setdefault(rank, {})
        misses[level] = misses.get(level, 0) + 1
        cooldown = min(MAX_COOLDOWN, COOLDOWN * 2 ** (misses[level] - 1))
        self.barred.setdefault(rank, {})[level] = sample.round + 1 + cooldown

    # -------------------------------------------------------------- the hooks

    def open_round(self, round_: int, ranks: list[int]) -> Mapping[str, float]:
        levels = {rank: self.choose(rank, round_) for rank in ranks}
        self.current.update(levels)
        choice = RoundChoice(round_, levels)
        for rank, level in levels.items():
            seconds = self.predicted_seconds(rank, level, round_)
            if seconds is not None:
                choice.predicted_s[rank] = seconds
        self.open = choice
        self.history.append(choice)
        del self.history[:-MAX_HISTORY]
        values = {level_key(rank): float(level) for rank, level in levels.items()}
        values[DEFAULT_KEY] = float(self.codec.start)  # a worker that joins during the round
        return values

    def observe_link(self, rank: int, sample: LinkSample) -> None:
        sample = clean_sample(sample)  # type: ignore[assignment]
        if sample is None:
            return
        est = self.links.get(rank)
        if est is None:
            self.links[rank] = LinkEstimate([sample_throughput(sample)], [sample.compute_seconds],
                                            float(sample.downlink_bytes))
        else:
            est.update(sample)
        choice = self.open if self.open is not None and self.open.round == sample.round else None
        level = choice.levels.get(rank, self.codec.start) if choice is not None else None
        if level is not None and choice is not None:
            self.react_to_miss(rank, level, sample)  # with the estimates from before this round
            old = self.level_bytes.get(level)
            up = float(sample.uplink_bytes)
            self.level_bytes[level] = up if old is None else SMOOTHING * up + (1 - SMOOTHING) * old
            self.level_compute[level] = [*self.level_compute.get(level, []), sample.compute_seconds][-WINDOW:]
            self.links[rank].level = level
            seconds = sample.compute_seconds + sample.transfer_seconds
            seen = self.measured.setdefault(rank, {})
            seen[level] = [*seen.get(level, []), (sample.round, seconds)][-WINDOW:]
            choice.measured_s[rank] = seconds
            choice.throughput[rank] = sample_throughput(sample)
            choice.uplink_bytes[rank] = int(sample.uplink_bytes)

    def forget_worker(self, rank: int) -> None:
        # A reconnecting worker may be on another link: measure it afresh.
        self.links.pop(rank, None)
        self.current.pop(rank, None)
        self.measured.pop(rank, None)
        self.misses.pop(rank, None)
        self.barred.pop(rank, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "links": {str(r): [list(e.throughputs), list(e.computes), e.downlink_bytes, e.samples, e.level]
                      for r, e in self.links.items()},
            "level_bytes": {str(k): v for k, v in self.level_bytes.items()},
            "level_compute": {str(k): list(v) for k, v in self.level_compute.items()},
            "history": [h.to_dict(self.codec.rate_values) for h in self.history],
            "current": {str(r): lv for r, lv in self.current.items()},
            "measured": {str(r): {str(lv): [list(x) for x in v] for lv, v in m.items()}
                         for r, m in self.measured.items()},
            "misses": {str(r): {str(lv): n for lv, n in m.items()} for r, m in self.misses.items()},
            "barred": {str(r): {str(lv): u for lv, u in m.items()} for r, m in self.barred.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        levels = len(self.codec.rate_values)
        self.links = {int(r): LinkEstimate([float(x) for x in t][-WINDOW:], [float(x) for x in c][-WINDOW:],
                                           float(d), int(n),
                                           None if lv is None or not 0 <= int(lv) < levels else int(lv))
                      for r, (t, c, d, n, lv) in state["links"].items() if t and c}
        self.level_bytes = {int(k): float(v) for k, v in state["level_bytes"].items() if 0 <= int(k) < levels}
        self.level_compute = {int(k): [float(x) for x in v][-WINDOW:]
                              for k, v in state["level_compute"].items() if 0 <= int(k) < levels}
        self.history = [RoundChoice.from_dict(h) for h in state["history"]]
        self.open = None

        def by_level(m: Mapping[str, Any]) -> dict[int, Any]:  # levels outside this ladder are dropped
            return {int(lv): v for lv, v in m.items() if 0 <= int(lv) < levels}

        # Absent from checkpoints written before the climbing and miss rules: start without them.
        self.current = {int(r): int(lv) for r, lv in state.get("current", {}).items() if 0 <= int(lv) < levels}
        self.measured = {int(r): {lv: [(int(x[0]), float(x[1])) for x in v][-WINDOW:]
                                  for lv, v in by_level(m).items()}
                         for r, m in state.get("measured", {}).items()}
        self.misses = {int(r): {lv: int(n) for lv, n in by_level(m).items()}
                       for r, m in state.get("misses", {}).items()}
        self.barred = {int(r): {lv: int(u) for lv, u in by_level(m).items()}
                       for r, m in state.get("barred", {}).items()}

    def stats(self) -> dict[str, Any]:
        rates = self.codec.rate_values
        rounds = [h.to_dict(rates) for h in self.history]
        chosen = [rates[lv] for h in self.history for lv in h.levels.values()]
        measured = [s for h in self.history for s in h.measured_s.values()]
        out: dict[str, Any] = {"adaptive_rounds": rounds, "adaptive_rates": list(rates)}
        if chosen:
            out["adaptive_mean_rate"] = float(np.mean(chosen))
        if self.codec.target:
            out["adaptive_target_s"] = self.codec.target
            if measured:
                out["adaptive_within_target"] = float(np.mean([s <= self.codec.target for s in measured]))
        return out
