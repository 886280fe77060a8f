"""`python -m experiments.links --quick` end to end, and its ratio statistics by hand.

The unshaped cells run anywhere; the 10 Mbit/s cells need root (a network namespace per worker) and
are checked against the link's rate: dense's transfer per round cannot beat the bytes it moves.
"""

from __future__ import annotations

import json
import math

import pytest

from experiments import links
from gradwire.netns import why_unavailable

RATE_BPS = 10_000_000


def test_speedup_is_the_geometric_mean_of_paired_ratios_and_an_interval_through_1_is_no_difference():
    r = links.ratio_ci([10.0, 20.0, 40.0], [1.0, 2.0, 4.0])  # 10× on every seed: no spread
    assert r["mean"] == pytest.approx(10.0) and r["n"] == 3 and r["verdict"] == "faster"
    noisy = links.ratio_ci([10.0, 10.0, 10.0], [5.0, 20.0, 10.0])  # 2×, 0.5×, 1×: geometric mean 1
    assert noisy["mean"] == pytest.approx(1.0) and noisy["verdict"] == "no difference"
    assert links.ratio_ci([10.0, None], [None, 3.0])["n"] == 0  # no seed where both reached the target
    one = links.ratio_ci([9.0], [3.0])
    assert one["mean"] == pytest.approx(3.0) and one["low"] is None and one["verdict"] == "one seed: no interval"


def test_only_keeps_dense_and_the_named_methods():
    args = links.parse_args(["--links", "10mbit", "--only", "qsgd16_q512"])
    assert [(c.link, c.method.label, c.seeds) for c in args.plan] == [
        ("10mbit", "dense", (0, 1, 2)), ("10mbit", "qsgd16_q512", (0, 1, 2))]
    with pytest.raises(SystemExit):
        links.parse_args(["--only", "no_such_method"])


def test_quick_run_writes_the_table_the_plot_and_times_the_link(tmp_path):
    shaped = not why_unavailable()
    argv = ["--quick", "--out", str(tmp_path)] + ([] if shaped else ["--links", "unshaped"])
    assert links.main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    cells = {(c["link"], c["label"]): c for c in res["cells"]}
    assert {("unshaped", "dense"), ("unshaped", "ans4")} <= set(cells)
    assert (tmp_path / "table.md").read_text().count("| unshaped |") == 2
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 10_000
    assert "Machine load: the 1-minute load average" in (tmp_path / "table.md").read_text()
    for run in res["runs"].values():  # the load around each run, as its summary recorded it
        assert len(run["load_average"]["start"]) == 3 and len(run["load_average"]["end"]) == 3
    for c in cells.values():
        assert c["seeds_ok"] == [0] and 0.0 < c["final_accuracy"]["mean"] <= 1.0
        assert c["seconds_per_round"]["mean"] > 0
    # The target is dense's mean final accuracy − 1 point, and dense reaches it by its last evaluation.
    assert res["target_accuracy"] == pytest.approx(sum(res["dense_final_accuracy"]) / len(res["dense_final_accuracy"]) - 0.01)
    assert cells[("unshaped", "dense")]["time_to_target_s"]["reached"] == 1
    if not shaped:
        pytest.skip(f"10 Mbit/s cells not run: {why_unavailable()}")
    dense, ans4 = cells[("10mbit", "dense")], cells[("10mbit", "ans4")]
    run = json.loads(next((tmp_path / "runs").glob("10mbit_dense_s0.json")).read_text())
    # Per round a full float32 model goes up and one comes down over the shaped link: the transfer part of
    # the split cannot be shorter than those bytes at the rate (10 % for TCP/IP headers and the TBF burst).
    floor_s = 2 * 4 * run["params"] * 8 / RATE_BPS
    assert dense["split_ms"]["transfer_ms"]["mean"] / 1000 >= 0.9 * floor_s
    assert ans4["split_ms"]["transfer_ms"]["mean"] < dense["split_ms"]["transfer_ms"]["mean"]
    unshaped_transfer = cells[("unshaped", "dense")]["split_ms"]["transfer_ms"]["mean"]
    assert dense["split_ms"]["transfer_ms"]["mean"] > unshaped_transfer
    assert math.isfinite(dense["seconds_per_round"]["mean"])
