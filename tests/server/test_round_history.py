"""The PS's per-round history is compact (server/history.py) and reads back as it was written.

Every round of a run leaves numbers on the PS (the byte ledger's counters, the round clock's
wall-clock split, the link sample of each update) for the summary, Status and the metrics. As a
dataclass, dicts and lists per round that was ~1.25 KB of heap per round, and a `gradwire fuzz`
campaign closes thousands of rounds (docs/results/fuzz/).
"""

from __future__ import annotations

import gc
import random
import threading
import tracemalloc

import numpy as np
import pytest

from gradwire import protocol
from gradwire.compressors.base import LinkSample, RoundContext
from gradwire.counters import RoundCounters
from gradwire.protocol import Hello, Update, Welcome, WorkerTiming
from gradwire.server import ledger as ledger_module
from gradwire.server import timing
from gradwire.server.config import ServerConfig
from gradwire.server.history import LinkLog, RoundLog
from gradwire.server.ledger import Ledger
from gradwire.server.round_engine import RoundEngine
from gradwire.task import load_task

BYTES_PER_ROUND = 256  # heap a closed round may leave on the PS (was ~1,250 B)
WARMUP_ROUNDS = 300  # one-time allocations (first decodes, torch's and the optimizer's state)
MEASURED_ROUNDS = 1500


def test_a_round_leaves_at_most_256_bytes_of_heap_on_the_ps():
    """One worker's rounds through the round engine, as the servicer drives it (join, welcome, submit,
    count_downlink), with a link sample per update; tracemalloc counts what stays allocated."""
    rounds = WARMUP_ROUNDS + MEASURED_ROUNDS
    config = ServerConfig(address="127.0.0.1:0", workers=1, rounds=rounds + 1, codec="dense", dataset="digits",
                          model="linear", eval_every=10**6, round_timeout_s=60, start_timeout_s=60,
                          report_timeout_s=0.1)
    engine = RoundEngine(config, load_task(config.task_ref, config.seed, None, config.model))
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    session = engine.join(Hello(protocol=protocol.PROTOCOL, requested_worker_id="w0"), 50)
    assert isinstance(engine.welcome(session), Welcome)
    engine.count_downlink(session, 3_000, 2_600, models=1)
    encoder = engine.codec.make_encoder()
    rng = np.random.default_rng(0)
    grads = [(0.01 * rng.standard_normal(s.shape)).astype(np.float32) for s in engine.specs]

    def one_round(r: int) -> None:
        ctx = RoundContext(round=r, rank=0, seed=0)
        tensors = tuple(encoder.encode(g, s, ctx) for g, s in zip(grads, engine.specs, strict=True))
        update = Update(round=r, tensors=tensors, train_loss=1.0, num_examples=32, compute_seconds=0.001,
                        encode_seconds=0.0001, previous_round=WorkerTiming(0.002, 0.0001))
        engine.submit(session, update, 3_000)
        engine.count_downlink(session, 3_000, 2_600, models=1)

    # Traced from the start: an array allocated before tracing and grown after it would count whole.
    tracemalloc.start()
    try:
        try:
            for r in range(WARMUP_ROUNDS):
                one_round(r)
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            for r in range(WARMUP_ROUNDS, rounds):
                one_round(r)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        samples = len(engine.link_samples)
    finally:
        engine.stop()
        engine.leave(session)
        thread.join(30)
    per_round = grown / MEASURED_ROUNDS
    assert per_round <= BYTES_PER_ROUND, f"{per_round:.0f} bytes of heap per round"
    assert samples == rounds - 1  # every update after the first measured the link: the history holds them


def _counters(round_: int, rng: random.Random) -> RoundCounters:
    return RoundCounters(
        uplink_payload_bytes=rng.randrange(2**40), uplink_message_bytes=rng.randrange(2**40),
        downlink_message_bytes=rng.randrange(2**40), downlink_payload_bytes=rng.randrange(2**40), round=round_,
        workers=rng.randrange(100), stragglers=rng.randrange(3), train_loss=rng.random(),
        test_accuracy=rng.choice([None, rng.random()]), test_loss=rng.choice([None, rng.random() * 1e30]),
        lr=rng.choice([None, 0.05]), refused=rng.random() < 0.2,
        clipped=rng.choice([[], ["w1"], ["w2", "w3"]]), suspects=rng.choice([[], ["w1 (norm 3e+38)"]]),
    )


def test_the_ledger_reads_back_every_round_as_it_was():
    rng = random.Random(0)
    written = [_counters(r, rng) for r in range(50)]
    log = RoundLog()
    for e in written:
        log.append(e)
    assert list(log) == written
    assert [type(v) for e in log for v in e.to_dict().values()] == [type(v) for e in written for v in e.to_dict().values()]


