"""Bandwidth-adaptive compression against fixed settings on heterogeneous links (issue 16, item 4).

    sudo flock /work/heavy.lock python -m experiments.adaptive --out docs/results/adaptive   # ~20 min, 2 cores
    python -m experiments.adaptive --quick --out /tmp/adaptive-quick        # ~2 min, any user (unshaped)

runs the reference task (Fashion-MNIST, LeNet-5, 3 workers; experiments/reference.py) for 150
rounds with a cosine learning-rate schedule (the rate decays to 0 by the last round, so the final
accuracy is not read off a steep part of the curve: less spread over seeds) and the model broadcast
compressed (``--downlink-codec ans:bits=6``, 2–4 bits per entry: the uplink then dominates a slow
link's round trip) with ``gradwire simulate --links 5mbit,20mbit,100mbit`` (network namespaces and
tbf, so root) for the adaptive wrapper and the fixed settings of its ladder that matter, each over
``--seeds``, one run at a time (parallel runs would share the CPU and the namespaces' addresses), and
writes to ``--out``:

    runs/<label>_s<seed>.json   each run's summary (reused by a rerun with the same command)
    results.json                per method and seed the figures below, and their intervals
    table.md                    the table the README quotes

**Round time** is what the codec controls: per round, the slowest worker's round trip as the PS
measured it (the model message handed to gRPC → the update's arrival; ``link_samples`` in the
summary: compute as the worker reports it, transfer the rest). The PS's own aggregation and test
evaluation are the same for every method and left out. Round 0 (after the Welcome, which also loads
the data) has no measurement. The first ``WARMUP`` measured rounds are the adaptive controller's
warm-up (it starts every worker at the cheapest level and climbs): the share of rounds within the
target is reported over all measured rounds and over the rounds after the warm-up, for every
method alike. Figures over seeds: mean ± 95 % Student-t interval (experiments/stats.py); the
adaptive run's final accuracy is compared with the best fixed setting (the highest mean final
accuracy) paired by seed.

**The target** (0.2 s) lies between the round trips of the fixed settings on the 5 Mbit/s link:
fp16 (124 kB up, about 0.24 s) and dense (0.45 s) miss it, `ans:bits=4` (about 10 kB up and
30 ms of encoding, 0.09 s) makes it; `ans:bits=8` is in between. The 20 and 100 Mbit/s links carry
dense within it.

Without root (or with ``--unshaped``) the links are not shaped: the machinery runs the same, but
every link is loopback, so the table says nothing about adaptation (the quick preset exists for
the test suite).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import stats
from experiments.runner import run_simulation

LINKS = "5mbit,20mbit,100mbit"
DOWNLINK = "ans:bits=6"
TARGET_S = 0.2
# Measured rounds counted as the controller's warm-up (it climbs the ladder one level per round into
# levels nobody has measured, so 4 rounds to dense, plus a few to settle).
WARMUP = 10
# A shaped run that fails (another user's simulation took the namespaces' subnet at the same
# moment, gradwire/netns.py) is run again.
RETRIES = 1
# Shaped runs take this subnet, clear of other simulations on the machine, which take the first free.
SUBNET = "169.254.97"
LADDER = "2,4,8,16,32"  # ans bit widths; 16 = fp16, 32 = dense


@dataclass(frozen=True)
class Method:
    label: str
    spec: str
    adaptive: bool = False


def methods(target: float) -> tuple[Method, ...]:
    return (
        Method("adaptive", f"adaptive:rates=({LADDER}),target={target:g},headroom=0.8", adaptive=True),
        Method("dense", "dense"),
        Method("fp16", "fp16"),
        Method("ans8", "ans:bits=8"),
        Method("ans4", "ans:bits=4"),
        Method("ans2", "ans:bits=2"),
    )


@dataclass(frozen=True)
class Preset:
    workers: int
    rounds: int
    eval_every: int
    seeds: tuple[int, ...]
    labels: tuple[str, ...]
    description: str
    lr_schedule: str = "cosine"


PRESETS = {
    "full": Preset(3, 150, 50, (0, 1, 2), ("adaptive", "dense", "fp16", "ans8", "ans4"),
                   "Fashion-MNIST, LeNet-5 (61,706 parameters), 3 workers × 150 rounds, batch 32, lr 0.05 "
                   "with a cosine schedule, PS momentum 0.9, downlink `ans:bits=6`"),
    "quick": Preset(2, 4, 4, (0,), ("adaptive", "dense"),
                    "Fashion-MNIST, LeNet-5, 2 workers × 4 rounds, 1 seed (quick: checks the machinery)"),
}


def can_shape() -> str:
    """Empty when shaped links are available here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    from gradwire.netns import why_unavailable

    return why_unavailable()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.adaptive", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 workers, 4 rounds, 1 seed, adaptive and dense only")
    p.add_argument("--out", default="runs/adaptive")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    p.add_argument("--target", type=float, default=TARGET_S, help="the adaptive codec's round-time target (seconds)")
    p.add_argument("--links", default=LINKS, help="per-rank link profiles (gradwire simulate --links)")
    p.add_argument("--downlink-codec", default=DOWNLINK, help="the PS's broadcast codec (gradwire simulate)")
    p.add_argument("--unshaped", action="store_true", help="do not shape the links (no root needed)")
    p.add_argument("--force", action="store_true", help="rerun runs whose summary exists")
    p.add_argument("--aggregate-only", action="store_true",
                   help="build the table from the summaries that exist; run nothing (missing runs are counted)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per-run time limit (seconds)")
    args = p.parse_args(argv)
    args.preset = PRESETS["quick" if args.quick else "full"]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()] or list(args.preset.seeds)
    args.methods = [m for m in methods(args.target) if m.label in args.preset.labels]
    why = "" if args.unshaped else can_shape()
    if why:
        print(f"[adaptive] links not shaped ({why}): every link is loopback", flush=True)
    args.shaped = not args.unshaped and not why
    return args


