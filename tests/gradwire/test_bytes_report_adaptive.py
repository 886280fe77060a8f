"""`gradwire bytes` shows a bandwidth-adaptive codec's choices: each round's rate by rank, and per
worker its last and mean rate, how often it changed, the link the PS measured and how many round
trips kept the target, in the table and in --json.

The summary is real: `gradwire simulate --workers 3 --rounds 12 --codec adaptive:rates=(2,4,8,32),target=0.3
--links 10mbit,10mbit,100mbit --dataset fashion-mnist --model lenet5` as root (network namespaces, tbf).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from gradwire import bytes_report as br
from gradwire.bytes_report_render import COMPACT_WIDTH

DATA = Path(__file__).parent / "bytes_report_data"


def _text(renderable, width: int = COMPACT_WIDTH) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def _report(name: str) -> dict:
    return br.build_report(br.run_from_summary(json.loads((DATA / name).read_text())))


def test_the_report_carries_each_rounds_rates_and_each_workers_measured_link():
    report = _report("simulate_adaptive_links.json")
    assert report["rate_target_s"] == 0.3
    rounds = report["rounds"]
    assert rounds[0]["rates"] == {"0": 2.0, "1": 2.0, "2": 2.0}  # nothing measured yet
    assert rounds[-1]["rates"] == {"0": 2.0, "1": 2.0, "2": 32.0}
    assert rounds[0]["round_trip_s"] is None and set(rounds[-1]["round_trip_s"]) == {"0", "1", "2"}
    by_rank = {w["rank"]: w for w in report["workers"]}
    for rank in (0, 1):  # tbf at 10 Mbit/s, measured by the PS from bytes and arrival times
        assert by_rank[rank]["measured_link_bps"] == pytest.approx(10e6, rel=0.15)
        assert by_rank[rank]["rate_last"] == 2.0 and by_rank[rank]["rate_changes"] == 0
    assert by_rank[2]["measured_link_bps"] > 50e6 and by_rank[2]["rate_last"] == 32.0
    assert by_rank[2]["rate_changes"] == 1 and by_rank[2]["round_trips_within_target"] == 1.0


def test_the_compact_and_wide_views_show_the_rates_and_json_has_them(tmp_path, capsys):
    report = _report("simulate_adaptive_links.json")
    compact = _text(br.render(report))
    assert "rate by rank" in compact and "2/2/32" in compact and "adaptive rate" in compact
    assert "10 Mb/s" in compact or "9.9" in compact  # the measured link of the 10 Mbit/s workers
    assert not [line for line in compact.splitlines() if len(line) > COMPACT_WIDTH]
    wide = _text(br.render(report, wide=True), width=400)
    assert "rate by rank" in wide and "2/2/32" in wide
    path = tmp_path / "s.json"
    path.write_text((DATA / "simulate_adaptive_links.json").read_text())
    assert br.main(["--summary", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rounds"][-1]["rates"] == {"0": 2.0, "1": 2.0, "2": 32.0}
    assert printed["workers"][2]["rate_last"] == 32.0


def test_other_codecs_have_no_rates():
    report = _report("simulate_loopback.json")
    assert all(r["rates"] is None for r in report["rounds"]) and report["rate_target_s"] is None
    assert all(w["rate_last"] is None for w in report["workers"])
    assert "rate by rank" not in _text(br.render(report))
