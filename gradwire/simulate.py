"""`gradwire simulate`: the PS and N workers as local processes on loopback.

The processes are the same entry points the containers run (`gradwire server`,
`gradwire worker`), talking gRPC over real loopback sockets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from gradwire.counters import LinkCounters, total
from gradwire.netns import WorkerNetwork
from gradwire.status import fetch_status


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradwire.cli", *args]


def _pump(stream, sink, prefix: str, found: dict | None = None) -> None:
    for line in iter(stream.readline, ""):
        if found is not None and "listening on" in line and "address" not in found:
            found["address"] = line.strip().rsplit(" ", 1)[-1]
            found["event"].set()
        if sink is not None:
            sink.write(f"{prefix}{line}")
            sink.flush()


def check_simulation(args) -> None:
    """What can be checked before starting processes, in this one: settings, codec, task reference.

    A ValueError says what is wrong (the CLI prints it as one line). Loading the data is left to the
    PS process, whose own one-line error run_simulation relays as soon as it exits.
    """
    from gradwire.server.config import config_from_args
    from gradwire.taskref import resolve_factory

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    # before torch is imported (a built-in task's factory and config_from_args's codecs import it)
    check_data_dir(args.task or args.dataset, args.data_dir)
    resolve_factory(args.task or args.dataset)
    if args.link or args.links:
        from gradwire.links import validate
        from gradwire.netns import why_unavailable

        validate(args.link, args.links)
        why = why_unavailable()
        if why:
            raise ValueError(why)
    config_from_args(args)


def check_data_dir(name: str, data_dir: str) -> None:
    """A built-in file dataset needs an existing folder: say so now rather than from the PS process."""
    from pathlib import Path

    if name not in ("mnist", "fashion-mnist", "cifar10"):
        return
    if data_dir and not Path(data_dir).is_dir():
        raise ValueError(f"dataset folder {data_dir} does not exist")
    if not data_dir and name != "fashion-mnist":  # fashion-mnist may have a system-wide default
        raise ValueError(f"dataset {name!r} is read from files: give their folder with --data-dir")


def run_simulation(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    # SIGTERM (an experiment's time limit, `kill`) unwinds like Ctrl-C, so that the `finally` below ends
    # the PS and the workers and removes the network namespaces instead of leaving them behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="gradwire-sim-"))
    json_path = Path(args.json).resolve() if args.json else workdir / "summary.json"
    log_path = Path(args.log) if args.log else workdir / "run.log"
    log_file = open(log_path, "w")
    # Shaped links: every worker in a network namespace of its own behind a bridge (gradwire/netns.py),
    # the PS on the bridge's address; unshaped, everything on loopback.
    network = WorkerNetwork(args.workers) if (args.link or args.links) else None
    if network is not None:
        network.__enter__()
    server_args = [
        "server", "--address", f"{network.ps_host}:0" if network else "127.0.0.1:0", "--workers", str(args.workers), "--rounds", str(args.rounds),
        "--codec", args.codec, "--downlink-codec", args.downlink_codec, "--dataset", args.dataset, "--model", args.model, "--data-dir", args.data_dir,
        "--task", args.task, "--local-steps", str(args.local_steps), "--local-lr", str(args.local_lr),
        "--batch-size", "full" if args.batch_size == 0 else str(args.batch_size), "--partition", args.partition,
        "--dirichlet-alpha", str(args.dirichlet_alpha), "--seed", str(args.seed), "--lr", str(args.lr),
        "--momentum", "auto" if args.momentum is None else str(args.momentum), "--weight-decay", str(args.weight_decay),
        "--lr-schedule", args.lr_schedule, "--eval-every", str(args.eval_every),
        "--target-accuracy", str(args.target_accuracy),
        "--round-timeout-s", str(args.round_timeout_s), "--max-message-mb", str(args.max_message_mb),
        "--json", str(json_path), "--start-timeout-s", "600",
        "--aggregate", args.aggregate, "--clip-multiple", str(args.clip_multiple), "--trim-fraction", str(args.trim_fraction),
        "--outliers", args.outliers,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    found: dict = {"event": threading.Event()}
    try:
        server = subprocess.Popen(_cli(*server_args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        procs.append(server)
        ps_pump = threading.Thread(target=_pump, args=(server.stdout, log_file, "[ps] ", found), daemon=True)
        ps_pump.start()
        # Wait for "listening on", but notice at once when the PS exits instead (a bad dataset or
        # data folder): relay its one-line error rather than waiting out the timeout.
        deadline = time.monotonic() + 120
        while not found["event"].wait(0.1):
            if server.poll() is not None or time.monotonic() > deadline:
                break
        if not found["event"].is_set() or server.poll() is not None:
            if server.poll() is None:
                server.terminate()
            server.wait(timeout=10)
            ps_pump.join(5)  # the PS's last lines reach the log before it is read
            log_file.flush()
            last = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            reason = last[0].removeprefix("[ps] ") if last else f"the parameter server did not start; see {log_path}"
            print(f"gradwire simulate: error: {reason.split(': error: ', 1)[-1]}", file=sys.stderr)
            return 2
        address = found["address"]
        for i in range(args.workers):
            worker_argv = _cli("worker", "--server", address, "--worker-id", f"sim-{i}", "--connect-timeout-s", "60")
            if args.stale_updates:
                worker_argv.append("--stale-updates")
            if network is not None:
                worker_argv = network.command(i, [*worker_argv, "--interface", network.interface(i),
                                                  "--link", args.link, "--links", args.links])
            w = subprocess.Popen(
                worker_argv,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            )
            procs.append(w)
            threading.Thread(target=_pump, args=(w.stdout, log_file, f"[w{i}] "), daemon=True).start()
        channel = grpc.insecure_channel(address)
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, disable=args.quiet,
        ) as progress:
            bar = progress.add_task(f"{args.codec} × {args.workers}", total=args.rounds, info="")
            all_exited_at: float | None = None
            while server.poll() is None:
                # Every worker gone (crashed or refused for good): the PS would wait a
                # round timeout for reconnects; give it a short grace, then stop it.
                if all(w.poll() is not None for w in procs[1:]):
                    all_exited_at = all_exited_at or time.monotonic()
                    if time.monotonic() - all_exited_at > 15:
                        console.print("[red]every worker exited; stopping the parameter server")
                        server.terminate()
                        break
                try:
                    st = fetch_status(channel, timeout=2)
                    done = sum(1 for r in st.rounds if r.workers > 0)
                    accs = [r.test_accuracy for r in st.rounds if r.test_accuracy is not None]
                    payload = total(st.rounds).uplink_payload_bytes
                    info = f"uplink {payload / 1e6:.2f} MB" + (f"  acc {accs[-1]:.3f}" if accs else "")
                    progress.update(bar, completed=done, info=info)
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
            progress.update(bar, completed=args.rounds)
        channel.close()
        code = server.wait()
        for w in procs[1:]:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
        if code != 0 or not json_path.exists():
            console.print(f"[red]the run failed (PS exit code {code}); log: {log_path}")
            _print_log_tail(console, log_path)
            return 1
        summary = json.loads(json_path.read_text())
        failed = [i for i, w in enumerate(procs[1:]) if w.returncode != 0]
        if failed:
            console.print(f"[yellow]workers {failed} exited with an error; log: {log_path}")
            _print_log_tail(console, log_path)
        _print_summary(console, summary, json_path, log_path)
        return 0 if not failed else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        log_file.close()
        if network is not None:
            network.close()


def _print_log_tail(console, log_path: Path, lines: int = 40) -> None:
    log_path_text = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    for line in log_path_text[-lines:]:
        console.print(line, markup=False, highlight=False)


def _codec_rows(stats: dict) -> list[tuple[str, str]]:
    """A few codec statistics worth a line in the table (all are in the JSON)."""
    rows = []
    by_stage = stats.get("bits_per_entry_by_stage")
    if isinstance(by_stage, dict) and by_stage:
        rows.append(("bits / entry by stage", "  ".join(f"{k}: {float(v):.4g}" for k, v in sorted(by_stage.items()))))
    adaptive = stats.get("adaptive_rounds")
    if isinstance(adaptive, list) and adaptive:  # compressors/adaptive.py: the last round's rate by rank
        rates = adaptive[-1].get("rate", {})
        rows.append(("adaptive rate by rank", "/".join(f"{rates[k]:g}" for k in sorted(rates, key=int)) or "n/a"))
        if isinstance(stats.get("adaptive_within_target"), int | float):
            rows.append(("round trips within target", f"{stats['adaptive_within_target']:.0%}"))
    for key in ("symbol_entropy_bits", "coded_bits_per_symbol", "trigger_rate", "mean_prediction_gain"):
        if isinstance(stats.get(key), int | float):
            rows.append((key.replace("_", " "), f"{stats[key]:.4f}"))
    return rows


def _timing_rows(s: dict) -> list[tuple[str, str]]:
    """Where the rounds' wall time went (server/timing.py), and the time to the target."""
    wall = s.get("wall_clock") or {}
    if not wall.get("wall_s"):
        return []

    def sec(key: str) -> str:
        v = wall.get(key)
        return "n/a" if v is None else f"{v:.2f} s"

    rows = [("rounds' wall time", f"{wall['wall_s']:.2f} s"),
            ("split", f"compute {sec('compute_s')}, encode {sec('encode_s')}, transfer {sec('transfer_s')}, "
                      f"decode {sec('decode_s')}, evaluation {sec('eval_s')}, other {sec('other_s')}")]
    if s.get("target_accuracy") is not None:
        t = s.get("time_to_target_s")
        rows.append((f"time to accuracy {s['target_accuracy']:.4f}",
                     "not reached" if t is None else f"{t:.2f} s of training (evaluations excluded)"))
    return rows


