"""M22 sweep: M × R × model family on one task, one ``gradwire simulate`` run each.

    python -m experiments.m22_sweep --rounds 60 --workers 2 --out runs/m22

runs a dense baseline with the same seed and then ``m22:bits=R,M=M,dist=D`` for every
M in ``--Ms`` (default 0,2,4), R in ``--bits`` (1,2,3) and D in ``--dists``
(gennorm,dweibull), each as a subprocess ``python -m gradwire.cli simulate ... --json``.
It writes to ``--out``:

    runs/<label>.json      each run's summary (kept: a rerun skips finished runs
                           unless ``--force``); runs/<label>.log the processes' logs
    results.json / .csv    one row per run (accuracy, bits per entry, per-bit accuracy,
                           codec statistics)
    results.md             the same as a markdown table
    accuracy_vs_bits.png   test accuracy against cumulative uplink bits (all workers)

Per-bit accuracy is the run summary's ``per_bit_accuracy``: max_t (Acc(t) − Acc(0)) / B(t)
with B(t) the cumulative uplink payload bits of all workers (docs/algorithms.md §4).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

from experiments.runner import run_simulation
from gradwire.counters import LinkCounters

DEFAULT_MS = "0,2,4"
DEFAULT_BITS = "1,2,3"
DEFAULT_DISTS = "gennorm,dweibull"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.m22_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/m22")
    p.add_argument("--Ms", default=DEFAULT_MS, help="comma-separated distortion exponents M")
    p.add_argument("--bits", default=DEFAULT_BITS, help="comma-separated rates R (2^R cells)")
    p.add_argument("--dists", default=DEFAULT_DISTS, help="comma-separated model families")
    p.add_argument("--options", default="", help="extra m22 options appended to every spec, e.g. rescale=ls,coder=huffman")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline run")
    p.add_argument("--force", action="store_true", help="rerun configurations whose summary already exists")
    p.add_argument("--retries", type=int, default=1, help="reruns of a failed simulation")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-run time limit (seconds)")
    p.add_argument("--plot-only", action="store_true", help="aggregate existing summaries without running")
    p.add_argument("simulate_args", nargs=argparse.REMAINDER,
                   help="after '--': extra arguments for gradwire simulate (e.g. -- --dataset mnist)")
    args = p.parse_args(argv)
    if args.simulate_args and args.simulate_args[0] == "--":
        args.simulate_args = args.simulate_args[1:]
    return args


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _fmt_num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def configurations(args: argparse.Namespace) -> list[dict]:
    """The runs of the sweep, dense first: label, codec spec and the swept values."""
    runs = [] if args.no_dense else [{"label": "dense", "spec": "dense", "dist": "dense", "M": None, "R": 32}]
    extra = f",{args.options}" if args.options else ""
    for dist in [d.strip() for d in args.dists.split(",") if d.strip()]:
        for M in _floats(args.Ms):
            for R in [int(b) for b in _floats(args.bits)]:
                runs.append({
                    "label": f"{dist}_M{_fmt_num(M)}_R{R}",
                    "spec": f"m22:bits={R},M={_fmt_num(M)},dist={dist}{extra}",
                    "dist": dist,
                    "M": M,
                    "R": R,
                })
    return runs


def _summary_matches(path: Path, run: dict, args: argparse.Namespace) -> bool:
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    cfg = s.get("config")
    if isinstance(cfg, str):  # some summaries store the config as its repr
        ok = f"'codec': '{run['spec']}'" in cfg
    else:
        ok = isinstance(cfg, dict) and cfg.get("codec") == run["spec"]
    return ok and s.get("rounds") == args.rounds and s.get("workers") == args.workers and s.get("seed") == args.seed


def run_one(run: dict, args: argparse.Namespace, run_dir: Path) -> dict | None:
    """Run (or reuse) one simulation; returns its summary or None when it failed."""
    out = run_dir / f"{run['label']}.json"
    log = run_dir / f"{run['label']}.log"
    failed = run_dir / f"{run['label']}.failed"
    if failed.exists() and (args.plot_only or not args.force):
        # a diverged run can still leave a partial summary: never reuse it as a result
        run["failure"] = failed.read_text().strip()
        if args.plot_only:
            return None
    elif not args.force and out.exists() and _summary_matches(out, run, args):
        print(f"[m22-sweep] {run['label']}: reusing {out}", flush=True)
        return json.loads(out.read_text())
    if args.plot_only:
        return None
    failed.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "gradwire.cli", "simulate",
        "--workers", str(args.workers), "--rounds", str(args.rounds), "--seed", str(args.seed),
        "--codec", run["spec"], "--json", str(out), "--log", str(log), "--quiet",
        *args.simulate_args,
    ]
    for attempt in range(1 + max(args.retries, 0)):
        out.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        start = time.perf_counter()
        print(f"[m22-sweep] {run['label']}: {' '.join(cmd[2:])}", flush=True)
        status, tail = run_simulation(cmd, log, args.timeout_s)
        wall = time.perf_counter() - start
        if status == "ok" and out.exists():
            summary = json.loads(out.read_text())
            summary.setdefault("sweep_wall_s", wall)
            print(f"[m22-sweep] {run['label']}: accuracy {summary['final_accuracy']:.4f}, "
                  f"{summary['uplink_bits_per_entry']:.3f} bits/entry, {wall:.0f} s", flush=True)
            return summary
        print(f"[m22-sweep] {run['label']}: attempt {attempt + 1}: {status} after {wall:.0f} s: "
              f"{' | '.join(t.strip() for t in tail)}", flush=True)
        run["failure"] = status
        failed.write_text(status + "\n")
        if status == "diverged":  # deterministic: a retry would diverge again
            break
    return None


# ---------------------------------------------------------------- aggregation

STAT_COLUMNS = ("index_bits_per_entry", "side_bits_per_entry", "empirical_entropy_bits", "mean_shape",
                "small_tensor_fraction", "mean_rescale_factor", "relative_sq_error")


def make_rows(runs: list[dict], summaries: dict[str, dict]) -> list[dict]:
    dense = summaries.get("dense")
    dense_acc = dense["final_accuracy"] if dense else None
    rows = []
    for run in runs:
        s = summaries.get(run["label"])
        row = {"label": run["label"], "spec": run["spec"], "dist": run["dist"], "M": run["M"], "R": run["R"],
               "status": "ok" if s else run.get("failure", "failed")}
        if s:
            stats = s.get("codec_stats") or {}
            evals = [a for _, a in s.get("accuracy_vs_uplink_bits") or [] if a is not None]
            row.update({
                "final_accuracy": s["final_accuracy"],
                "last3_mean_accuracy": sum(evals[-3:]) / len(evals[-3:]) if evals else None,
                "delta_vs_dense": (s["final_accuracy"] - dense_acc) if dense_acc is not None else None,
                "uplink_bits_per_entry": s["uplink_bits_per_entry"],
                "per_bit_accuracy": s.get("per_bit_accuracy"),
                **LinkCounters.from_dict(s).to_dict(),
                "elapsed_s": s.get("elapsed_s"),
            })
            for key in STAT_COLUMNS:
                row[key] = stats.get(key)
        rows.append(row)
    return rows


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"M22 sweep on the default task: {args.workers} workers × {args.rounds} rounds, seed {args.seed}"
            + (f", simulate args {' '.join(args.simulate_args)}" if args.simulate_args else "") + "\n\n")
    cols = [("codec", "spec"), ("final acc.", "final_accuracy"), ("Δ vs dense", "delta_vs_dense"),
            ("mean of last 3 evals", "last3_mean_accuracy"),
            ("uplink bits/entry", "uplink_bits_per_entry"), ("index bits/entry", "index_bits_per_entry"),
            ("side bits/entry", "side_bits_per_entry"), ("per-bit acc. (/Mbit)", "per_bit_accuracy_mbit"),
            ("mean shape", "mean_shape"), ("rel. sq. error", "relative_sq_error")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        r = dict(row)
        pba = r.get("per_bit_accuracy")
        r["per_bit_accuracy_mbit"] = pba * 1e6 if isinstance(pba, (int, float)) else None
        if r["status"] != "ok":
            r["final_accuracy"] = r["status"]
        lines.append("| " + " | ".join(_cell(r.get(k)) for _, k in cols) + " |")
    note = ("\nper-bit accuracy = max_t (Acc(t) − Acc(0)) / B(t), B(t) the cumulative uplink payload bits of "
            "all workers, shown per megabit; bits/entry include all side information. The test accuracy of one "
            "run moves by several points between evaluations, so the mean of the last three evaluations is "
            "shown beside the final one.\n")
    return head + "\n".join(lines) + "\n" + note


def write_tables(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown_table(rows, args))


def plot(runs: list[dict], summaries: dict[str, dict], path: Path, args: argparse.Namespace) -> None:
    from gradwire.extras import require

    require("matplotlib", "plotting")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = [d for d in dict.fromkeys(r["dist"] for r in runs) if d != "dense"]
    Ms = sorted({r["M"] for r in runs if r["M"] is not None})
    Rs = sorted({r["R"] for r in runs if r["dist"] != "dense"})
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    colors = {M: palette[i % len(palette)] for i, M in enumerate(Ms)}
    styles = {R: ["-", "--", ":", "-."][i % 4] for i, R in enumerate(Rs)}
    markers = {R: ["o", "s", "^", "D"][i % 4] for i, R in enumerate(Rs)}
    fig, axes = plt.subplots(1, len(dists) + 1, figsize=(6.2 * (len(dists) + 1), 5.6))
    fig.subplots_adjust(left=0.05, right=0.99, top=0.88, bottom=0.14, wspace=0.22)
    dense = summaries.get("dense")

    def curve(s):
        pts = [(b, a) for b, a in s.get("accuracy_vs_uplink_bits") or [] if b > 0 and a is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    for ax, dist in zip(axes, dists, strict=False):
        if dense:
            x, y = curve(dense)
            ax.plot(x, y, color="black", ls="--", lw=1.5, label="dense fp32")
        for run in runs:
            s = summaries.get(run["label"])
            if run["dist"] != dist or not s:
                continue
            x, y = curve(s)
            ax.plot(x, y, color=colors[run["M"]], ls=styles[run["R"]], marker=markers[run["R"]], ms=3.5, lw=1.4,
                    label=f"M={_fmt_num(run['M'])}, R={run['R']}")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bits (all workers, side information included)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"m22, dist={dist}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, ncol=1, loc="lower right")

    ax = axes[-1]
    for run in runs:
        s = summaries.get(run["label"])
        if not s:
            continue
        if run["dist"] == "dense":
            ax.axhline(s["final_accuracy"], color="black", ls="--", lw=1.2,
                       label=f"dense ({s['uplink_bits_per_entry']:.0f} bits/entry)")
            continue
        marker = "o" if run["dist"] == dists[0] else "s"
        ax.scatter(s["uplink_bits_per_entry"], s["final_accuracy"], color=colors[run["M"]], marker=marker, s=42,
                   edgecolors="black", linewidths=0.5)
        ax.annotate(f"R{run['R']}", (s["uplink_bits_per_entry"], s["final_accuracy"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    for M in Ms:
        ax.scatter([], [], color=colors[M], label=f"M={_fmt_num(M)}")
    for i, dist in enumerate(dists):
        ax.scatter([], [], color="white", edgecolors="black", marker="o" if i == 0 else "s", label=dist)
    ax.set_xlabel("uplink bits per entry")
    ax.set_ylabel("final test accuracy")
    ax.set_title("final accuracy vs rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"M22 sweep: {args.workers} workers × {args.rounds} rounds, seed {args.seed}", fontsize=12)
    note = f"m22 options: {args.options or 'defaults (rescale=norm, coder=ans, ef=1, gamma=0.7)'}"
    if "rescale=none" not in args.options and 1 in Rs:
        note += (".  R=1 is a sign quantizer whose rescaled level depends neither on M nor on the family: "
                 "those runs coincide.")
    failures = [f"{r['label']} ({r['failure']})" for r in runs if r.get("failure") and r["label"] not in summaries]
    if failures:
        note += ("" if note.endswith(".") else ".") + "  Not plotted: " + ", ".join(failures) + "."
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8.5, color="0.25")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    runs = configurations(args)
    summaries: dict[str, dict] = {}
    start = time.perf_counter()
    for run in runs:
        s = run_one(run, args, run_dir)
        if s is not None:
            summaries[run["label"]] = s
    rows = make_rows(runs, summaries)
    write_tables(rows, out, args)
    plot(runs, summaries, out / "accuracy_vs_bits.png", args)
    print(markdown_table(rows, args))
    failed = [r["label"] for r in rows if r["status"] != "ok"]
    print(f"[m22-sweep] {len(runs) - len(failed)}/{len(runs)} runs, {time.perf_counter() - start:.0f} s; "
          f"wrote {out}/results.md, results.csv, results.json, accuracy_vs_bits.png", flush=True)
    if failed:
        print(f"[m22-sweep] failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
