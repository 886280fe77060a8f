"""Time to accuracy on shaped links: codecs × link speeds on the reference workload.

    sudo nice -n 5 python -m experiments.links --out docs/results/links      # ~30 min on 2 loaded cores
    python -m experiments.links --quick --out /tmp/links-quick               # smoke test, a few minutes

runs ``gradwire simulate`` (one run at a time, so runs do not share the CPU with each other) for every
cell: a method (codec up, codec down, worker options) on a link (``--link``: 10 Mbit/s and 100 Mbit/s
both ways, each worker in a network namespace of its own, or unshaped loopback), for its seeds. It
writes to ``--out``:

    runs/<link>_<label>_s<seed>.json   each run's summary (reused by a rerun unless --force)
    results.json                       every figure below, per run and per cell
    table.md                           the table
    accuracy_vs_time.png               accuracy against training seconds, one panel per link

Figures (mean over seeds ± 95 % Student-t CI, experiments/stats.py):

- **training seconds**: the PS's wall clock from the start of round 0, without its evaluations and
  the workers' start-up (server/timing.py); the time axis of every figure here;
- **target** = the mean final accuracy of dense (every dense run, every link: the link does not
  change the arithmetic) − 1 point; a looser target − 3 points, because dense itself reaches the
  1-point target late and not on every seed;
- **time to target**: training seconds at the first evaluation reaching it; runs that never do are
  counted as "not reached (k of n)";
- **speed-up vs dense on the same link**: dense's time to target / the method's, per seed where both
  reached it (geometric mean and its 95 % interval from the paired log ratios); an interval that
  contains 1 is reported as "no difference";
- **per-round split**: median over rounds 1..R−2 of the round the PS waited for: compute, encode
  (worker + PS downlink), transfer (the worker's wait minus the PS's hold: the bytes on the wire both
  ways), decode (PS decode + aggregation + worker downlink decode), in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from experiments import stats
from experiments.reference import PRESETS, Method
from experiments.runner import run_simulation

LINKS = ("10mbit", "100mbit", "unshaped")
DOWN = ("--downlink-codec", "ans:bits=6")  # ~4.2 bits/entry deltas; the digits table found it as accurate as dense

METHODS = {
    "dense": Method("dense", "dense", note="float32 both ways"),
    "fp16": Method("fp16", "fp16", ("--downlink-codec", "fp16"), note="fp16 both ways"),
    "ans4": Method("ans4", "ans:bits=4", DOWN, note="4-bit ANS up, 6-bit ANS deltas down"),
    "ans4_densedown": Method("ans4_densedown", "ans:bits=4", note="4-bit ANS up, float32 models down"),
    "qsgd16": Method("qsgd16", "qsgd:levels=16", DOWN, note="QSGD up, 6-bit ANS deltas down"),
    # A few ms of codec CPU per LeNet-5 update each way (no model fit, unlike ans), and as accurate per round as
    # dense on the reference workload; 512-entry buckets keep the downlink's variance low (a whole-tensor norm
    # on the deltas diverged).
    "qsgd16_q512": Method("qsgd16_q512", "qsgd:levels=16", ("--downlink-codec", "qsgd:levels=16,bucket=512"),
                          note="QSGD up, QSGD deltas down (512-entry buckets)"),
    "tpc": Method("tpc", "tpc", ("--downlink-codec", "fp16"), note="TPC up, fp16 deltas down"),
    "topk1_mc": Method("topk1_mc", "topk:ratio=0.01,momentum=0.9", DOWN, note="top-1 % with DGC momentum"),
    "dense_stale": Method("dense_stale", "dense", ("--stale-updates",), note="dense, one-round-stale updates"),
    "ans4_stale": Method("ans4_stale", "ans:bits=4", (*DOWN, "--stale-updates"),
                         note="ans4 with one-round-stale updates"),
}


@dataclass(frozen=True)
class Cell:
    link: str
    method: Method
    seeds: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.link}/{self.method.label}"


def full_plan() -> list[Cell]:
    """Headline codecs with 3 seeds on 10 Mbit/s; fewer elsewhere (the run time on 2 loaded cores allows no
    more: a 100-round run takes 2–5 minutes there, much of it the processes' start and the evaluations)."""
    m = METHODS
    return [
        *(Cell("10mbit", m[k], (0, 1, 2)) for k in ("dense", "fp16", "ans4", "qsgd16_q512")),
        Cell("10mbit", m["dense_stale"], (0, 1, 2)),
        *(Cell(link, m[k], (0,)) for link in ("unshaped", "100mbit") for k in ("dense", "ans4")),
        *(Cell("10mbit", m[k], (0,)) for k in ("qsgd16", "ans4_stale", "ans4_densedown")),
    ]


# The order the full plan runs in, so that a run stopped early has what matters: seed 0 of the 10 Mbit/s
# headline cells and the overlap row, the unshaped reference, then the other seeds, then the rest.
FULL_ORDER = (
    ("10mbit/dense", 0), ("10mbit/qsgd16_q512", 0), ("10mbit/ans4", 0), ("10mbit/fp16", 0),
    ("10mbit/dense_stale", 0), ("unshaped/dense", 0), ("unshaped/ans4", 0),
    ("10mbit/dense", 1), ("10mbit/qsgd16_q512", 1), ("10mbit/ans4", 1), ("10mbit/fp16", 1),
    ("100mbit/dense", 0), ("100mbit/ans4", 0),
    ("10mbit/dense", 2), ("10mbit/qsgd16_q512", 2), ("10mbit/ans4", 2), ("10mbit/fp16", 2),
    ("10mbit/dense_stale", 1), ("10mbit/dense_stale", 2),
    ("10mbit/qsgd16", 0), ("10mbit/ans4_stale", 0), ("10mbit/ans4_densedown", 0),
)


def quick_plan() -> list[Cell]:
    return [Cell(link, METHODS[k], (0,)) for link in ("unshaped", "10mbit") for k in ("dense", "ans4")]


# The smoke test's workload: the embedded digits task (nothing to read from disk), 1 worker × 4 rounds.
QUICK = replace(PRESETS["ci"], simulate=("--dataset", "digits", "--model", "mlp"),
                description="digits, MLP, 1 worker × 4 rounds (--quick: checks the machinery, not the codecs)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.links", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/links")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: digits MLP, 1 worker × 4 rounds, dense and ans4, unshaped and 10 Mbit/s")
    p.add_argument("--links", default="", help=f"comma-separated subset of {', '.join(LINKS)}")
    p.add_argument("--only", default="", help="comma-separated method labels (dense is always included), "
                   f"of {', '.join(METHODS)}")
    p.add_argument("--force", action="store_true", help="rerun runs whose summary exists")
    p.add_argument("--aggregate-only", action="store_true", help="build the table from existing summaries")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per-run time limit (seconds)")
    args = p.parse_args(argv)
    args.preset = QUICK if args.quick else PRESETS["reference"]
    plan = quick_plan() if args.quick else full_plan()
    if args.links:
        wanted = {x.strip() for x in args.links.split(",") if x.strip()}
        unknown = wanted - set(LINKS)
        if unknown:
            p.error(f"unknown link(s) {', '.join(sorted(unknown))}; known: {', '.join(LINKS)}")
        plan = [c for c in plan if c.link in wanted]
    if args.only:
        labels = {x.strip() for x in args.only.split(",") if x.strip()} | {"dense"}
        unknown = labels - set(METHODS)
        if unknown:
            p.error(f"unknown method(s) {', '.join(sorted(unknown))}; known: {', '.join(METHODS)}")
        plan = [c for c in plan if c.method.label in labels]
    args.plan = plan
    return args


def why_no_shaping() -> str:
    from gradwire.netns import why_unavailable

    return why_unavailable()


# ---------------------------------------------------------------- running


def command(cell: Cell, seed: int, preset, out: Path, log: Path) -> list[str]:
    link = [] if cell.link == "unshaped" else ["--link", cell.link]
    return [sys.executable, "-m", "gradwire.cli", "simulate", "--workers", str(preset.workers),
            "--rounds", str(preset.rounds), "--eval-every", str(preset.eval_every), "--seed", str(seed),
            "--codec", cell.method.spec, *cell.method.flags, *preset.simulate, *link,
            "--json", str(out), "--log", str(log), "--quiet"]


def run_one(cell: Cell, seed: int, args: argparse.Namespace, run_dir: Path) -> tuple[dict | None, str]:
    name = f"{cell.link}_{cell.method.label}_s{seed}"
    out, log = run_dir / f"{name}.json", run_dir / f"{name}.log"
    cmd = command(cell, seed, args.preset, out, log)
    stamp = " ".join(cmd[4:-5])
    if out.exists() and not args.force:
        summary = json.loads(out.read_text())
        if summary.get("links_command") == stamp:
            return summary, "ok"
    if args.aggregate_only:
        return None, "not run"
    if cell.link != "unshaped" and why_no_shaping():
        return None, f"skipped: {why_no_shaping()}"
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    print(f"[links] {name}: gradwire {stamp} (load average {load_start[0]:.2f})", flush=True)
    status, tail = run_simulation(cmd, log, args.timeout_s)
    if status.startswith("exit") or (status == "ok" and not out.exists()):
        # On a machine shared with other jobs a run can fail to start (a worker that cannot reach the PS
        # within its connect timeout): try once more, and say so.
        print(f"[links] {name}: {status}: {' | '.join(tail)}; running it once more", flush=True)
        out.unlink(missing_ok=True)
        status, tail = run_simulation(cmd, log, args.timeout_s)
    if status != "ok" or not out.exists():
        print(f"[links] {name}: {status}: {' | '.join(tail)}", flush=True)
        return None, status if status != "ok" else "no summary"
    summary = json.loads(out.read_text())
    summary["links_command"] = stamp
    # The machine's load around the run (1, 5, 15 min): the wall clock means little on a busy machine.
    summary["links_load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
    out.write_text(json.dumps(summary) + "\n")
    log.unlink(missing_ok=True)  # the summary holds the rounds; the processes' log is large
    log.with_suffix(".out").unlink(missing_ok=True)
    train = summary["accuracy_vs_training_seconds"][-1][0]
    print(f"[links] {name}: accuracy {summary['final_accuracy']:.4f}, {train:.1f} s of training, "
          f"{time.perf_counter() - started:.0f} s in all", flush=True)
    return summary, "ok"


def run_all(args: argparse.Namespace, run_dir: Path) -> dict[tuple[str, int], tuple[dict | None, str]]:
    """In FULL_ORDER, else seed-major in plan order: an interrupted run has what matters first."""
    order = {job: i for i, job in enumerate(FULL_ORDER)}
    jobs = sorted(((c, s) for c in args.plan for s in c.seeds),
                  key=lambda job: (order.get((job[0].key, job[1]), len(order)), job[1], args.plan.index(job[0])))
    return {(c.key, s): run_one(c, s, args, run_dir) for c, s in jobs}


# ---------------------------------------------------------------- figures


def time_curve(summary: dict) -> list[tuple[float, float]]:
    return [(float(t), float(a)) for t, a in summary["accuracy_vs_training_seconds"]]


def round_split(summary: dict) -> dict[str, float | None]:
    """Median milliseconds per round of each part, over the rounds with every part known except round 0
    (the workers' start) and the last (its transfer is never reported)."""
    rows = [e["timing"] for e in summary["rounds_log"][1:-1] if e.get("timing")]
    out = {}
    for key in ("wall_s", "compute_s", "encode_s", "transfer_s", "decode_s", "other_s",
                "worker_encode_s", "ps_encode_s", "ps_decode_s", "aggregate_s", "worker_decode_s"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key.replace("_s", "_ms")] = 1000.0 * float(np.median(vals)) if vals else None
    return out


def run_figures(summary: dict, target: float, looser: float) -> dict:
    curve = time_curve(summary)
    return {
        "final_accuracy": float(summary["final_accuracy"]),
        "training_s": curve[-1][0],
        "seconds_per_round": curve[-1][0] / max(1, summary["rounds"]),
        "time_to_target_s": stats.bits_to_target(curve, target),
        "time_to_looser_target_s": stats.bits_to_target(curve, looser),
        "uplink_bits_per_entry": summary.get("uplink_bits_per_entry"),
        "downlink_bits_per_entry": summary.get("downlink_bits_per_entry"),
        "split_ms": round_split(summary),
        "wall_clock": summary.get("wall_clock"),
        "load_average": summary.get("links_load_average"),
    }


def ratio_ci(dense: Sequence[float | None], own: Sequence[float | None]) -> dict:
    """dense / own per seed (both present): geometric mean and 95 % interval of the ratio, and a verdict."""
    logs = stats.paired_ci([math.log(d) if d else None for d in dense], [math.log(o) if o else None for o in own])
    if logs.n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "verdict": "–"}
    low, high = (math.exp(logs.low), math.exp(logs.high)) if math.isfinite(logs.half_width) else (None, None)
    if logs.n < 2:
        verdict = "one seed: no interval"
    elif logs.spans_zero():
        verdict = "no difference"
    else:
        verdict = "faster" if logs.mean > 0 else "slower"
    return {"mean": math.exp(logs.mean), "low": low, "high": high, "n": logs.n, "verdict": verdict}


def aggregate(plan: Sequence[Cell], results: dict, target_drop: float = 0.01, looser_drop: float = 0.03) -> dict:
    summaries = {k: s for k, (s, _st) in results.items() if s is not None}
    dense_final = [s["final_accuracy"] for (key, _seed), s in summaries.items() if key.endswith("/dense")]
    if not dense_final:
        raise SystemExit("no dense run finished: nothing to measure against")
    dense_mean = float(np.mean(dense_final))
    target, looser = dense_mean - target_drop, dense_mean - looser_drop
    per_run = {k: run_figures(s, target, looser) for k, s in summaries.items()}

    def col(key: str, seeds: Sequence[int], figure: str) -> list:
        return [per_run[(key, s)][figure] if (key, s) in per_run else None for s in seeds]

    rows = []
    for c in plan:
        ok = [s for s in c.seeds if (c.key, s) in per_run]
        dense_key = f"{c.link}/dense"
        row = {
            "link": c.link, "label": c.method.label, "spec": c.method.spec, "flags": list(c.method.flags),
            "note": c.method.note, "seeds": list(c.seeds), "seeds_ok": ok,
            "seeds_failed": {str(s): results.get((c.key, s), (None, "not run"))[1] for s in c.seeds if s not in ok},
            "final_accuracy": stats.t_ci(col(c.key, ok, "final_accuracy")).as_dict(),
            "seconds_per_round": stats.t_ci(col(c.key, ok, "seconds_per_round")).as_dict(),
            "training_s": stats.t_ci(col(c.key, ok, "training_s")).as_dict(),
            "time_to_target_s": stats.summarize_reach(col(c.key, ok, "time_to_target_s")).as_dict(),
            "time_to_looser_target_s": stats.summarize_reach(col(c.key, ok, "time_to_looser_target_s")).as_dict(),
            "speedup_vs_dense": ratio_ci(col(dense_key, c.seeds, "time_to_target_s"),
                                         col(c.key, c.seeds, "time_to_target_s")),
            "speedup_vs_dense_looser": ratio_ci(col(dense_key, c.seeds, "time_to_looser_target_s"),
                                                col(c.key, c.seeds, "time_to_looser_target_s")),
            "round_speedup_vs_dense": ratio_ci(col(dense_key, c.seeds, "seconds_per_round"),
                                               col(c.key, c.seeds, "seconds_per_round")),
            "split_ms": {k: stats.t_ci([v for v in (per_run[(c.key, s)]["split_ms"][k] for s in ok)
                                        if v is not None]).as_dict()
                         for k in (per_run[(c.key, ok[0])]["split_ms"] if ok else {})},
            "uplink_bits_per_entry": stats.t_ci(col(c.key, ok, "uplink_bits_per_entry")).as_dict(),
            "downlink_bits_per_entry": stats.t_ci(col(c.key, ok, "downlink_bits_per_entry")).as_dict(),
        }
        rows.append(row)
    return {"target_accuracy": target, "looser_target_accuracy": looser, "target_drop": target_drop,
            "looser_target_drop": looser_drop, "dense_final_accuracy": dense_final, "cells": rows,
            "runs": {f"{k}_s{s}": fig for (k, s), fig in sorted(per_run.items())}}


# ---------------------------------------------------------------- table and plot


def _iv(d: dict) -> stats.Interval:
    nan = float("nan")
    return stats.Interval(d["mean"] if d["mean"] is not None else nan,
                          d["half_width"] if d["half_width"] is not None else nan, d["n"])


def _reach(d: dict) -> str:
    return stats.fmt_reach(stats.Reach(_iv(d), d["reached"], d["runs"]), ".1f")


def _ratio(d: dict) -> str:
    if d["n"] == 0:
        return "–"
    if d["low"] is None:
        return f"{d['mean']:.2f}× (n=1)"
    return f"{d['mean']:.2f}× [{d['low']:.2f}, {d['high']:.2f}] ({d['verdict']})"


def table(agg: dict, preset, plan: Sequence[Cell]) -> str:
    lines = [
        f"{preset.description}. One run at a time; each worker's link shaped both ways (`gradwire simulate "
        f"--link`, a network namespace per worker) or unshaped loopback. Time = training seconds: the PS's wall "
        f"clock without its evaluations and the workers' start-up. Mean over seeds ± 95 % CI. Target = dense's mean "
        f"final accuracy − {100 * agg['target_drop']:g} point = **{agg['target_accuracy']:.4f}**; looser target "
        f"(− {100 * agg['looser_target_drop']:g} points) = {agg['looser_target_accuracy']:.4f}. Speed-up = dense's "
        "time / the method's on the same link, per seed, geometric mean [95 % CI]; an interval containing 1 is "
        "\"no difference\".",
        "",
        "| link | method: codec up / options | runs | final accuracy | s per round | s to target | speed-up to target "
        "| s to looser target | speed-up to looser target | speed-up per round | ms per round: compute / encode / "
        "transfer / decode / other | bits/entry up / down |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["link"], r["label"]): r for r in agg["cells"]}
    for c in plan:
        r = by_key[(c.link, c.method.label)]
        runs = f"{len(r['seeds_ok'])}/{len(r['seeds'])}"
        if r["seeds_failed"]:
            runs += " (" + ", ".join(f"s{s}: {why}" for s, why in r["seeds_failed"].items()) + ")"
        sp = r["split_ms"]

        def ms(key: str, sp: dict = sp) -> str:
            d = sp.get(key)
            return "–" if not d or d["mean"] is None else f"{d['mean']:.0f}"

        is_dense = c.method.label == "dense"
        lines.append(" | ".join([
            f"| {c.link}", f"{c.method.label}: {c.method.shown}", runs,
            stats.fmt_interval(_iv(r["final_accuracy"])),
            stats.fmt_interval(_iv(r["seconds_per_round"]), ".3f"),
            _reach(r["time_to_target_s"]), "–" if is_dense else _ratio(r["speedup_vs_dense"]),
            _reach(r["time_to_looser_target_s"]), "–" if is_dense else _ratio(r["speedup_vs_dense_looser"]),
            "–" if is_dense else _ratio(r["round_speedup_vs_dense"]),
            " / ".join(ms(k) for k in ("compute_ms", "encode_ms", "transfer_ms", "decode_ms", "other_ms")),
            f"{_iv(r['uplink_bits_per_entry']).mean:.2f} / {_iv(r['downlink_bits_per_entry']).mean:.2f}"
            if r["uplink_bits_per_entry"]["n"] else "–",
        ]) + " |")
    lines += [
        "",
        "ms per round: the median over rounds 1..R−2 of the round the PS waited for (its last update), mean over "
        "seeds. compute: the worker's local training; encode: the worker's encode + the PS's downlink encode; "
        "transfer: the worker's wait for the answer minus the time the PS held its update (bytes on the wire both "
        "ways, and serialization); decode: PS decode + aggregation + the worker's downlink decode; other: what no "
        "clock attributed (negative when compute overlaps the transfer, with stale updates). Evaluation is "
        "excluded. Runs that never reached a target are counted as not reached (k of n), never dropped.",
    ]
    loads = [v for fig in agg["runs"].values() if fig.get("load_average")
             for v in (fig["load_average"]["start"][0], fig["load_average"]["end"][0])]
    if loads:
        lines += ["", f"Machine load: the 1-minute load average at the start and end of each of the "
                  f"{len(loads) // 2} runs above was {min(loads):.2f}–{max(loads):.2f} (median "
                  f"{float(np.median(loads)):.2f}) on {os.cpu_count()} cores."]
    return "\n".join(lines) + "\n"


def plot(agg: dict, summaries: dict, plan: Sequence[Cell], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = [link for link in LINKS if any(c.link == link for c in plan)]
    fig, axes = plt.subplots(1, len(links), figsize=(5.2 * len(links), 4.4), squeeze=False)
    labels = sorted({c.method.label for c in plan}, key=list(METHODS).index)
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    for ax, link in zip(axes[0], links, strict=True):
        for c in (c for c in plan if c.link == link):
            curves = [time_curve(summaries[(c.key, s)]) for s in c.seeds if (c.key, s) in summaries]
            if not curves:
                continue
            n = min(len(cv) for cv in curves)
            t = np.array([[cv[i][0] for i in range(n)] for cv in curves]).mean(axis=0)
            acc = np.array([[cv[i][1] for i in range(n)] for cv in curves])
            mean = acc.mean(axis=0)
            style = "--" if c.method.label.endswith("_stale") else "-"
            ax.plot(t, mean, style, color="0.2" if c.method.label == "dense" else colors[c.method.label],
                    lw=1.6, marker="o", ms=2.5, label=f"{c.method.label} (n={len(curves)})")
            if len(curves) > 1:
                hw = [stats.t_ci(list(acc[:, i])).half_width for i in range(n)]
                ax.fill_between(t, mean - np.array(hw), mean + np.array(hw), alpha=0.15,
                                color="0.2" if c.method.label == "dense" else colors[c.method.label])
        ax.axhline(agg["target_accuracy"], color="tab:red", ls=":", lw=1)
        ax.set_title(f"link: {link}", fontsize=9)
        ax.set_xlabel("training seconds (wall clock, evaluations excluded)", fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("test accuracy (mean over seeds, 95 % CI band)", fontsize=8)
    fig.suptitle(f"{title}\nred dotted: target {agg['target_accuracy']:.3f} (dense's final − 1 point)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    shaping = why_no_shaping()
    if shaping and any(c.link != "unshaped" for c in args.plan):
        print(f"[links] shaped links skipped: {shaping}", flush=True)
    started = time.perf_counter()
    results = run_all(args, run_dir)
    wall = time.perf_counter() - started
    summaries = {k: s for k, (s, _st) in results.items() if s is not None}
    ran = [c for c in args.plan if any((c.key, s) in summaries for s in c.seeds)]
    agg = aggregate(ran, results)
    agg["config"] = {"quick": args.quick, "workers": args.preset.workers, "rounds": args.preset.rounds,
                     "eval_every": args.preset.eval_every, "simulate": list(args.preset.simulate),
                     "plan": [{"link": c.link, "label": c.method.label, "spec": c.method.spec,
                               "flags": list(c.method.flags), "seeds": list(c.seeds)} for c in args.plan],
                     "shaping_unavailable": shaping or None, "wall_s_this_invocation": wall,
                     "load_average_at_end": list(os.getloadavg())}
    agg["skipped"] = {f"{k}_s{s}": st for (k, s), (summ, st) in results.items() if summ is None}
    (out / "results.json").write_text(json.dumps(agg, indent=1) + "\n")
    text = table(agg, args.preset, ran)
    (out / "table.md").write_text(text)
    plot(agg, summaries, ran, out / "accuracy_vs_time.png", args.preset.description)
    print(text)
    print(f"[links] {len(summaries)}/{len(results)} runs in {wall:.0f} s; wrote {out}/table.md, results.json, "
          f"accuracy_vs_time.png", flush=True)
    bad = [st for st in agg["skipped"].values() if not st.startswith(("skipped", "not run"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
