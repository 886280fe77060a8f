"""The README's results table from runs: every codec on one task, one ``gradwire simulate`` each.

    python -m experiments.codec_table --workers 2 --rounds 60 --seeds 0,1,2 --out docs/results/codec_table

runs each row of ``ROWS`` (a codec spec plus, where a row needs them, extra simulate flags such as
``--momentum 0 --lr 0.5``) for every seed, with dense first, and writes to ``--out``:

    runs/<label>_s<seed>.json   each run's summary (a rerun reuses matching summaries unless --force)
    results.json                one row per run
    table.md                    per row: accuracy per seed and its mean, the change against dense with
                                the same seed, uplink bits per entry (side information included),
                                protobuf / payload bytes, per-bit accuracy
    accuracy_vs_bits.png        test accuracy against cumulative uplink bits, first seed

``--table downlink`` runs the downlink-compression rows instead. ``--only LABEL,...`` runs a subset (dense is always run); ``--row LABEL=SPEC[|FLAGS]`` adds a row.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.runner import run_simulation
from gradwire.counters import LinkCounters, RoundCounters


@dataclass(frozen=True)
class Row:
    label: str
    spec: str
    flags: tuple[str, ...] = ()

    @property
    def shown(self) -> str:
        return f"`{self.spec}`" + (f" `{' '.join(self.flags)}`" if self.flags else "")


PLAIN_SGD = ("--momentum", "0", "--lr", "0.5")  # the default's effective step without PS momentum
ROWS: tuple[Row, ...] = (
    Row("dense", "dense"),
    Row("dense_sgd", "dense", PLAIN_SGD),  # the baseline of the rows with the same flags
    Row("fp16", "fp16"),
    Row("huffman4", "huffman:bits=4"),
    Row("ans4", "ans:bits=4"),
    Row("fp8_152_ans", "fp8:format=152,coder=ans"),
    Row("m22_R2_M2", "m22:bits=2,M=2,dist=gennorm"),
    Row("tpc", "tpc"),
    Row("lag", "lag"),
    Row("qsgd16", "qsgd:levels=16"),
    Row("powersgd2", "powersgd:rank=2"),
    Row("topk1pct", "topk:ratio=0.01"),
    Row("topk1pct_mc", "topk:ratio=0.01,momentum=0.9"),
    Row("topk1pct_sgd", "topk:ratio=0.01", PLAIN_SGD),
    Row("sign", "sign"),
    Row("sign_sgd", "sign", PLAIN_SGD),
    Row("randk1pct", "randk:ratio=0.01"),
)
# --table downlink: compressed broadcasts (model deltas), dense uplink unless stated.
DOWNLINK_ROWS: tuple[Row, ...] = (
    Row("dense", "dense"),
    Row("down_fp16", "dense", ("--downlink-codec", "fp16")),
    Row("down_ans6", "dense", ("--downlink-codec", "ans:bits=6")),
    Row("down_ans4", "dense", ("--downlink-codec", "ans:bits=4")),
    Row("down_topk10", "dense", ("--downlink-codec", "topk:ratio=0.1")),
    Row("down_topk1", "dense", ("--downlink-codec", "topk:ratio=0.01")),
    Row("down_qsgd16", "dense", ("--downlink-codec", "qsgd:levels=16")),
    Row("both_ans", "ans:bits=4", ("--downlink-codec", "ans:bits=6")),
)
TABLES = {"uplink": ROWS, "downlink": DOWNLINK_ROWS}


def parse_row(text: str) -> Row:
    label, _, rest = text.partition("=")
    spec, _, flags = rest.partition("|")
    if not label or not spec:
        raise argparse.ArgumentTypeError(f"--row wants LABEL=SPEC[|FLAGS], got {text!r}")
    return Row(label.strip(), spec.strip(), tuple(shlex.split(flags)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.codec_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--out", default="runs/codec_table")
    p.add_argument("--table", choices=sorted(TABLES), default="uplink",
                   help="uplink: every codec; downlink: compressed broadcasts (--downlink-codec)")
    p.add_argument("--only", default="", help="comma-separated row labels (dense is always run)")
    p.add_argument("--row", type=parse_row, action="append", default=[], help="extra row LABEL=SPEC[|FLAGS]")
    p.add_argument("--force", action="store_true", help="rerun rows whose summary already exists")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per-run time limit (seconds)")
    p.add_argument("simulate_args", nargs=argparse.REMAINDER,
                   help="after '--': extra arguments for every gradwire simulate (e.g. -- --dataset mnist)")
    args = p.parse_args(argv)
    if args.simulate_args and args.simulate_args[0] == "--":
        args.simulate_args = args.simulate_args[1:]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seed_list:
        p.error("--seeds is empty")
    return args


def selected_rows(args: argparse.Namespace) -> list[Row]:
    rows = list(TABLES[args.table]) + list(args.row)
    if args.only:
        # dense is the reference of every Δ; rows given with --row were asked for explicitly
        wanted = {w.strip() for w in args.only.split(",") if w.strip()} | {"dense"} | {r.label for r in args.row}
        unknown = wanted - {r.label for r in rows}
        if unknown:
            raise SystemExit(f"unknown row label(s): {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(r.label for r in rows)}")
        rows = [r for r in rows if r.label in wanted]
    if len({r.label for r in rows}) != len(rows):
        raise SystemExit("row labels must be distinct")
    return rows


def _command(row: Row, seed: int, args: argparse.Namespace, out: Path, log: Path) -> list[str]:
    return [sys.executable, "-m", "gradwire.cli", "simulate", "--workers", str(args.workers),
            "--rounds", str(args.rounds), "--seed", str(seed), "--codec", row.spec, *row.flags,
            *args.simulate_args, "--json", str(out), "--log", str(log), "--quiet"]


def run_one(row: Row, seed: int, args: argparse.Namespace, run_dir: Path,
            failures: dict[tuple[str, int], str] | None = None) -> dict | None:
    out = run_dir / f"{row.label}_s{seed}.json"
    log = run_dir / f"{row.label}_s{seed}.log"
    cmd = _command(row, seed, args, out, log)
    stamp = " ".join(cmd[4:-5])  # what defines the run (not where it writes)
    if not args.force and out.exists():
        summary = json.loads(out.read_text())
        if summary.get("codec_table_command") == stamp:
            print(f"[codec-table] {row.label} seed {seed}: reusing {out}", flush=True)
            return summary
    out.unlink(missing_ok=True)
    print(f"[codec-table] {row.label} seed {seed}: gradwire {stamp}", flush=True)
    start = time.perf_counter()
    status, tail = run_simulation(cmd, log, args.timeout_s)
    if status != "ok" or not out.exists():
        print(f"[codec-table] {row.label} seed {seed}: {status}: {' | '.join(tail)}", flush=True)
        if failures is not None:
            failures[(row.label, seed)] = status if status != "ok" else "no summary"
        return None
    summary = json.loads(out.read_text())
    summary["codec_table_command"] = stamp
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[codec-table] {row.label} seed {seed}: accuracy {summary['final_accuracy']:.4f}, "
          f"{summary['uplink_bits_per_entry']:.3f} bits/entry, {time.perf_counter() - start:.0f} s", flush=True)
    return summary


def build_results(rows: list[Row], seeds: list[int], summaries: dict[tuple[str, int], dict],
                  failures: dict[tuple[str, int], str] | None = None) -> list[dict]:
    results = []
    for row in rows:
        for seed in seeds:
            s = summaries.get((row.label, seed))
            dense = summaries.get(("dense", seed))
            entry = {"label": row.label, "spec": row.spec, "flags": list(row.flags), "seed": seed,
                     "status": "ok" if s else (failures or {}).get((row.label, seed), "failed")}
            if s:
                entry.update({
                    "final_accuracy": s["final_accuracy"],
                    "final_loss": s["final_loss"],
                    "delta_vs_dense": (s["final_accuracy"] - dense["final_accuracy"]
                                       if dense and s["final_accuracy"] is not None else None),
                    "uplink_bits_per_entry": s["uplink_bits_per_entry"],
                    "downlink_codec": s.get("downlink_codec"),
                    "downlink_bits_per_entry": s.get("downlink_bits_per_entry"),
                    **LinkCounters.from_dict(s).to_dict(),
                    "per_bit_accuracy": s["per_bit_accuracy"],
                    "server_momentum": s.get("server_momentum"),
                    "worker_momentum": s.get("worker_momentum"),
                })
            results.append(entry)
    return results


def _fmt(value, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[Row], results: list[dict], args: argparse.Namespace) -> str:
    seeds = args.seed_list
    by_key = {(r["label"], r["seed"]): r for r in results}
    head = [f"Every codec on the default task unless stated: {args.workers} workers × {args.rounds} rounds, "
            f"seeds {', '.join(map(str, seeds))}"
            + (f", simulate args `{' '.join(args.simulate_args)}`" if args.simulate_args else "") + ".", "",
            "| codec (and flags) | " + " | ".join(f"acc. seed {s}" for s in seeds)
            + (" | mean acc. | mean Δ vs dense" if len(seeds) > 1 else " | Δ vs dense")
            + " | uplink bits/entry | downlink bits/entry | protobuf / payload | per-bit acc. (/Mbit)"
            " | PS / worker momentum |",
            "|---" * (len(seeds) + (8 if len(seeds) > 1 else 7)) + "|"]
    for row in rows:
        got = [by_key.get((row.label, s)) for s in seeds]
        ok = [g for g in got if g and g["status"] == "ok"]
        accs = [g["final_accuracy"] if g and g["status"] == "ok" else None for g in got]
        cells = [_fmt(a) if a is not None else (g["status"] if g else "failed") for a, g in zip(accs, got, strict=True)]
        deltas = [g["delta_vs_dense"] for g in ok if g["delta_vs_dense"] is not None]
        valid_accs = [a for a in accs if a is not None]
        if len(seeds) > 1:
            cells.append(_fmt(statistics.fmean(valid_accs)) if valid_accs else "–")
        cells.append(_fmt(statistics.fmean(deltas), "+.4f") if deltas else "–")
        first = ok[0] if ok else None
        cells.append(_fmt(first and first["uplink_bits_per_entry"], ".3f"))
        cells.append(_fmt(first and first.get("downlink_bits_per_entry"), ".3f"))
        link = LinkCounters.from_dict(first) if first else None
        cells.append(_fmt(link and link.uplink_message_bytes / max(link.uplink_payload_bytes, 1), ".4f"))
        pba = first and first["per_bit_accuracy"]
        cells.append(_fmt(pba * 1e6 if pba is not None else None, ".3f"))
        cells.append(f"{first['server_momentum']:g} / {first['worker_momentum']:g}"
                     if first and first.get("server_momentum") is not None else "–")
        head.append(f"| {row.shown} | " + " | ".join(cells) + " |")
    head += ["", "Bits per entry are 8 × uplink payload bytes / (params × workers × rounds), side information "
             "included, from the first seed (they barely move across seeds). Downlink bits per entry: 8 × model "
             "payload bytes the workers received / (params × models received), the full model of each Welcome "
             "included. Per-bit accuracy = max_t "
             "(Acc(t) − Acc(0)) / B(t), B(t) the cumulative uplink payload bits of all workers, per megabit."]
    return "\n".join(head) + "\n"


def total_bits_curve(summary: dict) -> list[tuple[float, float]]:
    """(cumulative uplink + downlink payload bits, test accuracy) at every evaluated round."""
    points, total = [], 0.0
    for entry in (RoundCounters.from_dict(e) for e in summary.get("rounds_log") or []):
        total += 8.0 * (entry.uplink_payload_bytes + entry.downlink_payload_bytes)
        if entry.test_accuracy is not None:
            points.append((total, entry.test_accuracy))
    return points


def plot(rows: list[Row], seed: int, summaries: dict[tuple[str, int], dict], path: Path,
         args: argparse.Namespace) -> None:
    from gradwire.extras import require

    require("matplotlib", "plotting")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    cmap = plt.get_cmap("tab20")
    for i, row in enumerate(rows):
        s = summaries.get((row.label, seed))
        if not s:
            continue
        pts = total_bits_curve(s) if args.table == "downlink" else [
            (b, a) for b, a in s.get("accuracy_vs_uplink_bits") or [] if b > 0 and a is not None]
        if not pts:
            continue
        style = dict(color="black", ls="--", lw=1.6, zorder=10) if row.label == "dense" else dict(color=cmap(i % 20), lw=1.2)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2.5,
                label=row.spec + (" " + " ".join(row.flags) if row.flags else ""), **style)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink + downlink payload bits, all workers" if args.table == "downlink"
                  else "cumulative uplink bits, all workers, side information included")
    ax.set_ylabel("test accuracy")
    what = "uplink + downlink" if args.table == "downlink" else "uplink"
    ax.set_title(f"accuracy against {what} bits: {args.workers} workers × {args.rounds} rounds, seed {seed}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = selected_rows(args)
    out = Path(args.out)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summaries: dict[tuple[str, int], dict] = {}
    failures: dict[tuple[str, int], str] = {}
    for seed in args.seed_list:
        for row in rows:
            s = run_one(row, seed, args, run_dir, failures)
            if s is not None:
                summaries[(row.label, seed)] = s
    results = build_results(rows, args.seed_list, summaries, failures)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(rows, results, args)
    (out / "table.md").write_text(text)
    plot(rows, args.seed_list[0], summaries, out / "accuracy_vs_bits.png", args)
    print(text)
    # A diverged run is a result (the method does not train there), not a failure of the command.
    diverged = [f"{r['label']} seed {r['seed']}" for r in results if r["status"] == "diverged"]
    failed = [f"{r['label']} seed {r['seed']}" for r in results if r["status"] not in ("ok", "diverged")]
    print(f"[codec-table] {len(results) - len(failed) - len(diverged)}/{len(results)} runs in {time.perf_counter() - start:.0f} s; "
          f"wrote {out}/table.md, results.json, accuracy_vs_bits.png", flush=True)
    if diverged:
        print(f"[codec-table] diverged: {', '.join(diverged)}", flush=True)
    if failed:
        print(f"[codec-table] failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
