"""`gradwire bytes` for people: the compact 100-column view, n/a for counters that do not exist,
compose names, link profiles and achieved throughput, downlink compression, --watch into a pipe.

Two summaries are real: written by `gradwire simulate --workers 2 --rounds 6` over loopback
(every process records eth0, which the traffic never crosses) and with `--link 1mbit` as root (each
worker counts its own veth).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from gradwire import bytes_report as br
from gradwire.bytes_report_render import COMPACT_WIDTH

DATA = Path(__file__).parent / "bytes_report_data"


def _summary(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _text(renderable, width: int = COMPACT_WIDTH) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def _assert_fits(text: str, width: int = COMPACT_WIDTH) -> None:
    assert "…" not in text, text
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, too_long


def _big_compose_run(workers: int = 12):
    """A large run: 12 workers, long profiles, byte counts in the gigabytes, compose containers."""
    summary = _summary("simulate_link_1mbit.json")
    base = summary["per_worker"][0]
    summary["per_worker"] = []
    for rank in range(workers):
        w = json.loads(json.dumps(base))
        w.update(worker_id=f"{rank:012x}", hostname=f"{rank:012x}", rank=rank)
        for key in ("uplink_payload_bytes", "uplink_message_bytes", "downlink_message_bytes", "downlink_payload_bytes"):
            w[key] *= 10_000
        w["interface_end"]["tx_bytes"] *= 10_000
        w["interface_end"]["rx_bytes"] *= 10_000
        summary["per_worker"].append(w)
    containers = [br.ContainerInfo(name=f"gradwire-worker-{rank + 1}", id=f"{rank:012x}" + "0" * 52,
                                   hostname=f"{rank:012x}", service="worker", state="exited", number=rank + 1,
                                   links="100mbit/1gbit,10mbit,unshaped")
                  for rank in range(workers)]
    containers.append(br.ContainerInfo(name="gradwire-ps-1", id="f" * 64, hostname="ps", service="ps",
                                       state="exited", number=1))
    return br.build_report(br.run_from_summary(summary), containers, project="gradwire")


def test_compact_view_fits_100_columns_and_leads_with_accuracy_time_and_compression():
    rep = br.build_report(br.run_from_summary(_summary("simulate_link_1mbit.json")), link_env="1mbit")
    text = _text(br.render(rep))
    _assert_fits(text)
    head = text.splitlines()[:4]
    assert "accuracy 0.4290" in head[1] and "time 10.3 s" in head[1] and "round 6/6" in head[1]
    assert head[2].startswith("↑ uplink") and "1.00× payload" in head[2] and "0.93× on the wire" in head[2]
    assert head[3].startswith("↓ downlink") and "1.00× payload" in head[3] and "0.77× on the wire" in head[3]
    assert "ps (PS)" in text  # the PS's side of the same traffic

    big = _big_compose_run()
    text = _text(br.render(big))
    _assert_fits(text)
    for rank in range(12):
        assert f"worker-{rank + 1} " in text
    assert "100mbit/1gbit" in text and "unshaped" in text


def test_wide_view_is_never_cut(capsys, tmp_path, monkeypatch):
    """--wide keeps every column; printed to a 100-column console it widens rather than cut (`↑ protob…`)."""
    monkeypatch.setenv("COLUMNS", "100")
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(_summary("simulate_link_1mbit.json")))
    assert br.main(["--summary", str(path), "--wide"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "↑ protobuf" in out and "vs dense" in out
    assert max(len(line) for line in out.splitlines()) > 100
    assert br.main(["--summary", str(path)]) == 0
    _assert_fits(capsys.readouterr().out)


def test_counters_that_do_not_exist_are_na_not_zero():
    """simulate over loopback: the processes recorded eth0, which never moved while 2.5 MB of messages
    crossed loopback. That is no measurement: n/a, not 0 bytes (nor a 0.000 ratio)."""
    rep = br.build_report(br.run_from_summary(_summary("simulate_loopback.json")))
    for w in rep["workers"]:
        assert w["interface_tx_bytes"] is None and w["interface_rx_bytes"] is None
        assert w["interface_source"] == "not-on-path" and w["tx_over_message"] is None
        assert w["achieved_up_bps"] is None and w["link_profile"] is None
    assert rep["ps"]["interface_rx_bytes"] is None and rep["ps"]["interface_source"] == "not-on-path"
    assert rep["headline"]["uplink"]["interface_compression"] is None
    assert rep["headline"]["uplink"]["payload_compression"] == pytest.approx(1.0)
    text = _text(br.render(rep))
    rows = [line for line in text.splitlines() if line.startswith("vm ")]
    assert len(rows) == 2 and all(" 0 B" not in row and row.count("n/a") == 5 for row in rows), rows
    wide = _text(br.render(rep, wide=True), width=200)
    assert "0.000" not in wide and "│       0 │" not in wide
    # The link run's worker veths did count: real figures there.
    link = br.build_report(br.run_from_summary(_summary("simulate_link_1mbit.json")))
    assert all(w["interface_tx_bytes"] > w["uplink_protobuf_bytes"] for w in link["workers"])


def test_compose_names_link_profiles_and_achieved_throughput():
    rep = _big_compose_run(workers=4)
    assert [w["name"] for w in rep["workers"]] == ["worker-1", "worker-2", "worker-3", "worker-4"]
    assert rep["workers"][0]["container"] == "gradwire-worker-1" and rep["ps"]["name"] == "ps-1"
    # GRADWIRE_LINKS by the rank the PS assigned, cyclically.
    assert [w["link_profile"] for w in rep["workers"]] == ["100mbit/1gbit", "10mbit", "unshaped", "100mbit/1gbit"]
    assert (rep["workers"][0]["link_up_bps"], rep["workers"][0]["link_down_bps"]) == (100_000_000, 1_000_000_000)
    elapsed = rep["elapsed_s"]
    assert elapsed == pytest.approx(10.2526, abs=1e-3)
    w = rep["workers"][1]
    assert w["achieved_up_bps"] == pytest.approx(8 * w["interface_tx_bytes"] / elapsed)
    assert w["achieved_down_bps"] == pytest.approx(8 * w["interface_rx_bytes"] / elapsed)
    # A container without compose labels keeps its name; one without GRADWIRE_LINK(S) is unshaped.
    plain = br.ContainerInfo(name="adhoc", id="a" * 64, hostname="h", service="", state="running")
    assert plain.compose_name == "adhoc"
    summary = _summary("simulate_link_1mbit.json")
    containers = [br.ContainerInfo(name="p-worker-2", id="b" * 64, hostname="vm", service="worker", state="exited",
                                   number=2)]
    assert br.build_report(br.run_from_summary(summary), containers)["workers"][0]["link_profile"] == "unshaped"
    # Real 1 Mbit/s run: the uplink achieved at most the link's rate.
    real = br.build_report(br.run_from_summary(summary), link_env="1mbit")
    assert all(0.2e6 < w["achieved_up_bps"] <= 1e6 for w in real["workers"])


def test_json_has_every_figure_including_downlink_compression(tmp_path, capsys):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(_summary("simulate_link_1mbit.json")))
    assert br.main(["--summary", str(path), "--json", "--links", "1mbit,2mbit/4mbit"]) == 0
    rep = json.loads(capsys.readouterr().out)
    params = rep["params"]
    for w in rep["workers"]:
        assert w["downlink_models"] == 6
        assert w["downlink_dense_equivalent_bytes"] == 4 * params * 6
        assert w["downlink_payload_compression"] == pytest.approx(4 * params * 6 / w["downlink_payload_bytes"])
        assert w["downlink_interface_compression"] == pytest.approx(4 * params * 6 / w["interface_rx_bytes"])
        assert w["uplink_protobuf_bytes"] == w["uplink_message_bytes"] + w["uplink_control_bytes"]
    assert [w["link_profile"] for w in rep["workers"]] == ["1mbit", "2mbit/4mbit"]
    head = rep["headline"]
    assert head["final_accuracy"] == pytest.approx(0.42897, abs=1e-5) and head["round"] == 6
    assert head["downlink"]["payload_compression"] == pytest.approx(1.0)
    assert head["downlink"]["interface_compression"] == pytest.approx(
        rep["totals"]["downlink_dense_equivalent_bytes"] / rep["totals"]["interface_rx_bytes"])
    assert rep["totals"]["achieved_up_bps"] == pytest.approx(8 * rep["totals"]["interface_tx_bytes"] / rep["elapsed_s"])
    # The PS row: its eth0 never saw the bridge traffic of `simulate --link`, so n/a.
    assert rep["ps"]["interface_rx_bytes"] is None and rep["ps"]["achieved_up_bps"] is None
    # Each figure of the compact table is a JSON figure: rendered from the JSON, it matches.
    from gradwire.bytes_report_render import _si

    text = _text(br.render(rep))
    for w in rep["workers"]:
        for key, unit in (("interface_tx_bytes", "B"), ("interface_rx_bytes", "B"), ("achieved_up_bps", "b/s"),
                          ("achieved_down_bps", "b/s")):
            assert _si(w[key], unit) in text


def test_status_without_downlink_model_count_says_na():
    from tests.gradwire.test_bytes_report import fake_status

    rep = br.build_report(br.run_from_status(fake_status()))
    assert rep["workers"][0]["downlink_payload_compression"] is None and rep["elapsed_s"] is None
    text = _text(br.render(rep))
    _assert_fits(text)
    assert "time n/a" in text


def test_watch_into_a_pipe_prints_every_refresh(monkeypatch, capsys):
    """Without a terminal (capsys is no tty) every refresh prints a line, then the whole report."""
    base = br.build_report(br.run_from_summary(_summary("simulate_link_1mbit.json")))
    frames = []
    for n, finished in ((2, False), (4, False), (6, True)):
        r = json.loads(json.dumps(base))
        r["headline"]["round"], r["finished"] = n, finished
        r["ps"]["state"] = "exited" if finished else "running"
        frames.append(r)
    calls = iter(frames)
    monkeypatch.setattr(br, "collect", lambda *a, **k: next(calls))
    monkeypatch.setattr(br.time, "sleep", lambda s: None)
    args = SimpleNamespace(project="p", stack=None, ps_service="ps", worker_service="worker", link=None, links=None,
                           json=False, interval=0.01, rounds=None, wide=False)
    assert br._watch(object(), args) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"\d\d:\d\d:\d\d round ", line)]
    assert [line.split(" round ")[1].split(" ")[0] for line in lines] == ["2/6", "4/6", "6/6"]
    assert "↑ uplink" in out  # the full report at the end