def command(method: Method, seed: int, args: argparse.Namespace, out: Path, log: Path) -> list[str]:
    pr = args.preset
    shaping = ["--links", args.links] if args.shaped else []
    return [sys.executable, "-m", "gradwire.cli", "simulate", "--workers", str(pr.workers), "--rounds", str(pr.rounds),
            "--eval-every", str(pr.eval_every), "--seed", str(seed), "--codec", method.spec,
            "--downlink-codec", args.downlink_codec, "--lr-schedule", pr.lr_schedule,
            "--dataset", "fashion-mnist", "--model", "lenet5", *shaping,
            "--json", str(out), "--log", str(log), "--quiet"]


def run_one(method: Method, seed: int, args: argparse.Namespace, run_dir: Path) -> dict | None:
    out, log = run_dir / f"{method.label}_s{seed}.json", run_dir / f"{method.label}_s{seed}.log"
    cmd = command(method, seed, args, out, log)
    stamp = " ".join(cmd[4:-5])
    if out.exists() and not args.force:
        summary = json.loads(out.read_text())
        if summary.get("experiment_command") == stamp:
            return summary
    if args.aggregate_only:
        return None
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    print(f"[adaptive] {method.label} seed {seed}: gradwire {stamp}", flush=True)
    for attempt in range(1 + RETRIES):
        status, tail = run_simulation(cmd, log, args.timeout_s)
        if status == "ok" and out.exists():
            break
        print(f"[adaptive] {method.label} seed {seed}: attempt {attempt + 1}: {status}: {' | '.join(tail)}", flush=True)
    if status != "ok" or not out.exists():
        print(f"[adaptive] {method.label} seed {seed}: {status}: {' | '.join(tail)}", flush=True)
        return None
    summary = json.loads(out.read_text())
    summary["experiment_command"] = stamp
    # Round times are wall clock: other work on the machine shows in them, so each run says how busy it was.
    summary["load_average_at_end"] = list(os.getloadavg())
    out.write_text(json.dumps(summary) + "\n")
    print(f"[adaptive] {method.label} seed {seed}: accuracy {summary['final_accuracy']:.4f}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return summary


# ---------------------------------------------------------------- figures of one run


def round_times(summary: dict) -> list[float]:
    """Per measured round, the slowest worker's round trip (compute + transfer), in round order."""
    by_round: dict[int, float] = {}
    for s in summary.get("link_samples", []):
        seconds = float(s["compute_seconds"]) + float(s["transfer_seconds"])
        by_round[int(s["round"])] = max(by_round.get(int(s["round"]), 0.0), seconds)
    return [by_round[r] for r in sorted(by_round)]


def level_switches(rounds: list[dict], after: int) -> dict[str, int]:
    """Per rank, how often the adaptive codec changed its rate between consecutive rounds after the
    first ``after`` rounds (an oscillating controller switches often)."""
    out: dict[str, int] = {}
    last: dict[str, float] = {}
    for r in sorted(rounds, key=lambda x: x["round"]):
        for rank, rate in r["rate"].items():
            if r["round"] > after and rank in last and last[rank] != rate:
                out[rank] = out.get(rank, 0) + 1
            out.setdefault(rank, 0)
            last[rank] = rate
    return dict(sorted(out.items()))


def run_figures(summary: dict, target: float) -> dict:
    times = np.asarray(round_times(summary))
    settled = times[WARMUP:]
    rounds = summary.get("codec_stats", {}).get("adaptive_rounds", [])
    rates: dict[str, list[float]] = {}
    for r in rounds:
        for rank, rate in r["rate"].items():
            rates.setdefault(rank, []).append(float(rate))
    return {
        "final_accuracy": summary["final_accuracy"],
        "measured_rounds": int(times.size),
        "within_target": float(np.mean(times <= target)) if times.size else None,
        "within_target_after_warmup": float(np.mean(settled <= target)) if settled.size else None,
        "rounds_over_target": int(np.sum(times > target)),
        "rounds_over_target_after_warmup": int(np.sum(settled > target)),
        "p95_round_s": float(np.percentile(times, 95)) if times.size else None,
        "mean_round_s": float(times.mean()) if times.size else None,
        "uplink_mb": summary["uplink_payload_bytes"] / 1e6,
        "uplink_bits_per_entry": summary["uplink_bits_per_entry"],
        "elapsed_s": summary["elapsed_s"],
        # the adaptive codec's choices: each rank's mean rate and its rate in the last round
        "mean_rate_by_rank": {k: float(np.mean(v)) for k, v in sorted(rates.items())},
        "last_rate_by_rank": {k: v[-1] for k, v in sorted(rates.items())},
        "switches_after_warmup_by_rank": level_switches(rounds, WARMUP),
        "load_average_at_end": summary.get("load_average_at_end"),
    }


# ---------------------------------------------------------------- over seeds


def aggregate(per_run: dict[tuple[str, int], dict], labels: list[str], seeds: list[int]) -> dict:
    out: dict = {}
    for label in labels:
        runs = [per_run.get((label, s)) for s in seeds]
        out[label] = {key: stats.t_ci([r[key] if r else None for r in runs]).as_dict()
                      for key in ("final_accuracy", "within_target", "within_target_after_warmup", "p95_round_s",
                                  "mean_round_s", "uplink_mb")}
        out[label]["runs"] = sum(r is not None for r in runs)
    fixed = [lb for lb in labels if lb != "adaptive" and out[lb]["final_accuracy"]["mean"] is not None]
    if "adaptive" in labels and fixed:
        best = max(fixed, key=lambda lb: out[lb]["final_accuracy"]["mean"])
        acc = {lb: [per_run[(lb, s)]["final_accuracy"] if (lb, s) in per_run else None for s in seeds]
               for lb in ("adaptive", best)}
        diff = stats.paired_ci(acc["adaptive"], acc[best])
        out["adaptive_vs_best_fixed"] = {"best_fixed": best, "accuracy_difference": diff.as_dict(),
                                         "within_1_point": diff.n > 0 and diff.mean >= -0.01,
                                         # the whole 95 % interval above -1 point: established, not just the mean
                                         "within_1_point_at_95": diff.n > 1 and math.isfinite(diff.low)
                                         and diff.low >= -0.01}
    return out


def table(agg: dict, args: argparse.Namespace, per_run: dict) -> str:
    pr = args.preset
    links = args.links if args.shaped else "unshaped (loopback)"
    lines = [
        f"{pr.description}; links {links}; round-time target {args.target:g} s; warm-up: the first {WARMUP} "
        f"measured rounds; seeds {', '.join(map(str, args.seed_list))}; mean ± 95 % CI over seeds.",
        "",
        "| method | codec | final accuracy | rounds within target (all) | after warm-up | rounds over target "
        "by seed (all, after warm-up) | p95 round (s) | mean round (s) | uplink MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in args.methods:
        a = agg[m.label]
        over = "; ".join(f"{r['rounds_over_target']}/{r['measured_rounds']}, "
                         f"{r['rounds_over_target_after_warmup']}/{max(0, r['measured_rounds'] - WARMUP)}"
                         for r in (per_run.get((m.label, s)) for s in args.seed_list) if r is not None)
        lines.append(
            f"| {m.label} | `{m.spec}` | {stats.fmt_interval(stats.Interval(**_iv(a['final_accuracy'])))} | "
            f"{stats.fmt_interval(stats.Interval(**_iv(a['within_target'])), '.0%')} | "
            f"{stats.fmt_interval(stats.Interval(**_iv(a['within_target_after_warmup'])), '.0%')} | {over} | "
            f"{stats.fmt_interval(stats.Interval(**_iv(a['p95_round_s'])), '.3f')} | "
            f"{stats.fmt_interval(stats.Interval(**_iv(a['mean_round_s'])), '.3f')} | "
            f"{stats.fmt_interval(stats.Interval(**_iv(a['uplink_mb'])), '.2f')} |")
    cmp_ = agg.get("adaptive_vs_best_fixed")
    if cmp_:
        d = stats.Interval(**_iv(cmp_["accuracy_difference"]))
        bounds = (f"; 95 % interval [{d.low:+.4f}, {d.high:+.4f}]" if d.n > 1 and math.isfinite(d.half_width)
                  else "")
        per_seed = ", ".join(
            f"{per_run[('adaptive', s)]['final_accuracy'] - per_run[(cmp_['best_fixed'], s)]['final_accuracy']:+.4f}"
            for s in args.seed_list if ("adaptive", s) in per_run and (cmp_["best_fixed"], s) in per_run)
        more_accurate = "adaptive more accurate" if d.mean > 0 else f"{cmp_['best_fixed']} more accurate"
        lines += ["", f"Adaptive − best fixed (`{cmp_['best_fixed']}`) final accuracy, paired by seed: "
                      f"{stats.fmt_interval(d, '.4f', signed=True)}{bounds}; per seed {per_seed} (mean "
                      f"{'within' if cmp_['within_1_point'] else 'NOT within'} 1 point; the whole interval "
                      f"{'is' if cmp_.get('within_1_point_at_95') else 'is not'} above −1 point; "
                      f"{stats.verdict(d, what=more_accurate)})."]
    loads = [r["load_average_at_end"][0] for r in per_run.values() if r.get("load_average_at_end")]
    if loads:
        lines += ["", f"Load average (1 min) at the end of each run: {min(loads):.2f}–{max(loads):.2f} "
                      f"(median {np.median(loads):.2f}, {len(loads)} runs)."]
    chosen = [per_run[("adaptive", s)] for s in args.seed_list if ("adaptive", s) in per_run]
    if chosen:
        ranks = sorted(chosen[0]["mean_rate_by_rank"])
        shown = ", ".join(f"rank {r}: {np.mean([c['mean_rate_by_rank'][r] for c in chosen]):.1f}" for r in ranks)
        switches = "; ".join(", ".join(f"{n}" for n in c.get("switches_after_warmup_by_rank", {}).values())
                             for c in chosen)
        lines += ["", f"Adaptive's mean chosen bit width per worker (ranks are assigned by join order; "
                      f"32 = dense): {shown}. Rate changes after the warm-up, per seed (ranks 0, 1, …): "
                      f"{switches}."]
    return "\n".join(lines) + "\n"


def _iv(d: dict) -> dict:
    nan = float("nan")
    return {"mean": nan if d["mean"] is None else d["mean"],
            "half_width": nan if d["half_width"] is None else d["half_width"], "n": d["n"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.shaped:  # inherited by every simulation (gradwire/netns.py)
        os.environ.setdefault("GRADWIRE_SIM_SUBNET", SUBNET)
    out = Path(args.out)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    per_run: dict[tuple[str, int], dict] = {}
    for m in args.methods:  # method-major: an interrupted run still has every seed of the first ones
        for seed in args.seed_list:
            summary = run_one(m, seed, args, run_dir)
            if summary is not None:
                per_run[(m.label, seed)] = run_figures(summary, args.target)
    labels = [m.label for m in args.methods]
    agg = aggregate(per_run, labels, args.seed_list)
    result = {
        "preset": args.preset.description, "links": args.links if args.shaped else "", "shaped": args.shaped,
        "target_s": args.target, "seeds": args.seed_list,
        "methods": {m.label: m.spec for m in args.methods},
        "per_run": {f"{lb}_s{s}": v for (lb, s), v in sorted(per_run.items())},
        "aggregate": agg,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(agg, args, per_run)
    (out / "table.md").write_text(text)
    print(text, flush=True)
    return 0 if len(per_run) == len(labels) * len(args.seed_list) else 1


if __name__ == "__main__":
    sys.exit(main())
