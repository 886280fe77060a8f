"""The reference workload: every compared codec on Fashion-MNIST over 5 seeds, with 95 % intervals.

    nice -n 15 python -m experiments.reference --out docs/results/reference            # ~1 h on 2 cores
    python -m experiments.reference --preset ci --out /tmp/ref-ci                      # < 1 min

runs each method of the preset for every seed (``gradwire simulate`` as a subprocess, at most
``--jobs`` at a time, methods in priority order so an interrupted run still has every seed of the
first methods) and writes to ``--out``:

    runs/<label>_s<seed>.json  each run's summary (reused by a rerun unless --force; --aggregate-only
                               rebuilds the tables from them without running anything)
    results.json               per method and seed the figures below, and their intervals
    table.md                   the headline table and the equal-bits controls
    accuracy_vs_bits.png       small multiples: accuracy against cumulative uplink bits, mean ± 95 % CI
                               band over seeds, dense in grey in every panel, the target as a line
    pareto.png                 final accuracy against total uplink bits (the frontier drawn), and bits
                               to the target with their intervals

Figures (all over seeds, mean ± 95 % Student-t CI; paired CIs for differences with the same seed):

- **target** = mean final accuracy of dense − 1 point (``--target-drop``); one target for every method;
- **bits to target**: cumulative uplink payload bits of all workers, side information included, at the
  first evaluation reaching the target; runs that never reach it are counted as "not reached (k of n)";
- **bits to the looser target** (dense − 3 points, ``--looser-target-drop``): dense's own final accuracy
  spreads over a few points across seeds, so some dense runs miss the 1-point target; the looser one
  separates the codecs' speed from that spread;
- **wire bytes to target**: the same point counted in serialized protobuf bytes (what gRPC frames);
- **final accuracy** and its paired difference from dense;
- **accuracy at equal bits** (the controls): for a pair A, B and a seed, both runs' accuracy at the
  smaller of their two total uplink bit counts, interpolated linearly in bits between evaluations;
- **per-bit accuracy** (secondary): the summary's max_t (Acc(t) − Acc(0)) / B(t). It peaks at the first
  evaluations, where B(t) is small, so it mostly ranks bit rates (≈ 1 / bits per entry), not accuracy
  per bit at the end of training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments import stats
from experiments.runner import run_simulation


@dataclass(frozen=True)
class Method:
    label: str
    spec: str
    flags: tuple[str, ...] = ()
    note: str = ""

    @property
    def shown(self) -> str:
        return f"`{self.spec}`" + (f" `{' '.join(self.flags)}`" if self.flags else "")


@dataclass(frozen=True)
class Control:
    """An equal-bits comparison: ``a`` against ``b``, which differ in one thing only (``question``)."""

    a: str
    b: str
    question: str


# TPC's defaults, spelled out so its controls share them: relative trigger eps=0.7, at most one skipped
# round in a row (max_stale=2), fp16 residual, no error feedback, 2 digest bytes.
TPC_TRIGGER = "trigger=relative,eps=0.7,max_stale=2,check=2,ef=0"

REFERENCE_METHODS: tuple[Method, ...] = (
    Method("dense", "dense", note="float32, the reference"),
    Method("tpc", "tpc", note="defaults: order 3, fp16 residual, relative trigger"),
    Method("fp16", "fp16", note="TPC's residual codec alone: no prediction, no skipped rounds"),
    Method("lag_tpc", f"lag:{TPC_TRIGGER},residual=fp16",
           note="LAG (prediction = last reconstruction) with TPC's trigger, residual and error feedback"),
    Method("ans4", "ans:bits=4"),
    Method("tpc_ans4", f"tpc:{TPC_TRIGGER},residual=(ans:bits=4)", note="TPC with ans:bits=4 as residual"),
    Method("qsgd16", "qsgd:levels=16"),
    Method("topk1_mc", "topk:ratio=0.01,momentum=0.9", note="DGC momentum at the workers; PS momentum 0 (auto)"),
    Method("m22_M2_R2", "m22:bits=2,M=2,dist=gennorm"),
    Method("m22_M0_R2", "m22:bits=2,M=0,dist=gennorm", note="M22's control: M = 0 (plain MSE) at the same rate"),
    Method("huffman4", "huffman:bits=4"),
    Method("lgc", "lgc"),
    # The A/A control: dense again with the same seeds. Same data order, shards and initialization; only
    # the run-to-run nondeterminism (the PS sums worker updates in arrival order, threads) differs. Its
    # paired difference from dense is the noise floor of every "paired by seed" comparison.
    Method("dense_repeat", "dense", note="dense again, same seeds: the A/A control"),
)
REFERENCE_CONTROLS: tuple[Control, ...] = (
    Control("tpc", "fp16", "does prediction (with the trigger) beat the same fp16 residual sent every round?"),
    Control("tpc", "lag_tpc", "does TPC's least-squares predictor beat LAG's last-reconstruction one, "
                              "same trigger, residual and error feedback?"),
    Control("tpc_ans4", "ans4", "does prediction help the ans:bits=4 quantizer (same residual codec)?"),
    Control("tpc", "ans4", "TPC's default against ans:bits=4 (confounded: different quantizer granularity)"),
    Control("m22_M2_R2", "m22_M0_R2", "does M22's M = 2 distortion beat plain MSE (M = 0) at R = 2?"),
    Control("huffman4", "ans4", "Huffman against ANS on the same 4-bit quantizer"),
    Control("qsgd16", "ans4", "QSGD (unbiased) against ans:bits=4 (biased)"),
    Control("dense_repeat", "dense", "A/A: the same dense run repeated (noise floor of a paired comparison)"),
    Control("fp16", "dense", "fp16 (relative error ~4e-8 per gradient) against dense"),
)

CI_METHODS: tuple[Method, ...] = (
    Method("dense", "dense", note="float32, the reference"),
    Method("ans4", "ans:bits=4"),
)
CI_CONTROLS: tuple[Control, ...] = (Control("ans4", "dense", "ans:bits=4 against dense"),)


@dataclass(frozen=True)
class Preset:
    workers: int
    rounds: int
    eval_every: int
    seeds: tuple[int, ...]
    simulate: tuple[str, ...]
    methods: tuple[Method, ...]
    controls: tuple[Control, ...]
    description: str
    extra: dict = field(default_factory=dict)


PRESETS = {
    # LeNet-5 (61,706 parameters) on the full 60,000 / 10,000 Fashion-MNIST split, 3 workers, 100 rounds
    # of 32-image mini-batches each, lr 0.05 with PS momentum 0.9 (the CLI defaults).
    "reference": Preset(3, 100, 10, (0, 1, 2, 3, 4), ("--dataset", "fashion-mnist", "--model", "lenet5"),
                        REFERENCE_METHODS, REFERENCE_CONTROLS,
                        "Fashion-MNIST, LeNet-5, 3 workers × 100 rounds, batch 32, evaluation every 10 rounds "
                        "on the 10,000 test images"),
    # Small enough for the test suite: the same data, a small MLP, 1 worker, 4 rounds, 2 seeds, 2 methods.
    "ci": Preset(1, 4, 2, (0, 1), ("--dataset", "fashion-mnist", "--model", "mlp"), CI_METHODS, CI_CONTROLS,
                 "Fashion-MNIST, MLP, 1 worker × 4 rounds (CI preset: checks the machinery, not the codecs)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    p.add_argument("--out", default="runs/reference")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    p.add_argument("--only", default="", help="comma-separated method labels (dense is always included)")
    p.add_argument("--jobs", type=int, default=2, help="simulations at a time")
    p.add_argument("--target-drop", type=float, default=0.01,
                   help="target accuracy = dense's mean final accuracy minus this")
    p.add_argument("--looser-target-drop", type=float, default=0.03,
                   help="a second, looser target (dense's mean final accuracy minus this); negative: none")
    p.add_argument("--force", action="store_true", help="rerun runs whose summary exists")
    p.add_argument("--aggregate-only", action="store_true", help="build the tables from existing summaries")
    p.add_argument("--timeout-s", type=float, default=1200.0, help="per-run time limit (seconds)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()] or list(preset.seeds)
    methods = list(preset.methods)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()} | {"dense"}
        unknown = wanted - {m.label for m in methods}
        if unknown:
            p.error(f"unknown method(s) {', '.join(sorted(unknown))}; known: {', '.join(m.label for m in methods)}")
        methods = [m for m in methods if m.label in wanted]
    args.methods = methods
    labels = {m.label for m in methods}
    args.controls = [c for c in preset.controls if c.a in labels and c.b in labels]
    return args


# ---------------------------------------------------------------- running


def command(method: Method, seed: int, preset: Preset, out: Path, log: Path) -> list[str]:
    return [sys.executable, "-m", "gradwire.cli", "simulate", "--workers", str(preset.workers),
            "--rounds", str(preset.rounds), "--eval-every", str(preset.eval_every), "--seed", str(seed),
            "--codec", method.spec, *method.flags, *preset.simulate, "--json", str(out), "--log", str(log),
            "--quiet"]


def run_one(method: Method, seed: int, preset: Preset, run_dir: Path, args: argparse.Namespace) -> tuple[dict | None, str]:
    out = run_dir / f"{method.label}_s{seed}.json"
    log = run_dir / f"{method.label}_s{seed}.log"
    cmd = command(method, seed, preset, out, log)
    stamp = " ".join(cmd[4:-5])  # what defines the run, not where it writes
    if out.exists() and not args.force:
        summary = json.loads(out.read_text())
        if summary.get("reference_command") == stamp:
            return summary, "ok"
    if args.aggregate_only:
        return None, "not run"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    print(f"[reference] {method.label} seed {seed}: gradwire {stamp}", flush=True)
    status, tail = run_simulation(cmd, log, args.timeout_s)
    if status != "ok" or not out.exists():
        print(f"[reference] {method.label} seed {seed}: {status}: {' | '.join(tail)}", flush=True)
        return None, status if status != "ok" else "no summary"
    summary = json.loads(out.read_text())
    summary["reference_command"] = stamp
    # The per-worker logs are large and not needed again; the summary holds the rounds.
    out.write_text(json.dumps(summary) + "\n")
    print(f"[reference] {method.label} seed {seed}: accuracy {summary['final_accuracy']:.4f}, "
          f"{summary['uplink_bits_per_entry']:.3f} bits/entry, {time.perf_counter() - start:.0f} s", flush=True)
    return summary, "ok"


def run_all(args: argparse.Namespace, preset: Preset, run_dir: Path) -> dict[tuple[str, int], tuple[dict | None, str]]:
    jobs = [(m, s) for m in args.methods for s in args.seed_list]  # method-major: priority order
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = pool.map(lambda job: run_one(job[0], job[1], preset, run_dir, args), jobs)
        return {(m.label, s): result for (m, s), result in zip(jobs, done, strict=True)}


# ---------------------------------------------------------------- figures from one run


def curves(summary: dict) -> dict[str, list[tuple[float, float]]]:
    """(cumulative uplink payload bits | cumulative uplink protobuf bytes, test accuracy) at each evaluation,
    starting from the initial model's accuracy at 0."""
    bits, wire = 0.0, 0.0
    by_bits = [(0.0, float(summary["initial_accuracy"]))]
    by_wire = [(0.0, float(summary["initial_accuracy"]))]
    for entry in sorted(summary["rounds_log"], key=lambda e: e["round"]):
        bits += 8.0 * entry["uplink_payload_bytes"]
        wire += float(entry["uplink_message_bytes"])
        if entry.get("test_accuracy") is not None:
            by_bits.append((bits, float(entry["test_accuracy"])))
            by_wire.append((wire, float(entry["test_accuracy"])))
    return {"bits": by_bits, "wire_bytes": by_wire}