def test_the_ledger_keeps_two_rounds_as_objects_and_reports_them_all():
    ledger = Ledger()
    record = ledger.record_for("w0")
    for r in range(10):
        ledger.open_round(r, 0.05)
        ledger.count_downlink(record, 100 + r, 80 + r, 1, in_round=True)
        entry = ledger.close_round({"w0": (10 * r, 20 * r)}, 0, 1.0 / (r + 1))
        entry.test_loss, entry.test_accuracy = (0.5, 0.9) if r % 3 == 0 else (None, None)
    ledger.open_round(10, 0.05)
    assert len(ledger.recent) == ledger_module.RECENT_ROUNDS and len(ledger.history) == 9
    rounds = ledger.snapshot(10, "collecting").rounds
    assert [e.round for e in rounds] == list(range(11))
    assert [e.uplink_payload_bytes for e in rounds[:10]] == [10 * r for r in range(10)]
    assert [e.downlink_message_bytes for e in rounds[:10]] == [100 + r for r in range(10)]
    assert [e.test_accuracy for e in rounds[:10]] == [0.9 if r % 3 == 0 else None for r in range(10)]
    assert [e.round for e in ledger.closed_rounds()] == list(range(10))
    state = ledger.state_dict()
    resumed = Ledger()
    resumed.load_state_dict(state)
    assert resumed.round_count() == 10 and resumed.all_rounds() == list(rounds[:10])


def _drive_clock(rounds: int, seed: int) -> timing.RoundClock:
    """A clock through ``rounds`` rounds of two workers, with unknown times now and then. A worker that
    misses a round loses its session (its late update is refused) and starts a new one."""
    rng = random.Random(seed)
    clock = timing.RoundClock()
    now, evals = 100.0, 0.0
    in_session = {"a": False, "b": False}
    for r in range(rounds):
        clock.open(r, now)
        for wid in ("a", "b"):
            if rng.random() < 0.1:
                clock.forget_worker(wid)  # as RoundEngine.leave does
                in_session[wid] = False
                continue
            now += rng.random()
            previous = WorkerTiming(rng.random(), rng.random()) if in_session[wid] else None
            in_session[wid] = True
            update = Update(round=r, tensors=(), train_loss=0.0, num_examples=1,
                            compute_seconds=rng.choice([0.0, rng.random(), float("nan")]), encode_seconds=rng.random(),
                            previous_round=previous)
            record = clock.arrived(r, wid, update, arrived_at=now, ps_decode_s=rng.random() / 10)
            record.answered_at = now + rng.random()
        t = clock.rounds[r]
        t.aggregate_s, t.downlink_encode_s, t.eval_s = rng.random(), rng.choice([0.0, rng.random()]), rng.random()
        t.stepped_at, t.evals_before = now + 0.5, evals
        evals += t.eval_s
        now += 1.0
    clock.close_run(now)
    return clock


def test_the_round_clock_splits_compacted_rounds_as_it_split_them_as_objects(monkeypatch):
    compact = _drive_clock(40, seed=1)
    assert len(compact.rounds) == timing.RECENT_ROUNDS and len(compact.history) == 38
    monkeypatch.setattr(timing, "RECENT_ROUNDS", 10**9)
    objects = _drive_clock(40, seed=1)
    assert len(objects.history) == 0
    assert compact.rounds_split() == objects.rounds_split()  # the same floats, not approximately
    assert compact.startup_s() == objects.startup_s()
    assert compact.training_seconds(99.0) == objects.training_seconds(99.0)


def test_link_samples_read_back_as_the_summary_wrote_them():
    import dataclasses

    log = LinkLog()
    samples = [(r % 3, LinkSample(round=r, downlink_bytes=10**10 + r, uplink_bytes=r, transfer_seconds=r / 7,
                                  compute_seconds=1e-9 * r)) for r in range(20)]
    for rank, s in samples:
        log.append(rank, s)
    assert log.dicts() == [{"rank": rank, **dataclasses.asdict(s)} for rank, s in samples]


def test_a_value_that_does_not_fit_leaves_the_history_as_it_was():
    log = RoundLog()
    log.append(RoundCounters(round=0, workers=1, train_loss=1.0, lr=0.1))
    with pytest.raises(OverflowError):
        log.append(RoundCounters(round=2**31, workers=1, train_loss=1.0, lr=0.1))
    assert len(log) == 1 and [e.round for e in log] == [0]
    assert len({len(a) for a in log.table._arrays}) == 1
