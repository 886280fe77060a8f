"""`gradwire bytes`: the table/ratio logic on fake Status / summary data (no Docker needed)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from gradwire import bytes_report as br

PARAMS = 1000


def _counters(tx: int, rx: int, iface: str = "eth0") -> dict:
    return {"interface": iface, "tx_bytes": tx, "rx_bytes": rx}


def fake_summary(codec: str = "dense", bytes_per_entry: float = 4.0, rounds: int = 4) -> dict:
    """A summary.json as the PS writes it: 2 workers, one recorded interface overhead of 1 %."""
    payload = int(bytes_per_entry * PARAMS)
    msg = payload + 60
    down = 4 * PARAMS + 80
    per_worker = []
    for rank, host in enumerate(["aaaaaaaaaaaa", "bbbbbbbbbbbb"]):
        up_total, down_total = msg * rounds, down * rounds
        per_worker.append({
            "worker_id": host, "rank": rank, "hostname": host, "rounds_aggregated": rounds, "sessions": 1,
            "uplink_payload_bytes": payload * rounds, "uplink_message_bytes": up_total, "uplink_control_bytes": 200,
            "downlink_message_bytes": down_total, "rejected_messages": 0, "last_rejection": "",
            "interface_start": _counters(100, 500),
            "interface_end": _counters(100 + int(1.01 * (up_total + 200)), 500 + int(1.01 * down_total)),
            "codec_stats": {},
        })
    rounds_log = [
        {"round": r, "uplink_payload_bytes": 2 * payload, "uplink_message_bytes": 2 * msg,
         "downlink_message_bytes": 2 * down, "workers": 2, "stragglers": 0, "train_loss": 2.0 - 0.1 * r,
         "test_accuracy": 0.5 if r == rounds - 1 else None, "test_loss": None}
        for r in range(rounds)
    ]
    return {
        "codec": codec, "params": PARAMS, "rounds": rounds, "final_accuracy": 0.5, "config": {"rounds": rounds},
        "server_interface": {"start": _counters(0, 1000), "end": _counters(2 * down * rounds + 500, 2 * msg * rounds + 3000)},
        "per_worker": per_worker, "rounds_log": rounds_log,
    }


def fake_status(rounds: int = 3) -> dict:
    """`gradwire status --json` output: protobuf JSON with uint64 as strings and NaN as "NaN"."""
    return {
        "protocol": "gradwire.v1", "round": str(rounds), "total_rounds": "10", "codec_spec": "fp16", "params": str(PARAMS),
        "finished": False,
        "workers": [
            {"worker_id": "cccccccccccc", "rank": 0, "connected": True, "hostname": "cccccccccccc",
             "rounds_aggregated": str(rounds), "uplink_payload_bytes": str(2000 * rounds),
             "uplink_message_bytes": str(2050 * rounds), "downlink_message_bytes": str(4100 * rounds),
             "rejected_messages": "0", "interface_start": _counters(10, 20)},
        ],
        "rounds": [
            {"round": str(r), "uplink_payload_bytes": "2000", "uplink_message_bytes": "2050",
             "downlink_message_bytes": "4100", "workers_aggregated": 1, "stragglers": 0, "train_loss": 1.5,
             "test_accuracy": "NaN", "test_loss": "NaN"}
            for r in range(rounds)
        ],
        "server_interface_start": _counters(0, 0),
        "server_interface_now": _counters(50_000, 30_000),
    }


def test_summary_report_ratios():
    rep = br.build_report(br.run_from_summary(fake_summary()), project="p")
    assert rep["source"] == "summary" and rep["finished"] and rep["distinct_ranks"]
    w0 = rep["workers"][0]
    assert w0["rank"] == 0 and w0["interface_source"] == "recorded"
    up_msg = w0["uplink_message_bytes"] + w0["uplink_control_bytes"]
    assert w0["interface_tx_bytes"] == int(1.01 * up_msg)  # end − start
    assert w0["tx_over_message"] == pytest.approx(1.01, abs=1e-3)
    assert w0["uplink_within_allowance"] is True
    assert w0["payload_bits_per_entry"] == pytest.approx(32.0)
    assert w0["payload_compression"] == pytest.approx(1.0)
    assert w0["interface_compression"] == pytest.approx(w0["dense_equivalent_bytes"] / w0["interface_tx_bytes"])
    assert w0["interface_compression"] < 1.0  # framing makes the wire cost more than the payload
    tot = rep["totals"]
    assert tot["updates"] == 8 and tot["interface_tx_bytes"] == sum(w["interface_tx_bytes"] for w in rep["workers"])
    ps = rep["ps"]
    assert ps["interface_rx_bytes"] == 2 * (4060 * 4) + 2000  # rx end − rx start
    assert ps["rx_over_uplink_message"] == pytest.approx(ps["interface_rx_bytes"] / ps["uplink_message_bytes"])
    assert [r["round"] for r in rep["rounds"]] == [0, 1, 2, 3]
    assert rep["rounds"][-1]["test_accuracy"] == 0.5 and rep["rounds"][0]["test_accuracy"] is None


def test_compressed_codec_shows_compression_on_the_interface():
    rep = br.build_report(br.run_from_summary(fake_summary("fp16", bytes_per_entry=2.0)))
    w = rep["workers"][0]
    assert w["payload_compression"] == pytest.approx(2.0)
    assert 1.8 < w["interface_compression"] < 2.0
    assert rep["totals"]["interface_bits_per_entry"] == pytest.approx(32 / rep["totals"]["interface_compression"])


def test_status_json_with_live_docker_stats():
    run = br.run_from_status(fake_status())
    assert run.source == "status" and run.codec == "fp16" and run.params == PARAMS and not run.finished
    assert all(r.test_accuracy is None for r in run.rounds)  # "NaN" means not evaluated
    containers = [
        br.ContainerInfo(name="p-worker-1", id="cccccccccccc" + "0" * 52, hostname="cccccccccccc", service="worker",
                         state="running", number=1, live={"eth0": {"tx_bytes": 6510, "rx_bytes": 12_520}}),
        # Started but not joined yet: listed without a rank, its whole namespace counted.
        br.ContainerInfo(name="p-worker-2", id="d" * 64, hostname="dddddddddddd", service="worker", state="running",
                         number=2, live={"eth0": {"tx_bytes": 300, "rx_bytes": 400}}),
        br.ContainerInfo(name="p-ps-1", id="e" * 64, hostname="ps", service="ps", state="running", number=1,
                         live={"eth0": {"tx_bytes": 53_000, "rx_bytes": 37_000}}),  # above its Status
    ]
    rep = br.build_report(run, containers, project="p")
    w, pending = rep["workers"]
    assert w["container"] == "p-worker-1" and w["interface_source"] == "docker-stats"
    assert (w["interface_tx_bytes"], w["interface_rx_bytes"]) == (6500, 12_500)  # live − recorded start
    assert pending["container"] == "p-worker-2" and pending["rank"] is None and pending["interface_tx_bytes"] == 300
    assert rep["totals"]["workers"] == 1
    assert rep["ps"]["container"] == "p-ps-1" and rep["ps"]["interface_tx_bytes"] == 53_000
    assert rep["ps"]["interface_source"] == "docker-stats"


def test_stopped_container_falls_back_to_recorded_counters():
    summary = fake_summary()
    containers = [br.ContainerInfo(name="p-worker-7", id="a" * 64, hostname="aaaaaaaaaaaa", service="worker",
                                   state="exited", number=7)]
    rep = br.build_report(br.run_from_summary(summary), containers, project="p")
    w = rep["workers"][0]
    assert w["container"] == "p-worker-7" and w["state"] == "exited" and w["interface_source"] == "recorded"
    assert rep["workers"][1]["container"] is None  # no container for the second worker: still reported


def test_missing_counters_are_none_not_zero():
    summary = fake_summary()
    for w in summary["per_worker"]:
        w["interface_start"] = w["interface_end"] = None
    rep = br.build_report(br.run_from_summary(summary))
    w = rep["workers"][0]
    assert w["interface_tx_bytes"] is None and w["tx_over_message"] is None and w["uplink_within_allowance"] is None
    assert rep["totals"]["interface_tx_bytes"] is None
    # protobuf's JSON for an unset InterfaceCounters: empty interface name means "not recorded".
    assert br._counters({"interface": "", "tx_bytes": "0", "rx_bytes": "0"}) is None


def test_duplicate_ranks_are_flagged():
    summary = fake_summary()
    summary["per_worker"][1]["rank"] = 0
    assert br.build_report(br.run_from_summary(summary))["distinct_ranks"] is False


def test_allowance_bounds():
    assert br.within_allowance(999, 1000, 1) is False  # fewer bytes on the wire than in the messages
    assert br.within_allowance(1000, 1000, 1) is True
    limit = 1000 + br.allowance_bytes(1000, 3)
    assert br.within_allowance(int(limit), 1000, 3) is True
    assert br.within_allowance(int(limit) + 1, 1000, 3) is False
    assert br.within_allowance(None, 1000, 3) is None


@settings(max_examples=50, deadline=None)
@given(start=st.integers(0, 2**40), sent=st.integers(0, 2**30), received=st.integers(0, 2**30))
def test_interface_bytes_is_end_minus_start(start, sent, received):
    s, e = _counters(start, start), _counters(start + sent, start + received)
    assert br.interface_bytes(s, e, None) == (sent, received, "recorded")
    live = {"eth0": {"tx_bytes": start + sent, "rx_bytes": start + received}, "lo": {"tx_bytes": 9, "rx_bytes": 9}}
    assert br.interface_bytes(s, None, live) == (sent, received, "docker-stats")


def test_compose_containers_count_their_own_interface():
    """Inside a compose container the project network is eth0. The file once took the host's
    GRADWIRE_INTERFACE (${GRADWIRE_INTERFACE:-eth0}); exported as lo for loopback runs, every worker
    then counted its loopback, i.e. its DNS lookups: interface tx 210 B for 419,010 protobuf bytes."""
    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text()
    assert re.findall(r"^\s*-\s*GRADWIRE_INTERFACE=(\S+)", compose, flags=re.M) == ["eth0", "eth0"]


def test_run_from_json_tells_formats_apart():
    assert br.run_from_json(fake_summary()).source == "summary"
    assert br.run_from_json(fake_status()).source == "status"
    with pytest.raises(br.ReportError):
        br.run_from_json({"something": "else"})


def test_render_has_every_container_and_round():
    rep = br.build_report(br.run_from_summary(fake_summary(rounds=3)), project="p")
    console = Console(file=io.StringIO(), width=200)
    console.print(br.render(rep, wide=True))
    text = console.file.getvalue()
    assert "aaaaaaaaaaaa" in text and "bbbbbbbbbbbb" in text and "(PS)" in text
    assert "1.010" in text  # the tx / protobuf ratio
    assert text.count("│     2 │") >= 1  # the per-round table's last round
    console = Console(file=io.StringIO(), width=200)
    console.print(br.render(rep, max_rounds=1, wide=True))
    assert "last 1 of 3" in console.file.getvalue()


def test_cli_json_and_table_from_files(tmp_path, capsys):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(fake_summary()))
    assert br.main(["--summary", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for w in out["workers"]:
        for key in ("container", "rank", "uplink_payload_bytes", "uplink_message_bytes", "interface_tx_bytes",
                    "interface_rx_bytes"):
            assert key in w
    assert br.main(["--summary", str(path)]) == 0
    assert "gradwire bytes" in capsys.readouterr().out
    status = tmp_path / "status.json"
    status.write_text(json.dumps(fake_status()))
    assert br.main(["--status", str(status), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["codec"] == "fp16"
    assert br.main(["--summary", str(tmp_path / "missing.json")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_wait_for_summary_wants_a_fresh_file(tmp_path, monkeypatch):
    import os
    import time

    path = tmp_path / "summary.json"
    path.write_text(json.dumps(fake_summary()))
    old = time.time() - 3600
    os.utime(path, (old, old))  # a previous run's summary: not this run's
    answers = iter([True])  # the PS resolved once, then is gone (no DNS query is made)
    monkeypatch.setattr(br, "_resolves", lambda host: next(answers, False))
    with pytest.raises(br.ReportError, match="stopped without writing"):
        br.wait_for_summary(str(path), time.time(), ps_host="ps", poll_s=0.01)
    # A swarm starts the report beside the PS: a name that never resolved yet is waited for, up to a bound.
    monkeypatch.setattr(br, "_resolves", lambda host: False)
    with pytest.raises(br.ReportError, match="did not resolve within"):
        br.wait_for_summary(str(path), time.time(), ps_host="ps", poll_s=0.01, appear_s=0.1)
    with pytest.raises(br.ReportError, match="no fresh"):
        br.wait_for_summary(str(path), time.time(), timeout_s=0.05, poll_s=0.01)
    since = time.time()
    path.write_text(json.dumps(fake_summary()))  # written now: accepted at once
    br.wait_for_summary(str(path), since, ps_host="ps", poll_s=0.01)


def test_wait_for_summary_waits_for_a_ps_not_resolving_yet(tmp_path, monkeypatch):
    """docker stack deploy starts the report at the same time as the PS, whose name resolves only once
    its task runs: the report must not give up on a PS it has never seen (it once did, at once)."""
    import threading
    import time

    path = tmp_path / "summary.json"
    monkeypatch.setattr(br, "_resolves", lambda host: False)
    since = time.time()
    writer = threading.Timer(0.3, lambda: path.write_text(json.dumps(fake_summary())))
    writer.start()
    try:
        br.wait_for_summary(str(path), since, ps_host="ps", poll_s=0.01)
    finally:
        writer.cancel()
    assert path.exists()


def test_downlink_payload_and_codec_are_reported_from_both_sources():
    summary = fake_summary(rounds=3)
    summary["downlink_codec"] = "ans:bits=6"
    for w in summary["per_worker"]:
        w["downlink_payload_bytes"] = 5000
    for r in summary["rounds_log"]:
        r["downlink_payload_bytes"] = 3000
    rep = br.build_report(br.run_from_summary(summary))
    assert rep["downlink_codec"] == "ans:bits=6"
    assert [w["downlink_payload_bytes"] for w in rep["workers"]] == [5000, 5000]
    assert rep["totals"]["downlink_payload_bytes"] == 10000
    assert [r["downlink_payload_bytes"] for r in rep["rounds"]] == [3000] * 3

    status = fake_status()
    status["downlink_codec_spec"] = "fp16"
    status["workers"][0]["downlink_payload_bytes"] = "777"
    rep = br.build_report(br.run_from_status(status))
    assert rep["downlink_codec"] == "fp16" and rep["workers"][0]["downlink_payload_bytes"] == 777
    assert br.build_report(br.run_from_summary(fake_summary()))["downlink_codec"] == "dense"  # older summaries

    console = Console(file=io.StringIO(), width=260)
    console.print(br.render(br.build_report(br.run_from_summary(summary)), wide=True))
    text = console.file.getvalue()
    assert "downlink ans:bits=6" in text and "10,000" in text and "3,000" in text


def test_a_live_reading_below_the_recorded_counters_is_not_used():
    """Counters only grow: docker stats of a container tearing its network down read 1,851 B sent
    after the worker had recorded 419 KB (a container test failed on it); the recorded end decides."""
    start = {"interface": "eth0", "tx_bytes": 1_000, "rx_bytes": 2_000}
    end = {"interface": "eth0", "tx_bytes": 421_000, "rx_bytes": 900_000}
    stale = {"eth0": {"tx_bytes": 2_851, "rx_bytes": 3_000}}
    assert br.interface_bytes(start, end, stale, end_is_floor=True) == (420_000, 898_000, "recorded")
    # Without a recorded end, a reading below the start is no reading at all.
    assert br.interface_bytes(start, None, {"eth0": {"tx_bytes": 10, "rx_bytes": 10}}) == (None, None, "none")
    # A live reading at or above the recorded end is still the live one.
    live = {"eth0": {"tx_bytes": 430_000, "rx_bytes": 910_000}}
    assert br.interface_bytes(start, end, live, end_is_floor=True) == (429_000, 908_000, "docker-stats")