def _print_summary(console, s: dict, json_path: Path, log_path: Path) -> None:
    from rich.table import Table

    t = Table(title=f"gradwire simulate — {s['codec']}", show_header=False)
    acc = s["final_accuracy"]
    link = LinkCounters.from_dict(s)
    rows = [
        ("workers × rounds", f"{s['workers']} × {s['rounds']}  ({s['params']:,} params)"),
        ("final accuracy", f"{acc:.4f}" if acc is not None else "n/a (regression)"),
        ("final test loss", f"{s['final_loss']:.5f}" if s["final_loss"] is not None else "n/a"),
        ("uplink payload", f"{link.uplink_payload_bytes:,} B"),
        ("uplink protobuf", f"{link.uplink_message_bytes:,} B"),
        ("downlink payload", f"{link.downlink_payload_bytes:,} B  ({s['downlink_codec']})"),
        ("downlink protobuf", f"{link.downlink_message_bytes:,} B"),
        ("uplink bits / entry", f"{s['uplink_bits_per_entry']:.4f}" if s["uplink_bits_per_entry"] else "n/a"),
        ("downlink bits / entry", f"{s['downlink_bits_per_entry']:.4f}" if s["downlink_bits_per_entry"] else "n/a"),
        *_codec_rows(s.get("codec_stats") or {}),
        *_timing_rows(s),
        ("summary", str(json_path)),
        ("log", str(log_path)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