def run_figures(summary: dict, target: float, looser_target: float | None = None) -> dict:
    c = curves(summary)
    return {
        "bits_to_looser_target": (None if looser_target is None
                                  else stats.bits_to_target(c["bits"], looser_target)),
        "final_accuracy": float(summary["final_accuracy"]),
        "uplink_bits_per_entry": float(summary["uplink_bits_per_entry"]),
        "uplink_bits": 8.0 * float(summary["uplink_payload_bytes"]),
        "uplink_wire_bytes": float(summary["uplink_message_bytes"]),
        "downlink_bits_per_entry": summary.get("downlink_bits_per_entry"),
        "downlink_wire_bytes": summary.get("downlink_message_bytes"),
        "bits_to_target": stats.bits_to_target(c["bits"], target),
        "wire_bytes_to_target": stats.bits_to_target(c["wire_bytes"], target),
        "per_bit_accuracy": summary.get("per_bit_accuracy"),
        "trigger_rate": (summary.get("codec_stats") or {}).get("trigger_rate"),
        "elapsed_s": summary.get("elapsed_s"),
    }


# ---------------------------------------------------------------- aggregation


def aggregate(methods: Sequence[Method], controls: Sequence[Control], seeds: Sequence[int],
              results: dict[tuple[str, int], tuple[dict | None, str]], target_drop: float,
              looser_drop: float | None = None) -> dict:
    summaries = {k: s for k, (s, status) in results.items() if s is not None}
    dense_final = [summaries[("dense", s)]["final_accuracy"] for s in seeds if ("dense", s) in summaries]
    if not dense_final:
        raise SystemExit("no dense run finished: nothing to measure against")
    target = float(np.mean(dense_final)) - target_drop
    looser = None if looser_drop is None else float(np.mean(dense_final)) - looser_drop
    per_run = {k: run_figures(s, target, looser) for k, s in summaries.items()}

    def column(label: str, key: str) -> list[float | None]:
        return [per_run[(label, s)][key] if (label, s) in per_run else None for s in seeds]

    rows = []
    for m in methods:
        ok = [s for s in seeds if (m.label, s) in per_run]
        failed = {str(s): results.get((m.label, s), (None, "not run"))[1] for s in seeds if s not in ok}
        reach = stats.summarize_reach([per_run[(m.label, s)]["bits_to_target"] for s in ok])
        wire_reach = stats.summarize_reach([per_run[(m.label, s)]["wire_bytes_to_target"] for s in ok])
        dense_btt = column("dense", "bits_to_target")
        own_btt = column(m.label, "bits_to_target")
        ratio = [o / d if o is not None and d else None for o, d in zip(own_btt, dense_btt, strict=True)]
        rows.append({
            "label": m.label, "spec": m.spec, "flags": list(m.flags), "note": m.note,
            "seeds_ok": ok, "seeds_failed": failed,
            "final_accuracy": stats.t_ci([v for v in column(m.label, "final_accuracy") if v is not None]).as_dict(),
            "delta_accuracy_vs_dense": stats.paired_ci(column(m.label, "final_accuracy"),
                                                       column("dense", "final_accuracy")).as_dict(),
            "uplink_bits_per_entry": stats.t_ci([v for v in column(m.label, "uplink_bits_per_entry")
                                                 if v is not None]).as_dict(),
            "bits_to_target": reach.as_dict(),
            "bits_to_looser_target": stats.summarize_reach(
                [per_run[(m.label, s)]["bits_to_looser_target"] for s in ok]).as_dict(),
            "wire_bytes_to_target": wire_reach.as_dict(),
            "bits_to_target_over_dense": stats.t_ci([r for r in ratio if r is not None]).as_dict(),
            "per_bit_accuracy": stats.t_ci([v for v in column(m.label, "per_bit_accuracy") if v is not None]).as_dict(),
            "downlink_bits_per_entry": stats.t_ci([v for v in column(m.label, "downlink_bits_per_entry")
                                                   if v is not None]).as_dict(),
            "downlink_wire_bytes": stats.t_ci([v for v in column(m.label, "downlink_wire_bytes")
                                               if v is not None]).as_dict(),
            "trigger_rate": stats.t_ci([v for v in column(m.label, "trigger_rate") if v is not None]).as_dict(),
        })
    control_rows = [compare(c, seeds, summaries, per_run) for c in controls]
    return {"target_accuracy": target, "target_drop": target_drop, "dense_final_accuracy": dense_final,
            "looser_target_accuracy": looser, "looser_target_drop": looser_drop,
            "seeds": list(seeds), "methods": rows, "controls": control_rows,
            "per_bit_accuracy_correlation": per_bit_correlation(list(per_run.values())),
            "lgc_autoencoder": lgc_autoencoder(summaries, seeds) if any(m.label == "lgc" for m in methods) else None,
            "runs": {f"{label}_s{seed}": fig for (label, seed), fig in sorted(per_run.items())}}


