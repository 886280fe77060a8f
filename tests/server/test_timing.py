"""The wall-clock split per round (server/timing.py), time to accuracy, and one-round-stale updates."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from gradwire.protocol import Update, WorkerTiming
from gradwire.server.timing import (
    RoundClock,
    reported,
    time_to_accuracy,
    time_to_each_accuracy,
    wall_clock_totals,
)

PARTS = ("compute_s", "encode_s", "transfer_s", "decode_s", "eval_s", "other_s")


def _update(round_: int, compute: float, encode: float, wait: float | None = None, down: float = 0.0) -> Update:
    previous = WorkerTiming(wait, down) if wait is not None else None
    return Update(round=round_, tensors=(), train_loss=0.0, num_examples=1, compute_seconds=compute,
                  encode_seconds=encode, previous_round=previous)


def test_the_split_follows_the_last_update_and_transfer_is_the_wait_minus_the_hold():
    clock = RoundClock()
    clock.open(0, 100.0)
    early = clock.arrived(0, "a", _update(0, 0.5, 0.1), arrived_at=100.7, ps_decode_s=0.05)
    late = clock.arrived(0, "b", _update(0, 0.9, 0.2), arrived_at=101.5, ps_decode_s=0.1)
    early.answered_at = late.answered_at = 102.0  # held 1.3 s and 0.5 s
    clock.rounds[0].aggregate_s, clock.rounds[0].eval_s = 0.2, 0.1
    clock.open(1, 102.0)
    # b's next update: it waited 0.9 s for the answer, 0.5 s of which the PS held it; rebuilding took 0.05 s
    clock.arrived(1, "b", _update(1, 0.9, 0.2, wait=0.9, down=0.05), arrived_at=103.4, ps_decode_s=0.1)
    clock.arrived(1, "a", _update(1, 0.5, 0.1, wait=1.5, down=0.05), arrived_at=103.0, ps_decode_s=0.05)
    split = clock.rounds_split()[0]
    assert split["wall_s"] == pytest.approx(2.0)
    assert split["compute_s"] == 0.9 and split["encode_s"] == pytest.approx(0.2)  # b, the last to arrive
    assert split["transfer_s"] == pytest.approx(0.4)
    assert split["decode_s"] == pytest.approx(0.1 + 0.2)  # PS decode + aggregation (no downlink decode in round 0)
    assert split["eval_s"] == 0.1
    assert split["other_s"] == pytest.approx(2.0 - (0.9 + 0.2 + 0.4 + 0.3 + 0.1))
    assert early.transfer_s == pytest.approx(0.2)
    # round 1: still open, its wall and its transfer (reported with round 2's updates) unknown
    assert clock.rounds_split()[1]["wall_s"] is None and clock.rounds_split()[1]["other_s"] is None
    total = wall_clock_totals(list(clock.rounds_split().values()))
    assert total["wall_s"] == pytest.approx(2.0) and total["wall_rounds_known"] == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, None])
def test_a_time_off_the_wire_that_cannot_be_one_is_unknown(bad):
    assert reported(bad) is None
    assert reported(1e12) == 86_400.0
    clock = RoundClock()
    clock.open(0, 0.0)
    record = clock.arrived(0, "a", _update(0, float("nan"), -3.0), arrived_at=1.0, ps_decode_s=0.0)
    assert record.compute_s is None and record.encode_s is None
    clock.open(1, 2.0)
    assert clock.rounds_split()[0]["compute_s"] is None and clock.rounds_split()[0]["other_s"] is None


def test_time_to_accuracy_is_the_first_evaluation_that_reaches_it():
    curve = [[0.0, 0.1], [2.0, 0.5], [4.0, 0.45], [6.0, 0.7]]
    assert time_to_accuracy(curve, 0.5) == 2.0
    assert time_to_accuracy(curve, 0.6) == 6.0
    assert time_to_accuracy(curve, 0.71) is None
    assert time_to_each_accuracy(curve) == [[0.1, 0.0], [0.45, 2.0], [0.5, 2.0], [0.7, 6.0]]


def test_a_loopback_run_splits_every_round_and_reports_the_time_to_its_target(make_server, run_workers):
    running = make_server(workers=2, rounds=8, eval_every=2, target_accuracy=0.3)
    results = run_workers(running.port, 2)
    running.thread.join(30)
    assert all(r.finished for r in results)
    s = running.summary()
    log = s["rounds_log"]
    for e in log[1:-1]:  # round 0 has the workers' start; the last round's transfer would come with a next update
        t = e["timing"]
        assert all(t[k] is not None for k in PARTS), t
        assert all(t[k] >= 0 for k in PARTS if k != "other_s")
        assert t["compute_s"] > 0 and t["transfer_s"] > 0 and t["decode_s"] > 0
        # The parts are measured, not derived from the wall time: what no clock saw ("other": lock and thread
        # hand-offs on the PS, here with 2 workers in threads of the same process) stays a small part of it.
        assert abs(t["other_s"]) <= 0.5 * t["wall_s"] + 0.02, t
    assert log[-1]["timing"]["transfer_s"] is None and log[-1]["timing"]["other_s"] is None
    wall = s["wall_clock"]
    assert wall["wall_s"] == pytest.approx(s["elapsed_s"], rel=0.05, abs=0.05)
    assert wall["transfer_rounds_known"] == 7 and wall["startup_s"] >= 0
    curve = s["accuracy_vs_training_seconds"]
    assert [a for _t, a in curve[1:]] == [e["test_accuracy"] for e in log if e["test_accuracy"] is not None]
    times = [t for t, _a in curve]
    assert times == sorted(times) and times[-1] <= s["elapsed_s"]
    reached = [e for e in log if e["test_accuracy"] is not None and e["test_accuracy"] >= 0.3]
    assert reached, "the digits MLP reaches 0.3 within 8 rounds"
    assert s["target_accuracy"] == 0.3 and s["time_to_target_s"] == reached[0]["trained_s"]
    assert dict((a, t) for a, t in s["time_to_accuracy"])[s["final_accuracy"]] <= times[-1]


def _decoded_updates(running) -> list[np.ndarray]:
    """Record the update the PS decoded in each round (a single worker: rank 0), flattened."""
    seen: list[np.ndarray] = []
    original = running.engine.codec_state.observe

    def observe(round_, decoded):
        seen.append(np.concatenate([np.ravel(a) for _n, a in sorted(decoded[0].items())]).copy())
        original(round_, decoded)

    running.engine.codec_state.observe = observe
    return seen


def _worker(port: int, stale: bool):
    from gradwire.worker.config import WorkerConfig
    from gradwire.worker.loop import Worker

    out: list = []
    t = threading.Thread(target=lambda: out.append(Worker(WorkerConfig(
        server=f"127.0.0.1:{port}", worker_id="w0", connect_timeout_s=30, stale_updates=stale)).run()))
    t.start()
    t.join(120)
    return out[0]


def test_stale_updates_send_the_gradient_of_the_previous_model(make_server):
    """Full-batch linear regression, 1 worker, no momentum: a gradient depends only on the model it is taken
    on. Synchronously, round r's update is g(θ_r). With --stale-updates the worker computes round r+1's
    gradient on θ_r while its update for round r is in flight: rounds 0 and 1 both send g(θ_0), round 2
    sends g(θ_1), which is the synchronous run's round-1 update."""
    settings = dict(workers=1, rounds=5, eval_every=5, dataset="diabetes", model="linear", batch_size=0,
                    momentum=0.0, lr=0.01, clip_multiple=0.0)
    sync_server = make_server(**settings)
    sync = _decoded_updates(sync_server)
    assert _worker(sync_server.port, stale=False).finished
    sync_server.thread.join(30)
    stale_server = make_server(**settings)
    stale = _decoded_updates(stale_server)
    assert _worker(stale_server.port, stale=True).finished
    stale_server.thread.join(30)
    assert len(sync) == len(stale) == 5
    assert not np.allclose(sync[1], sync[0], rtol=1e-4)  # the model moved, and with it the gradient
    np.testing.assert_allclose(stale[0], sync[0], rtol=1e-5)
    np.testing.assert_allclose(stale[1], sync[0], rtol=1e-5)  # one round late
    np.testing.assert_allclose(stale[2], sync[1], rtol=1e-5)
    # and from then on the stale run follows its own (delayed) trajectory
    assert not np.allclose(stale[3], sync[3], rtol=1e-4)
    assert math.isfinite(stale_server.summary()["final_loss"])
