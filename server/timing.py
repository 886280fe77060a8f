"""Where a round's wall-clock time goes: compute, encode, transfer, decode (and evaluation).

The PS's round r lasts from publishing round r (the answers to round r − 1 go out) to publishing
round r + 1. Its wall time is measured on the PS's monotonic clock. The parts come from both ends:

- the worker's clock (``Update``): ``compute_seconds`` (local training), ``encode_seconds``, and in
  the next Update ``previous_round``: how long it waited for the PS's answer and how long
  rebuilding that model took (the downlink decode);
- the PS's clock: the time it held each update (from its arrival to the answer: decoding, waiting
  for the other workers, aggregating, evaluating), its decode of each update, the aggregation and
  the downlink encode, and the evaluation.

Transfer is not inferred from the rest: it is the worker's wait for the answer minus the time the
PS held the update, so it holds the bytes' time on the wire both ways and the (de)serialization
at both ends, and nothing the PS did. The split of a round follows the worker whose update
arrived last (the one the round waited for):

    compute + encode (worker's + PS downlink encode) + transfer + decode (PS decode + aggregation
    + worker's downlink decode) + evaluation + other = wall

``other`` is what no clock attributed (thread hand-offs, the PS's bookkeeping, a worker's start
in round 0). It is negative when the worker computed while its bytes were in flight
(``--stale-updates``): the parts then overlap.

Worker-reported times come off the wire: anything non-finite or negative is treated as unknown
(None), never trusted into a sum, and capped at a day.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gradwire.protocol import Update
from gradwire.server.history import FLOAT, SMALL_INT, Column, Table

MAX_REPORTED_SECONDS = 86_400.0
PARTS = ("compute_s", "encode_s", "transfer_s", "decode_s", "eval_s", "other_s")
DETAIL = ("worker_encode_s", "ps_encode_s", "ps_decode_s", "aggregate_s", "worker_decode_s")


def reported(seconds: float | None) -> float | None:
    """A time a worker reported, or None when it cannot be one."""
    if seconds is None or not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(float(seconds), MAX_REPORTED_SECONDS)


@dataclass(slots=True)
class WorkerRound:
    """One worker's update in one round."""

    arrived_at: float  # PS monotonic clock
    compute_s: float | None
    encode_s: float | None
    ps_decode_s: float
    downlink_decode_s: float | None = None  # of the model this update was computed from
    answered_at: float | None = None  # when the PS's answer to it was ready
    reply_wait_s: float | None = None  # reported with the worker's next update

    @property
    def held_s(self) -> float | None:
        return None if self.answered_at is None else self.answered_at - self.arrived_at

    @property
    def transfer_s(self) -> float | None:
        if self.reply_wait_s is None or self.held_s is None:
            return None
        # Clocks of two processes: a wait a little shorter than the hold is rounding, not negative time.
        return max(0.0, self.reply_wait_s - self.held_s)


# What split_of takes (SPLIT_INPUTS, below): a round's wall time (None while open), the critical update's
# compute, encode (worker), the PS's downlink encode, transfer, PS decode, aggregation, the worker's
# downlink decode, the evaluation.
SplitInputs = tuple[float | None, float | None, float | None, float, float | None, float | None, float, float | None,
                    float]