def lgc_autoencoder(summaries: dict, seeds: Sequence[int], label: str = "lgc", last: int = 5) -> dict | None:
    """Does LGC's autoencoder beat innovation-only decoding, and what does shipping it cost downlink?

    Per seed, the PS's relative squared errors on stage-2 data (``reconstruction_error_by_round``: the
    autoencoder's; ``innovation_only_error_by_round``: passing the innovation through), averaged over the
    last ``last`` recorded rounds, and the encoder bytes the PS shipped to workers.
    """
    rec, inn, shipped, down, stage3 = [], [], [], [], []
    for s in seeds:
        summary = summaries.get((label, s))
        cs = (summary or {}).get("codec_stats") or {}
        r_series, i_series = cs.get("reconstruction_error_by_round"), cs.get("innovation_only_error_by_round")
        if not summary or not isinstance(r_series, dict) or not isinstance(i_series, dict):
            rec.append(None)
            inn.append(None)
            continue
        tail = sorted(set(r_series) & set(i_series), key=int)[-last:]
        rec.append(float(np.mean([r_series[k] for k in tail])) if tail else None)
        inn.append(float(np.mean([i_series[k] for k in tail])) if tail else None)
        shipped.append(float(cs.get("lgc_encoder_bytes_shipped") or 0.0))
        down.append(float(summary.get("downlink_message_bytes") or 0.0))
        stage3.append(cs.get("lgc_stage3_first_round"))
    if not any(v is not None for v in rec):
        return None
    diff = stats.paired_ci(rec, inn)
    return {
        "reconstruction_error": stats.t_ci([v for v in rec if v is not None]).as_dict(),
        "innovation_only_error": stats.t_ci([v for v in inn if v is not None]).as_dict(),
        "autoencoder_minus_innovation_only": diff.as_dict(),
        "verdict": stats.verdict(diff, better_if_positive=False,
                                 what="autoencoder lower error" if diff.mean < 0 else "innovation-only lower error"),
        "encoder_bytes_shipped": stats.t_ci(shipped).as_dict(),
        "downlink_wire_bytes": stats.t_ci(down).as_dict(),
        "stage3_first_round": stage3,
    }


