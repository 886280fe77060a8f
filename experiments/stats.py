"""Statistics for comparing codecs over seeds: Student-t intervals, paired differences, bits to a target.

Every figure the experiment tables compare is a mean over seeds with a 95 % Student-t confidence
interval (``t_ci``). Two methods run with the same seed share the data order, the model's
initialization and the shards, so their difference is judged with the paired interval
(``paired_ci``): the t interval of the per-seed differences, which removes the seed-to-seed
variance both share. A difference whose interval contains 0 is reported as "no difference".

Bits to a target (``bits_to_target``) are the cumulative uplink bits of all workers at the first
evaluation whose accuracy reaches the target. A run that never reaches it has no value: it is
counted as "not reached", never dropped silently (``summarize_reach``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with the half-width of its confidence interval over ``n`` values.

    ``half_width`` is NaN when ``n < 2`` (one value has no spread to estimate) and the mean is NaN
    when ``n == 0``.
    """

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def spans_zero(self) -> bool:
        """True when the interval contains 0, or cannot be computed (no evidence of a difference)."""
        if not (math.isfinite(self.mean) and math.isfinite(self.half_width)):
            return True
        return self.low <= 0.0 <= self.high

    def as_dict(self) -> dict:
        return {"mean": _finite_or_none(self.mean), "half_width": _finite_or_none(self.half_width),
                "low": _finite_or_none(self.low), "high": _finite_or_none(self.high), "n": self.n}


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def t_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval half-width t_{(1+c)/2, n-1} · s / √n (s the sample std, ddof=1)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    n = int(x.size)
    if n == 0:
        return Interval(float("nan"), float("nan"), 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, float("nan"), 1)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, float(scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sem, n)


def paired_ci(a: Sequence[float | None], b: Sequence[float | None], confidence: float = CONFIDENCE) -> Interval:
    """Interval of the mean of a[i] − b[i] over the pairs where both are present (same seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return t_ci(diffs, confidence)


def bits_to_target(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """Cumulative bits at the first point of ``curve`` ((bits, accuracy), in run order) with accuracy ≥ target."""
    for bits, acc in curve:
        if acc is not None and acc >= target:
            return float(bits)
    return None


def accuracy_at_bits(curve: Sequence[tuple[float, float]], budget: float) -> float | None:
    """Accuracy after ``budget`` cumulative bits, interpolated linearly in bits between evaluations.

    ``curve`` holds (cumulative bits, accuracy) at each evaluation, in run order. The value at a
    budget between two evaluations is the straight line between them; beyond the last
    evaluation there is no value (None): the run never spent that many bits.
    """
    pts = [(float(b), float(a)) for b, a in curve if a is not None]
    if not pts or budget > pts[-1][0] or budget < pts[0][0]:
        return None
    bits = np.array([p[0] for p in pts])
    acc = np.array([p[1] for p in pts])
    # np.interp wants increasing x; cumulative bits never decrease, and repeated values (a round
    # that sent nothing) keep the later accuracy, which np.interp's right-most rule does not
    # guarantee, so collapse them first.
    keep = np.append(np.diff(bits) > 0, True)
    return float(np.interp(budget, bits[keep], acc[keep]))


@dataclass(frozen=True)
class Reach:
    """Bits to a target over seeds: the interval over the runs that reached it, and how many did not."""

    interval: Interval
    reached: int
    runs: int

    @property
    def not_reached(self) -> int:
        return self.runs - self.reached

    def as_dict(self) -> dict:
        return {**self.interval.as_dict(), "reached": self.reached, "runs": self.runs}


def summarize_reach(values: Sequence[float | None]) -> Reach:
    got = [v for v in values if v is not None]
    return Reach(t_ci(got), len(got), len(values))


def fmt_interval(iv: Interval, spec: str = ".4f", scale: float = 1.0, signed: bool = False) -> str:
    """``mean ± half-width`` (``mean (n=1)`` when one value, ``–`` when none)."""
    if iv.n == 0:
        return "–"
    sign = "+" if signed else ""
    mean = format(iv.mean * scale, sign + spec)
    if iv.n < 2:
        return f"{mean} (n=1)"
    return f"{mean} ± {format(iv.half_width * scale, spec)}"


def fmt_reach(reach: Reach, spec: str = ".3g", scale: float = 1.0) -> str:
    """Bits to target: ``mean ± hw``, with ``not reached (k of n)`` whenever a run missed the target."""
    if reach.reached == 0:
        return f"not reached ({reach.runs} of {reach.runs})"
    text = fmt_interval(reach.interval, spec, scale)
    if reach.not_reached:
        text += f"; not reached ({reach.not_reached} of {reach.runs})"
    return text


def verdict(diff: Interval, better_if_positive: bool = True, what: str = "") -> str:
    """Words for a paired difference: 'no difference' when its interval spans 0."""
    if diff.n < 2:
        return "too few paired runs"
    if diff.spans_zero():
        return "no difference"
    positive = diff.mean > 0
    good = positive == better_if_positive
    return ("better" if good else "worse") + (f" ({what})" if what else "")