@dataclass(slots=True)
class RoundTiming:
    round: int
    opened_at: float
    closed_at: float | None = None  # when the next round was published (or the run ended)
    aggregate_s: float = 0.0  # finalize, robust step, buffers, model copy
    downlink_encode_s: float = 0.0
    eval_s: float = 0.0
    stepped_at: float | None = None  # when the round's step was done (before its evaluation)
    evals_before: float = 0.0  # seconds of evaluation in the earlier rounds
    workers: dict[str, WorkerRound] = field(default_factory=dict)

    def critical(self) -> WorkerRound | None:
        """The update that arrived last: the one this round waited for."""
        return max(self.workers.values(), key=lambda w: w.arrived_at, default=None)

    def inputs(self) -> SplitInputs:
        """What the split is made of (``split_of``), in ``SPLIT_INPUTS`` order: the round's history row."""
        wall = None if self.closed_at is None else self.closed_at - self.opened_at
        w = self.critical()
        if w is None:
            return (wall, None, None, self.downlink_encode_s, None, None, self.aggregate_s, None, self.eval_s)
        return (wall, w.compute_s, w.encode_s, self.downlink_encode_s, w.transfer_s, w.ps_decode_s, self.aggregate_s,
                w.downlink_decode_s, self.eval_s)

    def split(self) -> dict[str, Any]:
        return split_of(*self.inputs())


# The numbers a round's split is computed from: its wall time, the critical update's own times (None
# when no update arrived; ps_decode_s is known for every update that did), the PS's parts.
SPLIT_INPUTS = ("wall_s", "compute_s", "worker_encode_s", "ps_encode_s", "transfer_s", "ps_decode_s", "aggregate_s",
                "worker_decode_s", "eval_s")


def split_of(wall: float | None, compute: float | None, worker_encode: float | None, ps_encode: float,
             transfer: float | None, ps_decode: float | None, aggregate: float, worker_decode: float | None,
             eval_s: float) -> dict[str, Any]:
    """A round's wall-clock split (see the module doc) from ``SPLIT_INPUTS``."""
    arrived = ps_decode is not None  # some update arrived: the split follows the last one

    def add(*xs: float | None) -> float | None:
        return None if any(x is None for x in xs) else float(sum(xs))  # type: ignore[arg-type]

    parts: dict[str, float | None] = {
        "compute_s": compute,
        "encode_s": add(worker_encode, ps_encode),
        "transfer_s": transfer,
        "decode_s": add(ps_decode, aggregate, (worker_decode if worker_decode is not None else 0.0) if arrived else None),
        "eval_s": eval_s,
    }
    known = [v for v in parts.values() if v is not None]
    parts["other_s"] = None if wall is None or len(known) < len(parts) else wall - sum(known)
    detail = {  # which end spent the encode and decode time
        "worker_encode_s": worker_encode, "ps_encode_s": ps_encode,
        "ps_decode_s": ps_decode, "aggregate_s": aggregate,
        "worker_decode_s": worker_decode,
    }
    return {"wall_s": wall, **parts, **detail}


# Rounds the clock keeps as RoundTiming objects: the open round and the one before, whose critical
# update learns its reply wait (transfer) from that worker's update in the open round. A round
# older than these is final (the next round closed without changing it) and is kept as a row of
# SPLIT_INPUTS, its stepped_at and evals_before (server/history.py); its split is computed from that row
# with the same function, so the summary's figures are the same floats.
RECENT_ROUNDS = 2
_HISTORY_COLUMNS = (
    Column("round", SMALL_INT),
    *(Column(name, FLOAT, nullable=True) for name in SPLIT_INPUTS),
    Column("stepped_at", FLOAT, nullable=True),
    Column("evals_before", FLOAT),
)


