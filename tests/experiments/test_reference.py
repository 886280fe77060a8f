"""The statistics of the reference experiment, checked by hand, and its CI preset run for real."""

from __future__ import annotations

import json
import math

import pytest

from experiments import reference, stats

# t quantiles from a printed table (Student's t, two-sided 95 %): df = 2 and df = 4.
T_975_DF2 = 4.302653
T_975_DF4 = 2.776445


def test_t_ci_matches_a_hand_computed_interval():
    iv = stats.t_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sample std sqrt(2.5), standard error sqrt(2.5 / 5) = sqrt(0.5)
    assert iv.n == 5 and iv.mean == pytest.approx(3.0)
    assert iv.half_width == pytest.approx(T_975_DF4 * math.sqrt(0.5), rel=1e-6)
    assert iv.low == pytest.approx(3.0 - T_975_DF4 * math.sqrt(0.5), rel=1e-6)
    assert not iv.spans_zero()


def test_t_ci_of_one_or_no_value_has_no_width_and_counts_as_no_evidence():
    one = stats.t_ci([0.7])
    assert one.n == 1 and one.mean == 0.7 and math.isnan(one.half_width) and one.spans_zero()
    assert stats.fmt_interval(one) == "0.7000 (n=1)"
    none = stats.t_ci([])
    assert none.n == 0 and stats.fmt_interval(none) == "–"


def test_paired_ci_uses_the_per_seed_differences_and_skips_missing_pairs():
    a = [1.0, 2.0, 3.0, None]
    b = [0.5, 1.5, 2.0, 9.0]
    iv = stats.paired_ci(a, b)
    # differences 0.5, 0.5, 1.0: mean 2/3, std sqrt(1/12), standard error sqrt(1/36) = 1/6
    assert iv.n == 3 and iv.mean == pytest.approx(2.0 / 3.0)
    assert iv.half_width == pytest.approx(T_975_DF2 / 6.0, rel=1e-6)
    assert iv.spans_zero()  # 0.667 ± 0.717: no difference at 95 %
    assert stats.verdict(iv) == "no difference"
    # A shift shared by every seed is removed by pairing: the unpaired intervals overlap, the paired one does not.
    x = [0.70, 0.80, 0.75, 0.72, 0.78]
    y = [v - 0.01 for v in x]
    paired = stats.paired_ci(x, y)
    assert paired.mean == pytest.approx(0.01) and paired.half_width == pytest.approx(0.0, abs=1e-12)
    assert not paired.spans_zero() and stats.verdict(paired, what="x") == "better (x)"
    assert stats.t_ci(x).low < stats.t_ci(y).high
    with pytest.raises(ValueError):
        stats.paired_ci([1.0], [1.0, 2.0])


def test_bits_to_target_is_the_first_evaluation_reaching_it():
    curve = [(0.0, 0.1), (100.0, 0.5), (200.0, 0.72), (300.0, 0.69), (400.0, 0.8)]
    assert stats.bits_to_target(curve, 0.7) == 200.0
    assert stats.bits_to_target(curve, 0.8) == 400.0
    assert stats.bits_to_target(curve, 0.81) is None


def test_runs_that_never_reach_the_target_are_counted_not_dropped():
    reach = stats.summarize_reach([100.0, None, 300.0, None, 200.0])
    assert reach.reached == 3 and reach.runs == 5 and reach.not_reached == 2
    assert reach.interval.mean == pytest.approx(200.0) and reach.interval.n == 3
    text = stats.fmt_reach(reach, ".3g")
    assert "± " in text and text.endswith("not reached (2 of 5)")
    assert stats.fmt_reach(stats.summarize_reach([None, None])) == "not reached (2 of 2)"


def test_accuracy_at_bits_interpolates_between_evaluations_and_not_past_the_end():
    curve = [(0.0, 0.1), (100.0, 0.5), (100.0, 0.6), (300.0, 0.8)]
    assert stats.accuracy_at_bits(curve, 200.0) == pytest.approx(0.7)
    assert stats.accuracy_at_bits(curve, 100.0) == pytest.approx(0.6)  # the later of two equal-bit evaluations
    assert stats.accuracy_at_bits(curve, 300.0) == pytest.approx(0.8)
    assert stats.accuracy_at_bits(curve, 301.0) is None