def per_bit_correlation(figures: Sequence[dict]) -> dict:
    """Pearson correlation, over runs, of per-bit accuracy with 1 / bits per entry and with final accuracy.

    The first near 1 and the second near 0 or below says the figure ranks bit rates, not what the bits bought.
    """
    rows = [f for f in figures if f["per_bit_accuracy"] is not None and f["uplink_bits_per_entry"] > 0]
    if len(rows) < 3:
        return {"runs": len(rows), "with_inverse_bits_per_entry": None, "with_final_accuracy": None}
    pba = np.array([f["per_bit_accuracy"] for f in rows])
    inv = np.array([1.0 / f["uplink_bits_per_entry"] for f in rows])
    acc = np.array([f["final_accuracy"] for f in rows])

    def corr(a: np.ndarray, b: np.ndarray) -> float | None:
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None

    return {"runs": len(rows), "with_inverse_bits_per_entry": corr(pba, inv), "with_final_accuracy": corr(pba, acc)}


def compare(c: Control, seeds: Sequence[int], summaries: dict, per_run: dict) -> dict:
    """Paired comparison of two methods at equal bits, seed by seed."""
    acc_a, acc_b, budgets = [], [], []
    for s in seeds:
        if (c.a, s) not in summaries or (c.b, s) not in summaries:
            acc_a.append(None)
            acc_b.append(None)
            continue
        ca, cb = curves(summaries[(c.a, s)])["bits"], curves(summaries[(c.b, s)])["bits"]
        budget = min(ca[-1][0], cb[-1][0])
        budgets.append(budget)
        acc_a.append(stats.accuracy_at_bits(ca, budget))
        acc_b.append(stats.accuracy_at_bits(cb, budget))
    at_equal = stats.paired_ci(acc_a, acc_b)

    def col(label: str, key: str) -> list:
        return [per_run[(label, s)][key] if (label, s) in per_run else None for s in seeds]

    final = stats.paired_ci(col(c.a, "final_accuracy"), col(c.b, "final_accuracy"))
    bits = stats.paired_ci(col(c.a, "uplink_bits_per_entry"), col(c.b, "uplink_bits_per_entry"))
    btt_a, btt_b = col(c.a, "bits_to_target"), col(c.b, "bits_to_target")
    log_ratio = stats.paired_ci([math.log(v) if v else None for v in btt_a], [math.log(v) if v else None for v in btt_b])
    return {
        "a": c.a, "b": c.b, "question": c.question,
        "equal_bits_budget_mean": float(np.mean(budgets)) if budgets else None,
        "accuracy_a_at_equal_bits": stats.t_ci([v for v in acc_a if v is not None]).as_dict(),
        "accuracy_b_at_equal_bits": stats.t_ci([v for v in acc_b if v is not None]).as_dict(),
        "accuracy_at_equal_bits_a_minus_b": at_equal.as_dict(),
        "final_accuracy_a_minus_b": final.as_dict(),
        "bits_per_entry_a_minus_b": bits.as_dict(),
        "log_bits_to_target_a_minus_b": log_ratio.as_dict(),
        "reached_a": sum(v is not None for v in btt_a), "reached_b": sum(v is not None for v in btt_b),
        "verdict_at_equal_bits": stats.verdict(at_equal, True, f"{c.a} more accurate" if at_equal.mean > 0
                                               else f"{c.b} more accurate"),
    }


