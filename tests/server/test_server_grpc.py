"""A real PS on loopback with real workers (the `gradwire worker` loop in threads)."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwire.status import fetch_status


def test_three_workers_train_and_account(make_server, run_workers):
    running = make_server(workers=3, rounds=4, eval_every=2)
    results = run_workers(running.port, 3)
    running.thread.join(30)
    assert all(r is not None and r.finished and r.rounds == 3 for r in results)
    s = running.summary()
    assert s["workers"] == 3 and s["rounds"] == 4
    ranks = sorted(w["rank"] for w in s["per_worker"])
    assert ranks == [0, 1, 2]
    assert s["uplink_payload_bytes"] == 4 * s["params"] * 3 * 4
    assert s["uplink_message_bytes"] > s["uplink_payload_bytes"]
    assert s["uplink_message_bytes"] < 1.01 * s["uplink_payload_bytes"] + 200 * 12
    # Downlink: a welcome and a round result per round (finished is tiny) for each worker.
    assert s["downlink_message_bytes"] > 4 * s["params"] * 3 * 4
    assert [e["test_accuracy"] is not None for e in s["rounds_log"]] == [False, True, False, True]
    assert s["per_bit_accuracy"] is not None and s["accuracy_vs_uplink_bits"][0][0] == 0.0
    assert s["codec_stats"]["bits_per_entry"] == 32.0  # reported by every worker at the end


def test_status_and_health(make_server, run_workers):
    running = make_server(workers=1, rounds=2)
    target = f"127.0.0.1:{running.port}"
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="gradwire.v1.GradientExchange"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        run_workers(running.port, 1)
        running.thread.join(30)
        st = fetch_status(channel)
    assert st.finished and st.protocol == "gradwire.v1" and st.params == 26122
    assert len(st.workers) == 1 and st.workers[0].counters.uplink_payload_bytes == 2 * 4 * 26122
    assert [r.workers for r in st.rounds] == [1, 1]


def test_late_joiner_joins_next_round(make_server, run_workers):
    """A worker that arrives after the start gets its own rank and takes part."""
    running = make_server(workers=1, rounds=30)
    first = threading.Thread(target=run_workers, args=(running.port, 1, "early"))
    first.start()
    while running.engine.snapshot().round < 2:
        running.thread.join(0.05)
    late = run_workers(running.port, 1, "late")
    first.join(60)
    running.thread.join(30)
    s = running.summary()
    late_rec = next(w for w in s["per_worker"] if w["worker_id"] == "late0")
    assert late[0].finished and late_rec["rank"] == 1 and 0 < late_rec["rounds_aggregated"] < 30
    assert s["workers"] == 2


def test_checkpoint_resume(make_server, tmp_path, run_workers):
    running = make_server(workers=1, rounds=4, checkpoint_every=2, out=str(tmp_path))
    run_workers(running.port, 1)
    running.thread.join(30)
    ckpt = tmp_path / "checkpoint.pt"
    assert ckpt.exists()
    resumed = make_server(workers=1, rounds=6, resume=str(ckpt), out=str(tmp_path / "b"))
    assert resumed.engine.ledger.round_count() == 4
    results = run_workers(resumed.port, 1, "again")
    resumed.thread.join(30)
    s = resumed.summary()
    assert results[0].finished and s["rounds"] == 6 and [e["round"] for e in s["rounds_log"]] == list(range(6))


def test_prometheus_metrics_match_the_ledger(make_server, run_workers):
    import urllib.request

    running = make_server(workers=1, rounds=2, metrics_address="127.0.0.1:0")
    run_workers(running.port, 1, "m")
    running.thread.join(30)
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    payload = running.summary()["per_worker"][0]["uplink_payload_bytes"]
    assert f'gradwire_worker_uplink_payload_bytes_total{{rank="0",worker_id="m0"}} {float(payload)}' in text
    assert "gradwire_test_accuracy" in text and "gradwire_round 2.0" in text
    down = running.summary()["per_worker"][0]["downlink_payload_bytes"]
    assert down == 2 * 4 * running.summary()["params"]  # welcome + one round result, dense
    assert f'gradwire_worker_downlink_payload_bytes_total{{rank="0",worker_id="m0"}} {float(down)}' in text


def test_run_ends_when_every_worker_is_gone(make_server, manual_workers):
    """Workers that die mid-run must not leave the PS waiting forever."""
    running = make_server(workers=1, rounds=50, round_timeout_s=1.0)
    w = manual_workers(f"127.0.0.1:{running.port}")
    assert w.hello("only").WhichOneof("body") == "welcome"
    w.close()
    running.thread.join(30)
    assert not running.thread.is_alive()
    s = running.summary()
    assert s["rounds"] == 0 and "every worker left" in s["finish_reason"]


def test_momentum_is_applied_once_when_the_codec_carries_it(make_server, run_workers):
    """topk:momentum=0.9 (DGC momentum correction) keeps the velocity at the workers: with the default
    ``--momentum auto`` the PS steps with plain SGD; dense keeps the PS's heavy ball."""
    corrected = make_server(workers=2, rounds=3, codec="topk:ratio=0.05,momentum=0.9")
    run_workers(corrected.port, 2, prefix="mc")
    corrected.thread.join(30)
    s = corrected.summary()
    assert s["rounds"] == 3 and s["server_momentum"] == 0.0 and s["worker_momentum"] == 0.9
    assert corrected.engine.optimizer.opt.param_groups[0]["momentum"] == 0.0
    assert s["codec_stats"]["velocity_norm"] > 0

    dense = make_server(workers=1, rounds=1)
    assert dense.engine.server_momentum == 0.9
    assert dense.engine.optimizer.opt.param_groups[0]["momentum"] == 0.9
    explicit = make_server(workers=1, rounds=1, codec="topk:momentum=0.9", momentum=0.5)
    assert explicit.engine.server_momentum == 0.5  # as asked, with a warning in the log
