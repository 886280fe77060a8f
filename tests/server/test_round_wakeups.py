"""The PS's costs per round that must not grow with the workers: one wakeup per waiting handler
per round, one serialization of the round's model for all workers (issue 15)."""

from __future__ import annotations

import sys
import threading

from gradwire import protocol


def test_each_handler_wakes_once_per_round(make_server, run_workers, monkeypatch):
    # Count the returns from Condition.wait inside RoundEngine.submit, where a handler waits for
    # its round to close. Notifying every waiting handler on every submit wakes each one up to
    # W - 1 times a round (W² wakeups); a per-round notification wakes each once.
    returns: list[str] = []
    original = threading.Condition

    class CountingCondition(original):  # type: ignore[misc, valid-type]
        def wait(self, timeout=None):
            caller = sys._getframe(1).f_code.co_name
            try:
                return super().wait(timeout)
            finally:
                if caller == "submit":
                    returns.append(threading.current_thread().name)

    monkeypatch.setattr(threading, "Condition", CountingCondition)
    workers, rounds = 6, 4
    running = make_server(workers=workers, rounds=rounds, eval_every=100)
    results = run_workers(running.port, workers)
    running.thread.join(60)
    assert all(r is not None and r.finished for r in results)
    submits = workers * rounds
    assert running.summary()["aggregated_updates"] == submits
    # every submit waits at least once (the round closes on the engine's thread), and wakes once
    assert len(returns) == submits, f"{len(returns)} wakeups for {submits} submits"


def test_broadcast_serialized_once_per_round(make_server, run_workers, monkeypatch):
    # One serialization is one protocol._aligned call (its layout passes build views; one join
    # copies); it carries a model when it lays out a Model's tensors. Per thread: the workers
    # serialize their Updates in threads of this process at the same time.
    serializations: list[dict] = []
    current = threading.local()
    original_aligned, original_chunks = protocol._aligned, protocol._model_chunks

    def aligned(build):
        current.entry = {"models": 0}
        serializations.append(current.entry)
        return original_aligned(build)

    def counting(params, aligner, data=None):
        current.entry["models"] = len(params)
        return original_chunks(params, aligner, data)

    monkeypatch.setattr(protocol, "_aligned", aligned)
    monkeypatch.setattr(protocol, "_model_chunks", counting)
    workers, rounds = 3, 4
    running = make_server(workers=workers, rounds=rounds, eval_every=100)
    results = run_workers(running.port, workers)
    running.thread.join(60)
    assert all(r is not None and r.finished and r.rounds == rounds - 1 for r in results)
    # A RoundResult for each worker after rounds 0..2 (round 3 ends with Finished); the digits
    # MLP has no buffers and the workers' Updates carry none, so only the broadcasts count.
    calls = [e["models"] for e in serializations if e["models"]]
    assert len(calls) == rounds - 1, f"model serialized {len(calls)} times for {rounds - 1} broadcasts"
    # Every worker ends on the PS's model (the shared bytes are the model each worker trains on).
    assert len({r.model_digest for r in results}) == 1
    s = running.summary()
    assert s["downlink_message_bytes"] > 4 * s["params"] * workers * rounds


def test_the_round_model_is_serialized_from_the_live_model_without_a_copy_beside_it(make_server, run_workers,
                                                                                       monkeypatch):
    """Dense downlink: the model a round sends is serialized once as the round opens, straight from
    the live parameters (BroadcastSerializer.snapshot); the engine keeps views of those bytes, no
    copy of its own (one copy at the start, for the Welcomes)."""
    from gradwire.server.round_engine import RoundEngine

    copies, sent = [], []
    real_copy, real_snapshot = RoundEngine._params_copy, protocol.BroadcastSerializer.snapshot

    def counting_copy(self):
        copies.append(1)
        return real_copy(self)

    def keeping_snapshot(self, m):
        out = real_snapshot(self, m)
        sent.append(out.model)
        return out

    monkeypatch.setattr(RoundEngine, "_params_copy", counting_copy)
    monkeypatch.setattr(protocol.BroadcastSerializer, "snapshot", keeping_snapshot)
    workers, rounds = 2, 4
    running = make_server(workers=workers, rounds=rounds, eval_every=100)
    results = run_workers(running.port, workers)
    running.thread.join(60)
    assert all(r is not None and r.finished and r.rounds == rounds - 1 for r in results)
    assert len(copies) == 1, f"{len(copies)} copies of the model"
    assert len(sent) == rounds - 1  # one snapshot per RoundResult round
    assert all(not a.flags.writeable for model in sent for a in model.values())