# ---------------------------------------------------------------- table


def _iv(d: dict) -> stats.Interval:
    nan = float("nan")
    return stats.Interval(d["mean"] if d["mean"] is not None else nan,
                          d["half_width"] if d["half_width"] is not None else nan, d["n"])


def _reach(d: dict) -> stats.Reach:
    return stats.Reach(_iv(d), d["reached"], d["runs"])


def table(agg: dict, methods: Sequence[Method], preset: Preset, seeds: Sequence[int]) -> str:
    by_label = {r["label"]: r for r in agg["methods"]}
    lines = [
        f"{preset.description}; seeds {', '.join(map(str, seeds))}. Every figure is the mean over seeds ± the "
        f"half-width of its 95 % Student-t confidence interval; differences are paired by seed. Target accuracy "
        f"= dense's mean final accuracy − {100 * agg['target_drop']:g} point = **{agg['target_accuracy']:.4f}**"
        + ("." if agg.get("looser_target_accuracy") is None else
           f"; looser target (− {100 * agg['looser_target_drop']:g} points) = {agg['looser_target_accuracy']:.4f}."),
        "",
        "| method: codec | runs | final accuracy | Δ vs dense (paired) | uplink bits/entry | uplink Mbit to target "
        "| uplink wire MB to target | bits to target / dense's | uplink Mbit to looser target "
        "| downlink wire MB (whole run) | per-bit acc. (/Mbit, secondary) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        r = by_label[m.label]
        runs = f"{len(r['seeds_ok'])}/{len(seeds)}"
        if r["seeds_failed"]:
            runs += " (" + ", ".join(f"s{s}: {why}" for s, why in r["seeds_failed"].items()) + ")"
        lines.append(" | ".join([
            f"| {m.label}: {m.shown}", runs,
            stats.fmt_interval(_iv(r["final_accuracy"])),
            "–" if m.label == "dense" else stats.fmt_interval(_iv(r["delta_accuracy_vs_dense"]), ".4f", signed=True),
            stats.fmt_interval(_iv(r["uplink_bits_per_entry"]), ".3f"),
            stats.fmt_reach(_reach(r["bits_to_target"]), ".3g", 1e-6),
            stats.fmt_reach(_reach(r["wire_bytes_to_target"]), ".3g", 1e-6),
            "–" if m.label == "dense" else stats.fmt_interval(_iv(r["bits_to_target_over_dense"]), ".3f"),
            "–" if agg.get("looser_target_accuracy") is None
            else stats.fmt_reach(_reach(r["bits_to_looser_target"]), ".3g", 1e-6),
            stats.fmt_interval(_iv(r["downlink_wire_bytes"]), ".1f", 1e-6),
            stats.fmt_interval(_iv(r["per_bit_accuracy"]), ".3g", 1e6),
        ]) + " |")
    lines += [
        "",
        "Bits to target: cumulative uplink payload bits of all workers (side information included) at the first "
        "evaluation reaching the target; the mean and interval are over the runs that reached it, and runs that "
        "did not are counted as not reached. Wire MB: the same point in serialized protobuf bytes. Bits to target "
        "/ dense's: per seed, over the seeds where both reached it. Per-bit accuracy = max_t (Acc(t) − Acc(0)) / "
        "B(t), per Mbit: it peaks at the first evaluations, so it mostly ranks bit rates (≈ 1/bits per entry), not "
        "the accuracy a bit buys by the end of training; it is shown for continuity only.",
    ]
    corr = agg.get("per_bit_accuracy_correlation") or {}
    if corr.get("with_inverse_bits_per_entry") is not None:
        acc_corr = corr.get("with_final_accuracy")
        lines[-1] += (f" Over these {corr['runs']} runs its Pearson correlation with 1 / (bits per entry) is "
                      f"{corr['with_inverse_bits_per_entry']:.3f}"
                      + ("" if acc_corr is None else f", with final accuracy {acc_corr:.3f}") + ".")
    if agg["controls"]:
        lines += [
            "", "### Equal-bits controls", "",
            "Per seed, both runs' test accuracy at the smaller of their two total uplink bit counts (linear in bits "
            "between evaluations), then the paired 95 % CI of A − B. \"no difference\" when it spans 0.", "",
            "| A | B | question | mean budget (Mbit) | acc. A at equal bits | acc. B at equal bits | A − B (paired) "
            "| verdict | bits/entry A − B | final acc. A − B | bits to target A/B (geo. mean) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in agg["controls"]:
            lr = _iv(c["log_bits_to_target_a_minus_b"])
            ratio = "–" if lr.n == 0 else (
                f"{math.exp(lr.mean):.3f}" + ("" if lr.n < 2 else f" [{math.exp(lr.low):.3f}, {math.exp(lr.high):.3f}]")
                + f" (n={lr.n})")
            budget = c["equal_bits_budget_mean"]
            lines.append(" | ".join([
                f"| {c['a']}", c["b"], c["question"], "–" if budget is None else f"{budget / 1e6:.3g}",
                stats.fmt_interval(_iv(c["accuracy_a_at_equal_bits"])),
                stats.fmt_interval(_iv(c["accuracy_b_at_equal_bits"])),
                stats.fmt_interval(_iv(c["accuracy_at_equal_bits_a_minus_b"]), ".4f", signed=True),
                c["verdict_at_equal_bits"],
                stats.fmt_interval(_iv(c["bits_per_entry_a_minus_b"]), ".3f", signed=True),
                stats.fmt_interval(_iv(c["final_accuracy_a_minus_b"]), ".4f", signed=True),
                ratio,
            ]) + " |")
    lgc = agg.get("lgc_autoencoder")
    if lgc:
        lines += [
            "", "### LGC: autoencoder against innovation-only decoding", "",
            "Relative squared error on stage-2 data (PS side), mean of the last 5 recorded rounds per seed: "
            f"autoencoder {stats.fmt_interval(_iv(lgc['reconstruction_error']))}, innovation only "
            f"{stats.fmt_interval(_iv(lgc['innovation_only_error']))}, paired difference "
            f"{stats.fmt_interval(_iv(lgc['autoencoder_minus_innovation_only']), '.4f', signed=True)}: "
            f"**{lgc['verdict']}**. Encoder bytes shipped downlink per run: "
            f"{stats.fmt_interval(_iv(lgc['encoder_bytes_shipped']), '.4g')}; downlink wire bytes per run "
            f"{stats.fmt_interval(_iv(lgc['downlink_wire_bytes']), '.4g')}. Stage 3 from round "
            f"{', '.join(str(r) for r in lgc['stage3_first_round'])}.",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _band(summaries: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean cumulative bits, mean accuracy and CI half-width at each evaluation index, over seeds."""
    cs = [curves(s)["bits"] for s in summaries]
    if not cs:
        return None
    n = min(len(c) for c in cs)
    bits = np.array([[c[i][0] for c in cs] for i in range(n)])
    acc = np.array([[c[i][1] for c in cs] for i in range(n)])
    hw = np.array([stats.t_ci(a).half_width for a in acc])
    return bits.mean(axis=1), acc.mean(axis=1), np.nan_to_num(hw)


def plot_small_multiples(agg: dict, methods: Sequence[Method], summaries: dict, seeds: Sequence[int],
                         path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    others = [m for m in methods if m.label != "dense"]
    cols = min(4, max(1, len(others)))
    rows = max(1, math.ceil(len(others) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), sharex=True, sharey=True, squeeze=False)
    dense = _band([summaries[("dense", s)] for s in seeds if ("dense", s) in summaries])
    for ax, m in zip(axes.flat, others, strict=False):
        if dense is not None:
            ax.plot(dense[0][1:], dense[1][1:], color="0.45", lw=1.2, label="dense")
            ax.fill_between(dense[0][1:], dense[1][1:] - dense[2][1:], dense[1][1:] + dense[2][1:], color="0.8")
        band = _band([summaries[(m.label, s)] for s in seeds if (m.label, s) in summaries])
        if band is not None:
            x, y, hw = band[0][1:], band[1][1:], band[2][1:]
            ax.plot(x, y, color="tab:blue", lw=1.6, marker="o", ms=2.5, label=m.label)
            ax.fill_between(x, y - hw, y + hw, color="tab:blue", alpha=0.25)
        ax.axhline(agg["target_accuracy"], color="tab:red", ls=":", lw=1)
        n_ok = sum((m.label, s) in summaries for s in seeds)
        spec = m.spec if len(m.spec) <= 44 else m.spec[:43] + "…"
        ax.set_title(f"{m.label} (n={n_ok})\n{spec}", fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        ax.set_ylim(0.0, 1.0)  # accuracy; a 2-seed band can reach past it
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(others):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("cumulative uplink bits (all workers)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy", fontsize=8)
    fig.suptitle(f"{title}\nmean ± 95 % CI over seeds; grey: dense; red dotted: target {agg['target_accuracy']:.3f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both fewer bits and higher accuracy, by increasing bits."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(agg: dict, methods: Sequence[Method], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in agg["methods"] if r["final_accuracy"]["n"] > 0]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2))
    pts = [(r["uplink_bits_per_entry"]["mean"], r["final_accuracy"]["mean"]) for r in rows]
    for r, (x, y) in zip(rows, pts, strict=True):
        hw = r["final_accuracy"]["half_width"] or 0.0
        ax.errorbar([x], [y], yerr=[[hw], [hw]], fmt="o", ms=4, capsize=3,
                    color="black" if r["label"] == "dense" else "tab:blue")
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:green", lw=1, ls="--",
            label="frontier (of the means)")
    ax.axhline(agg["target_accuracy"], color="tab:red", ls=":", lw=1, label="target")
    ax.set_xscale("log")
    ax.set_xlabel("uplink bits per entry (side information included)")
    ax.set_ylabel("final test accuracy (mean ± 95 % CI)")
    ax.set_ylim(max(0.0, ax.get_ylim()[0]), min(1.0, ax.get_ylim()[1]))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    labels, means, errs, colors = [], [], [], []
    for r in rows:
        reach = r["bits_to_target"]
        labels.append(f"{r['label']} ({reach['reached']}/{reach['runs']} reached)")
        means.append(reach["mean"] if reach["mean"] is not None else np.nan)
        errs.append(reach["half_width"] or 0.0)
        colors.append("0.6" if reach["reached"] < reach["runs"] else "tab:blue")
    y = np.arange(len(labels))
    bx.barh(y, means, xerr=errs, color=colors, capsize=3)
    bx.set_yticks(y, labels, fontsize=7)
    bx.invert_yaxis()
    bx.set_xscale("log")
    bx.set_xlabel("uplink bits to the target (mean ± 95 % CI, runs that reached it)")
    bx.grid(True, which="both", axis="x", alpha=0.3)
    fig.suptitle(f"{title}; grey bars: some runs never reached the target", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    out = Path(args.out)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_all(args, preset, run_dir)
    wall = time.perf_counter() - start
    summaries = {k: s for k, (s, _status) in results.items() if s is not None}
    agg = aggregate(args.methods, args.controls, args.seed_list, results, args.target_drop,
                    args.looser_target_drop if args.looser_target_drop >= 0 else None)
    agg["config"] = {"preset": args.preset, "workers": preset.workers, "rounds": preset.rounds,
                     "eval_every": preset.eval_every, "simulate": list(preset.simulate),
                     "methods": {m.label: {"spec": m.spec, "flags": list(m.flags)} for m in args.methods},
                     "wall_s_this_invocation": wall}
    (out / "results.json").write_text(json.dumps(agg, indent=1) + "\n")
    text = table(agg, args.methods, preset, args.seed_list)
    (out / "table.md").write_text(text)
    plot_small_multiples(agg, args.methods, summaries, args.seed_list, out / "accuracy_vs_bits.png",
                         preset.description)
    plot_pareto(agg, args.methods, out / "pareto.png", preset.description)
    print(text)
    failed = [f"{label} s{seed}: {status}" for (label, seed), (s, status) in results.items() if s is None]
    print(f"[reference] {len(summaries)}/{len(results)} runs in {wall:.0f} s; wrote {out}/table.md, results.json, "
          f"accuracy_vs_bits.png, pareto.png", flush=True)
    if failed:
        print(f"[reference] missing: {', '.join(failed)}", flush=True)
    return 0 if not any(status not in ("ok", "diverged", "not run") for _s, status in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
