"""experiments/adaptive.py: round times from the PS's link measurements, the figures over seeds, and
its quick preset run for real (unshaped, so without root too)."""

from __future__ import annotations

import json

import pytest

from experiments import adaptive


def summary(accuracy: float, trips: dict[int, list[float]], rates: list[dict[str, float]] | None = None) -> dict:
    """A summary with one link sample per (round, rank): compute 0.1 s, transfer the rest."""
    samples = [{"rank": rank, "round": r + 1, "compute_seconds": 0.1, "transfer_seconds": t - 0.1,
                "downlink_bytes": 1000, "uplink_bytes": 100}
               for rank, ts in trips.items() for r, t in enumerate(ts)]
    stats = {"adaptive_rounds": [{"round": i, "rate": rt} for i, rt in enumerate(rates)]} if rates else {}
    return {"final_accuracy": accuracy, "link_samples": samples, "codec_stats": stats, "uplink_payload_bytes": 2e6,
            "uplink_bits_per_entry": 4.0, "elapsed_s": 10.0}


def test_round_time_is_the_slowest_workers_round_trip_and_is_judged_against_the_target():
    s = summary(0.8, {0: [0.3, 0.5, 0.4, 0.2], 1: [0.35, 0.2, 0.9, 0.1]})
    assert adaptive.round_times(s) == pytest.approx([0.35, 0.5, 0.9, 0.2])
    f = adaptive.run_figures(s, target=0.45)
    assert f["within_target"] == 0.5 and f["measured_rounds"] == 4
    assert f["p95_round_s"] == pytest.approx(0.84)  # numpy's linear interpolation between 0.5 and 0.9
    assert f["mean_rate_by_rank"] == {}


def test_adaptive_is_compared_with_the_most_accurate_fixed_setting_paired_by_seed():
    rates = [{"0": 2.0, "1": 32.0}, {"0": 8.0, "1": 32.0}]
    per_run = {}
    for seed, (a, d, q) in enumerate([(0.80, 0.81, 0.70), (0.78, 0.80, 0.69), (0.79, 0.80, 0.72)]):
        per_run[("adaptive", seed)] = adaptive.run_figures(summary(a, {0: [0.3]}, rates), 0.45)
        per_run[("dense", seed)] = adaptive.run_figures(summary(d, {0: [0.6]}), 0.45)
        per_run[("ans2", seed)] = adaptive.run_figures(summary(q, {0: [0.2]}), 0.45)
    assert per_run[("adaptive", 0)]["mean_rate_by_rank"] == {"0": 5.0, "1": 32.0}
    agg = adaptive.aggregate(per_run, ["adaptive", "dense", "ans2"], [0, 1, 2])
    cmp_ = agg["adaptive_vs_best_fixed"]
    assert cmp_["best_fixed"] == "dense"
    assert cmp_["accuracy_difference"]["mean"] == pytest.approx(-0.0133333, abs=1e-6)
    assert cmp_["within_1_point"] is False
    assert agg["dense"]["within_target"]["mean"] == 0.0 and agg["adaptive"]["within_target"]["mean"] == 1.0


def test_shaping_needs_root(monkeypatch):
    monkeypatch.setattr(adaptive.os, "geteuid", lambda: 1000)
    assert adaptive.can_shape() == "not root"
    args = adaptive.parse_args(["--quick"])
    assert not args.shaped and "--links" not in adaptive.command(args.methods[0], 0, args, "o", "l")


def test_quick_preset_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "adaptive"
    assert adaptive.main(["--quick", "--unshaped", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert not result["shaped"] and set(result["methods"]) == {"adaptive", "dense"}
    for label in ("adaptive", "dense"):
        run = result["per_run"][f"{label}_s0"]
        assert 0.0 < run["final_accuracy"] <= 1.0
        # 4 rounds, the first (after the Welcome) unmeasured
        assert run["measured_rounds"] == 3 and run["p95_round_s"] > 0 and 0.0 <= run["within_target"] <= 1.0
    assert set(result["per_run"]["adaptive_s0"]["mean_rate_by_rank"]) == {"0", "1"}
    assert result["aggregate"]["adaptive_vs_best_fixed"]["best_fixed"] == "dense"
    table = (out / "table.md").read_text()
    assert "| adaptive |" in table and "| dense |" in table and "unshaped" in table
    assert "rounds within target" in capsys.readouterr().out


def test_rounds_over_target_are_counted_with_and_without_the_warm_up_and_rate_changes_after_it():
    warm = adaptive.WARMUP
    trips = [0.9] * warm + [0.3, 0.5, 0.3, 0.3]  # every warm-up round over 0.45 s, one round after it
    rates = [{"0": 2.0}] * warm + [{"0": 8.0}, {"0": 16.0}, {"0": 8.0}, {"0": 8.0}]
    f = adaptive.run_figures(summary(0.8, {0: trips}, rates), target=0.45)
    assert f["rounds_over_target"] == warm + 1 and f["rounds_over_target_after_warmup"] == 1
    assert f["within_target"] == pytest.approx(3 / (warm + 4)) and f["within_target_after_warmup"] == 0.75
    # rounds are numbered from 0 here: the changes into rounds warm+1 (16) and warm+2 (8) count, the
    # one into round warm (8, the warm-up's end) does not
    assert f["switches_after_warmup_by_rank"] == {"0": 2}