class RoundClock:
    """The engine's timing records; the engine calls it under its own lock."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundTiming] = {}  # the recent rounds (RECENT_ROUNDS)
        self.history = Table(_HISTORY_COLUMNS)  # the rounds before them, in order
        self.last: dict[str, WorkerRound] = {}  # each worker's previous update, awaiting its reply wait

    def open(self, round_: int, now: float) -> None:
        previous = self.rounds.get(round_ - 1)
        if previous is not None and previous.closed_at is None:
            previous.closed_at = now
        self.rounds[round_] = RoundTiming(round_, now)
        while len(self.rounds) > RECENT_ROUNDS:
            oldest = self.rounds.pop(min(self.rounds))
            self.history.append([oldest.round, *oldest.inputs(), oldest.stepped_at, oldest.evals_before])

    def close_run(self, now: float) -> None:
        for t in self.rounds.values():
            if t.closed_at is None:
                t.closed_at = now

    def forget_worker(self, worker_id: str) -> None:
        """The worker's session ended: its next session starts without a previous round (worker/loop.py),
        so no reply wait will come for its last update."""
        self.last.pop(worker_id, None)

    def arrived(self, round_: int, worker_id: str, update: Update, arrived_at: float, ps_decode_s: float) -> WorkerRound:
        prev = update.previous_round
        record = WorkerRound(arrived_at, reported(update.compute_seconds) if update.compute_seconds else None,
                             reported(update.encode_seconds) if update.encode_seconds else None, ps_decode_s,
                             downlink_decode_s=reported(prev.downlink_decode_seconds) if prev else None)
        earlier = self.last.get(worker_id)
        if earlier is not None and prev is not None:
            earlier.reply_wait_s = reported(prev.reply_wait_seconds)
        self.last[worker_id] = record
        timing = self.rounds.get(round_)
        if timing is not None:
            timing.workers[worker_id] = record
        return record

    def _rows(self) -> Iterator[tuple[int, dict[str, Any], float | None, float]]:
        """(round, split, stepped_at, evals_before) of every round, in order."""
        for row in self.history.rows():
            yield (row["round"], split_of(*(row[name] for name in SPLIT_INPUTS)), row["stepped_at"],
                   row["evals_before"])
        for r, t in sorted(self.rounds.items()):
            yield r, t.split(), t.stepped_at, t.evals_before

    def rounds_split(self) -> dict[int, dict[str, Any]]:
        return {r: split for r, split, _, _ in self._rows()}

    def startup_s(self) -> float:
        """Round 0's unattributed time: the workers' start after their Welcome (loading the task,
        building the model), which no codec or link changes; 0 when unknown."""
        first = next(self._rows(), None)
        other = first[1]["other_s"] if first is not None else None
        return max(0.0, other) if other is not None else 0.0

    def training_seconds(self, started_at: float | None) -> dict[int, float]:
        """Per round, the training seconds when its step was done: the PS's clock since the run
        started, without the evaluations before it and without the workers' start-up."""
        if started_at is None:
            return {}
        startup = self.startup_s()
        return {r: stepped_at - started_at - evals_before - startup
                for r, _, stepped_at, evals_before in self._rows() if stepped_at is not None}


def wall_clock_totals(splits: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums over rounds; a part unknown in some round is summed over the rounds that know it, and
    ``rounds_known`` says how many those are."""
    out: dict[str, Any] = {}
    for key in ("wall_s", *PARTS, *DETAIL):
        values = [s[key] for s in splits if s.get(key) is not None]
        out[key] = float(sum(values)) if values else None
        out[f"{key[:-2]}_rounds_known"] = len(values)
    return out


def accuracy_vs_time(initial_accuracy: float | None, points: list[tuple[float, float | None]]) -> list[list[float]]:
    """[training seconds, test accuracy] at each evaluation, from (0, initial accuracy)."""
    if initial_accuracy is None:
        return []
    return [[0.0, float(initial_accuracy)]] + [[float(t), float(a)] for t, a in points if a is not None]


def time_to_accuracy(curve: list[list[float]], target: float) -> float | None:
    """Training seconds at the first evaluation reaching ``target``; None when none did."""
    for t, acc in curve:
        if acc >= target:
            return t
    return None


def time_to_each_accuracy(curve: list[list[float]]) -> list[list[float]]:
    """For every accuracy the run recorded, the training seconds at which it was first reached (sorted
    by accuracy): an experiment reads off the time to any target (e.g. dense's final − 1 point)."""
    # Every accuracy comes from the curve, so each is reached (the walrus only tells mypy so).
    return [[acc, t] for acc in sorted({a for _t, a in curve}) if (t := time_to_accuracy(curve, acc)) is not None]