def test_pareto_front_keeps_points_no_other_beats_on_both_axes():
    pts = [(32.0, 0.75), (16.0, 0.75), (2.0, 0.74), (1.0, 0.60), (4.0, 0.70), (0.5, 0.3)]
    assert reference.pareto_front(pts) == [5, 3, 2, 1]


def _summary(initial: float, accs: list[float], bytes_per_round: int, eval_every: int = 2) -> dict:
    log = []
    for r in range(len(accs) * eval_every):
        entry = {"round": r, "uplink_payload_bytes": bytes_per_round, "uplink_message_bytes": bytes_per_round + 10}
        if (r + 1) % eval_every == 0:
            entry["test_accuracy"] = accs[(r + 1) // eval_every - 1]
        log.append(entry)
    return {"initial_accuracy": initial, "final_accuracy": accs[-1], "rounds_log": log,
            "uplink_bits_per_entry": 8.0 * bytes_per_round / 100, "uplink_payload_bytes": bytes_per_round * len(log),
            "uplink_message_bytes": (bytes_per_round + 10) * len(log), "per_bit_accuracy": 1e-6}


def test_aggregate_reports_bits_to_target_with_not_reached_runs_and_equal_bits_controls():
    methods = [reference.Method("dense", "dense"), reference.Method("small", "ans:bits=4")]
    controls = [reference.Control("small", "dense", "q")]
    seeds = [0, 1, 2]
    results = {
        ("dense", 0): (_summary(0.1, [0.5, 0.8], 400), "ok"),
        ("dense", 1): (_summary(0.1, [0.6, 0.8], 400), "ok"),
        ("dense", 2): (_summary(0.1, [0.7, 0.8], 400), "ok"),
        ("small", 0): (_summary(0.1, [0.792, 0.795], 50), "ok"),
        ("small", 1): (_summary(0.1, [0.5, 0.6], 50), "ok"),  # never reaches 0.79
        ("small", 2): (None, "diverged"),
    }
    agg = reference.aggregate(methods, controls, seeds, results, target_drop=0.01, looser_drop=0.25)
    assert agg["target_accuracy"] == pytest.approx(0.79) and agg["looser_target_accuracy"] == pytest.approx(0.55)
    # looser target 0.55: dense seed 0 (0.5 at its first evaluation) needs 4 rounds, seeds 1 and 2 need 2
    assert agg["methods"][0]["bits_to_looser_target"]["mean"] == pytest.approx(8 * (1600 + 800 + 800) / 3)
    assert agg["methods"][1]["bits_to_looser_target"]["reached"] == 2
    dense, small = agg["methods"]
    # dense reaches 0.79 at its second evaluation, 4 rounds × 400 bytes, on every seed
    assert dense["bits_to_target"]["reached"] == 3 and dense["bits_to_target"]["mean"] == pytest.approx(8 * 1600)
    assert small["seeds_ok"] == [0, 1] and small["seeds_failed"] == {"2": "diverged"}
    assert small["bits_to_target"]["reached"] == 1 and small["bits_to_target"]["runs"] == 2
    assert small["bits_to_target"]["mean"] == pytest.approx(8 * 100)
    assert small["bits_to_target_over_dense"]["mean"] == pytest.approx(800 / 12800)
    assert small["delta_accuracy_vs_dense"]["n"] == 2
    assert small["delta_accuracy_vs_dense"]["mean"] == pytest.approx(((0.795 - 0.8) + (0.6 - 0.8)) / 2)
    c = agg["controls"][0]
    # equal bits = small's total (4 rounds × 50 bytes); dense at 1600 bits sits 1/4 of the way to its 1st evaluation
    assert c["equal_bits_budget_mean"] == pytest.approx(1600.0)
    assert c["accuracy_b_at_equal_bits"]["mean"] == pytest.approx(0.1 + (0.5 - 0.1) / 4 * 0.5 + (0.6 - 0.1) / 4 * 0.5)
    text = reference.table(agg, methods, reference.PRESETS["ci"], seeds)
    assert "not reached (1 of 2)" in text and "s2: diverged" in text and " ± " in text
    assert all(line.count("|") == text.splitlines()[2].count("|") for line in text.splitlines()[2:6])


@pytest.mark.slow
def test_ci_preset_runs_end_to_end_and_every_figure_has_an_interval(tmp_path):
    assert reference.main(["--preset", "ci", "--out", str(tmp_path)]) == 0
    agg = json.loads((tmp_path / "results.json").read_text())
    assert agg["seeds"] == [0, 1] and agg["config"]["preset"] == "ci"
    by_label = {r["label"]: r for r in agg["methods"]}
    assert set(by_label) == {"dense", "ans4"}
    for row in agg["methods"]:
        assert row["seeds_ok"] == [0, 1]
        for key in ("final_accuracy", "uplink_bits_per_entry", "per_bit_accuracy"):
            assert row[key]["n"] == 2 and row[key]["half_width"] is not None, (row["label"], key)
    assert by_label["dense"]["uplink_bits_per_entry"]["mean"] == 32.0
    assert by_label["ans4"]["uplink_bits_per_entry"]["mean"] < 8.0
    assert by_label["ans4"]["delta_accuracy_vs_dense"]["n"] == 2
    table = (tmp_path / "table.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith(("| dense: `", "| ans4: `"))]
    assert len(rows) == 2 and all(" ± " in ln for ln in rows)
    assert "### Equal-bits controls" in table
    for name in ("accuracy_vs_bits.png", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 5000
    # A second invocation reuses every run instead of simulating again.
    assert reference.main(["--preset", "ci", "--out", str(tmp_path), "--aggregate-only"]) == 0


def test_per_bit_correlation_detects_a_figure_that_only_ranks_bit_rates():
    # per-bit accuracy exactly proportional to 1 / bits, accuracy unrelated: correlation 1 with the rate
    figures = [{"per_bit_accuracy": 0.3 / b, "uplink_bits_per_entry": b, "final_accuracy": a}
               for b, a in [(32.0, 0.75), (16.0, 0.74), (2.0, 0.73), (0.5, 0.76)]]
    corr = reference.per_bit_correlation(figures)
    assert corr["runs"] == 4 and corr["with_inverse_bits_per_entry"] == pytest.approx(1.0)
    assert abs(corr["with_final_accuracy"]) < 0.99
    assert reference.per_bit_correlation(figures[:2])["with_inverse_bits_per_entry"] is None


def test_lgc_autoencoder_compares_the_last_rounds_errors_seed_by_seed():
    def lgc(rec: list[float], inn: list[float]) -> dict:
        return {"downlink_message_bytes": 1000, "codec_stats": {
            "reconstruction_error_by_round": {str(10 + i): v for i, v in enumerate(rec)},
            "innovation_only_error_by_round": {str(10 + i): v for i, v in enumerate(inn)},
            "lgc_encoder_bytes_shipped": 400, "lgc_stage3_first_round": 50}}
    summaries = {("lgc", 0): lgc([9.0, 0.2, 0.2], [9.0, 0.5, 0.5]), ("lgc", 1): lgc([0.3, 0.3], [0.5, 0.7]),
                 ("lgc", 2): lgc([0.25], [0.55])}
    out = reference.lgc_autoencoder(summaries, [0, 1, 2, 3], last=2)
    # per seed, the mean of the last 2 rounds: 0.2 vs 0.5, 0.3 vs 0.6, 0.25 vs 0.55 (seed 3 has no run)
    assert out["autoencoder_minus_innovation_only"]["n"] == 3
    assert out["autoencoder_minus_innovation_only"]["mean"] == pytest.approx(-0.3)
    assert out["verdict"] == "better (autoencoder lower error)"
    assert out["encoder_bytes_shipped"]["mean"] == 400 and out["stage3_first_round"] == [50, 50, 50]
    assert reference.lgc_autoencoder({}, [0]) is None
