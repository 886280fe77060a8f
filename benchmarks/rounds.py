"""CPU per round: gradwire against raw gRPC carrying the same bytes, and against PyTorch DDP.

    python -m benchmarks.rounds [--quick] [--models mlp8m resnet18] [--workers 2] [--rounds 40]
                                [--warmup 30] [--repeats 3] [--scaling 2 4 8 16] [--json out.json]

Everything runs on this machine over loopback, each party in its own process, and is measured
in CPU time (``getrusage``: all threads of a process), which stays meaningful on a loaded
machine where wall time also counts waiting for a core. Medians over the steady rounds of each
run, then the median over ``--repeats`` runs. The first ``--warmup`` rounds are left out, of
gradwire and raw gRPC alike: for a few dozen rounds each process's heap still grows into the
layout it keeps (glibc, ``gradwire/memory.py``), and every new page costs a page fault. An mlp8m
worker page-faulted about 5,000 times per round in its first 30 rounds and a few times per
round after them, and its non-training CPU per round fell by a third
(docs/results/perf/steady.md); a training run of thousands of rounds spends nearly all of
them in that steady state. In one run:

1. **gradwire**: a PS and ``--workers`` workers (``gradwire server``/``worker``, codec ``dense``)
   train the model (``benchmarks/models.py``: synthetic data, same batch as DDP). Per round:
   the CPU of all processes; the training CPU (the workers' forward + backward); and the
   non-training CPU, the difference. Beside it the per-stage split (thread CPU of the wrapped
   functions, ``benchmarks/rounds_proc.py``): train, encode, serialize, transfer (the rest: gRPC
   threads, framing, sockets, scheduling), decode, aggregate, broadcast; and the PS's peak RSS.
2. **raw gRPC**: a bytes-in/bytes-out gRPC stream server and as many client processes, the same
   message sizes both ways as gradwire's Update and RoundResult, the same synchronous rounds.
   Ratio: gradwire non-training CPU / raw gRPC CPU, per round. Its processes set glibc's
   allocator as gradwire's server and worker do (``gradwire/memory.py``), so that the ratio
   measures gradwire's own work, not an allocator setting.
   Beside it, the floor of that ratio: the **necessary work** any parameter server with
   gradwire's guarantees adds to moving the bytes, each operation timed alone in its own
   process (``rounds_proc.necessary_work``: per worker one copy into the bytes gRPC's Python API
   sends, one copy of the received model into the parameters, the finiteness checks of the update
   and of the received model; on the PS each update's norm, the mean, the optimizer step, one copy
   into the broadcast). (raw gRPC + necessary work) / raw gRPC is the least ratio such a PS can
   reach on this machine.
3. **PyTorch DDP** on gloo, ``--workers`` ranks, the same model and batch, with the allreduce,
   fp16 and PowerSGD (rank 2) comm hooks, and a no-DDP "local" step for the training CPU.
   Ratio: gradwire CPU per worker step (all processes' CPU per round / workers) / DDP's CPU per
   rank and step.
4. **PS scaling**: the PS's CPU per worker message with 2 to 16 workers (emulated workers that
   send real dense Updates and read the replies, so that 16 of them fit on a small machine), on
   the 1 M-parameter MLP. Flat is good: no per-message cost grows with the worker count.

``--quick`` runs a small configuration (1 M-parameter MLP, a few rounds, 2 and 3 workers) for the
test suite; its figures say little. Speed targets are judged on full runs, never in tests.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

STAGES = ("train", "encode", "serialize", "transfer", "decode", "aggregate", "broadcast")
DDP_METHODS = ("local", "ddp:allreduce", "ddp:fp16", "ddp:powersgd")
DDP_ATTEMPTS = 3
PROC = [sys.executable, "-m", "benchmarks.rounds_proc"]
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs) -> float:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else float("nan")


def run_processes(commands: list[list[str]], timeout_s: float) -> list[dict]:
    """Start the commands (the first is the server), wait for all; their JSON records in order."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, outs = [], []
        for i, cmd in enumerate(commands):
            out = Path(tmp, f"p{i}.json")
            env = dict(os.environ, GRADWIRE_BENCH_OUT=str(out), PYTHONPATH=f"{ROOT}{os.pathsep}"
                       f"{os.environ.get('PYTHONPATH', '')}")
            log = open(Path(tmp, f"p{i}.log"), "w")  # noqa: SIM115 - closed below
            procs.append((subprocess.Popen(PROC + cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
            outs.append(out)
        deadline = time.monotonic() + timeout_s
        failed = []
        for i, (p, log) in enumerate(procs):
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                rc = "timeout"
            log.close()
            if rc != 0:
                failed.append((commands[i][:2], rc, Path(tmp, f"p{i}.log").read_text()[-3000:]))
        if failed:
            raise RuntimeError(f"benchmark processes failed: {failed}")
        return [json.loads(o.read_text()) for o in outs]


def per_round_cpu(records: list[dict], rounds: range) -> dict[int, float]:
    """Round -> CPU of all processes from the start of that round to the start of the next."""
    marks = [dict((int(r), cpu) for r, cpu in reversed(rec["rounds"])) for rec in records]
    out = {}
    for r in rounds:
        if all(r in m and r + 1 in m for m in marks):
            out[r] = sum(m[r + 1] - m[r] for m in marks)
    return out


def stage_per_round(records: list[dict], stage: str, rounds: range) -> dict[int, float]:
    out = {r: 0.0 for r in rounds}
    for rec in records:
        for r, cpu in rec["stages"].get(stage, []):
            if r in out:
                out[r] += cpu
    return out


def steady(rounds: int, warmup: int = 1) -> range:
    """The rounds measured: after ``warmup`` rounds, and not the last (no successor closes it)."""
    return range(min(warmup, rounds - 2), rounds - 1)


# ---------------------------------------------------------------- gradwire and raw gRPC


def gradwire_run(task: str, workers: int, rounds: int, batch: int, codec: str = "dense", warmup: int = 1) -> dict:
    port = free_port()
    server = ["gradwire-server", "server", "--address", f"127.0.0.1:{port}", "--workers", str(workers),
              "--rounds", str(rounds), "--codec", codec, "--task", f"benchmarks.models:{task}",
              "--batch-size", str(batch), "--eval-every", "1000000", "--join-grace-s", "0.2",
              "--linger-s", "0", "--max-message-mb", "256"]
    worker = ["gradwire-worker", "worker", "--server", f"127.0.0.1:{port}", "--threads", "1",
              "--max-message-mb", "256"]
    records = run_processes([server] + [worker + ["--worker-id", f"w{i}"] for i in range(workers)],
                            timeout_s=600 + 60 * rounds)
    rs = steady(rounds, warmup)
    total = per_round_cpu(records, rs)
    stages = {s: stage_per_round(records, s, rs) for s in STAGES if s != "transfer"}
    nontrain = {r: total[r] - stages["train"][r] for r in total}
    split = {s: median(v[r] for r in total) for s, v in stages.items()}
    split["transfer"] = median(nontrain.values()) - sum(v for s, v in split.items() if s != "train")
    ups = [b for rec in records[1:] for b in rec["bytes"].get("uplink", [])]
    downs = records[0]["bytes"].get("downlink", [])
    big = max(downs)
    return {
        "cpu_per_round": median(total.values()), "train_per_round": median(stages["train"][r] for r in total),
        "nontrain_per_round": median(nontrain.values()), "stages": split,
        "uplink_bytes": int(median([u for u in ups if u > ups[0] // 10])),
        "downlink_bytes": int(median([d for d in downs if d > big // 10])),
        "ps_maxrss_mb": records[0]["maxrss_kb"] / 1024, "rounds_measured": len(total),
    }


def raw_run(workers: int, rounds: int, up: int, down: int, warmup: int = 1) -> dict:
    port = free_port()
    records = run_processes([["raw-server", str(port), str(workers), str(rounds), str(down)]]
                            + [["raw-client", str(port), str(rounds), str(up)]] * workers, timeout_s=300)
    total = per_round_cpu(records, steady(rounds, warmup))
    return {"cpu_per_round": median(total.values())}


def necessary_run(task: str, workers: int, repeats: int = 9) -> dict[str, float]:
    """CPU per round of the work any PS with gradwire's guarantees adds to moving the bytes
    (``rounds_proc.necessary_work``: each operation alone, in its own process)."""
    (record,) = run_processes([["necessary-work", f"benchmarks.models:{task}", str(workers), str(repeats)]],
                              timeout_s=600)
    return record["necessary"]


def scaling_run(workers: int, rounds: int, task: str = "mlp1m") -> dict:
    port = free_port()
    server = ["gradwire-server", "server", "--address", f"127.0.0.1:{port}", "--workers", str(workers),
              "--rounds", str(rounds), "--codec", "dense", "--task", f"benchmarks.models:{task}",
              "--eval-every", "1000000", "--join-grace-s", "0.5", "--linger-s", "0"]
    records = run_processes([server, ["emulated-workers", str(port), str(workers), str(rounds),
                                      f"benchmarks.models:{task}"]], timeout_s=300 + 10 * rounds * workers)
    ps = per_round_cpu(records[:1], steady(rounds))
    return {"ps_cpu_per_round": median(ps.values()), "ps_cpu_per_message": median(ps.values()) / workers,
            "ps_maxrss_mb": records[0]["maxrss_kb"] / 1024}


# ---------------------------------------------------------------- DDP


def _ddp_rank(rank: int, task: str, method: str, world: int, steps: int, port: int, out_dir: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from benchmarks import models

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = models.make(task, 0)
    xs, ys = t.train.tensors
    batch = models.BATCH[task]
    rng = np.random.default_rng([0, rank])
    results = {}
    try:
        # one method per process group (ddp_run): a fresh gloo context for each
        torch.manual_seed(0)
        net = t.model()
        model = net if method == "local" else DDP(net)
        if method == "ddp:fp16":
            model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif method == "ddp:powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2,
                                                start_powerSGD_iter=2, random_seed=0)
            model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        cpu = []
        for _ in range(steps):
            idx = torch.from_numpy(rng.choice(len(xs), size=batch, replace=False))
            c0 = _cpu()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
            cpu.append(_cpu() - c0)
        results[method] = median(cpu[2:])  # DDP rebuilds buckets after step 1; PowerSGD starts at 2
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # both ranks done before either closes its gloo connections (examples/ddp_digits.py)
    finally:
        dist.destroy_process_group()


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def ddp_run(task: str, world: int, steps: int) -> dict:
    import torch.multiprocessing as mp

    out = {}
    for method in DDP_METHODS:
        for attempt in range(DDP_ATTEMPTS):
            try:
                with tempfile.TemporaryDirectory() as out_dir:
                    mp.spawn(_ddp_rank, args=(task, method, world, steps, free_port(), out_dir), nprocs=world,
                             join=True)
                    ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
                break
            except mp.ProcessExitedException as exc:
                # Seen on this shared machine, rarely: gloo aborts a rank ("Received data size doesn't
                # match expected size") in a run that passes when repeated. Retried, and said so.
                print(f"# {method} on {task}: DDP attempt {attempt + 1} failed ({exc}); retrying", file=sys.stderr)
        else:
            raise RuntimeError(f"DDP {method} on {task} failed {DDP_ATTEMPTS} times")
        out[method] = statistics.fmean(r[method] for r in ranks)
    return out


# ---------------------------------------------------------------- one run, and the report


def measure_model(task: str, workers: int, rounds: int, repeats: int, ddp_steps: int, warmup: int = 1) -> dict:
    from benchmarks import models

    runs = []
    for _ in range(repeats):  # interleaved, so the machine's load falls on every party alike
        g = gradwire_run(task, workers, rounds, models.BATCH[task], warmup=warmup)
        raw = raw_run(workers, rounds, g["uplink_bytes"], g["downlink_bytes"], warmup)
        ddp = ddp_run(task, workers, ddp_steps)
        necessary = necessary_run(task, workers)
        runs.append({"gradwire": g, "raw": raw, "ddp": ddp, "necessary": necessary})

    def med(path):
        vals = []
        for run in runs:
            v = run
            for key in path:
                v = v[key]
            vals.append(v)
        return median(vals)

    g = {k: med(("gradwire", k)) for k in ("cpu_per_round", "train_per_round", "nontrain_per_round",
                                           "uplink_bytes", "downlink_bytes", "ps_maxrss_mb")}
    g["uplink_bytes"], g["downlink_bytes"] = int(g["uplink_bytes"]), int(g["downlink_bytes"])
    g["stages"] = {s: med(("gradwire", "stages", s)) for s in STAGES}
    raw = med(("raw", "cpu_per_round"))
    ddp = {m: med(("ddp", m)) for m in DDP_METHODS}
    per_step = g["cpu_per_round"] / workers
    necessary = {op: med(("necessary", op)) for op in runs[0]["necessary"]}
    return {
        "transport_bound": transport_bound(raw, workers, ddp),
        "necessary_work": necessary,
        "floor_ratio_vs_raw_grpc": (raw + sum(necessary.values())) / raw,
        "model": task, "workers": workers, "rounds": rounds, "warmup": warmup, "repeats": repeats, "gradwire": g,
        "raw_grpc_cpu_per_round": raw, "ddp_cpu_per_step": ddp,
        "ratio_nontrain_vs_raw_grpc": g["nontrain_per_round"] / raw,
        "gradwire_cpu_per_worker_step": per_step,
        "ratio_vs_ddp": {m: per_step / ddp[m] for m in DDP_METHODS if m != "local"},
        "runs": runs,
    }


def transport_bound(raw_per_round: float, workers: int, ddp: dict[str, float]) -> dict[str, float]:
    """What any gRPC parameter server could reach against DDP, from the same run's figures.

    ``raw_per_worker_step``: raw gRPC's CPU for the same bytes, per worker and round (the least a
    gRPC transport spends moving them); ``ddp_comm_per_step``: DDP allreduce's CPU above its local
    (no-DDP) step, per rank. ``best_ratio_vs_ddp``: a PS whose non-training CPU were raw gRPC's
    and whose training cost DDP's local step, against DDP allreduce: no gRPC transport of these
    bytes goes below it."""
    raw_step = raw_per_round / workers
    comm = ddp["ddp:allreduce"] - ddp["local"]
    return {
        "raw_per_worker_step": raw_step, "ddp_comm_per_step": comm,
        "raw_vs_ddp_comm": raw_step / comm if comm > 0 else float("nan"),
        "best_ratio_vs_ddp": (ddp["local"] + raw_step) / ddp["ddp:allreduce"],
    }


def render(result: dict) -> str:
    lines = []
    for m in result["models"]:
        g = m["gradwire"]
        lines += [
            f"## {m['model']}: {m['workers']} workers, {m['rounds']} rounds ({m.get('warmup', 1)} of warm-up left out), "
            f"median of {m['repeats']} runs "
            f"(CPU ms; uplink {g['uplink_bytes']:,} B, downlink {g['downlink_bytes']:,} B per worker and round)",
            "",
            "| per round | CPU ms | ratio |",
            "|---|---:|---:|",
            f"| gradwire, all processes | {1e3 * g['cpu_per_round']:.1f} | |",
            f"| gradwire, training (workers' forward + backward) | {1e3 * g['train_per_round']:.1f} | |",
            f"| gradwire, non-training | {1e3 * g['nontrain_per_round']:.1f} | "
            f"{m['ratio_nontrain_vs_raw_grpc']:.2f}x raw gRPC |",
            f"| raw gRPC, same bytes and rounds | {1e3 * m['raw_grpc_cpu_per_round']:.1f} | 1.00x |",
        ]
        necessary = m.get("necessary_work")
        if necessary:
            lines += [f"| necessary work beyond raw gRPC (below) | {1e3 * sum(necessary.values()):.1f} | |",
                      f"| bound: raw gRPC + necessary work, what any PS with these guarantees reaches | | "
                      f"{m['floor_ratio_vs_raw_grpc']:.2f}x raw gRPC |",
                      "", "| necessary work per round, each operation alone (all workers) | CPU ms |", "|---|---:|"]
            lines += [f"| {op} | {1e3 * cpu:.1f} |" for op, cpu in necessary.items()]
        lines += [
            "",
            "| per worker step | CPU ms | gradwire dense / this |",
            "|---|---:|---:|",
            f"| gradwire dense (all processes / workers) | {1e3 * m['gradwire_cpu_per_worker_step']:.1f} | |",
        ]
        for method, cpu in m["ddp_cpu_per_step"].items():
            ratio = f"{m['ratio_vs_ddp'][method]:.2f}x" if method in m["ratio_vs_ddp"] else "(training only, no DDP)"
            lines.append(f"| {method} (gloo, per rank) | {1e3 * cpu:.1f} | {ratio} |")
        b = m.get("transport_bound")
        if b:
            comm = (f"{b['raw_vs_ddp_comm']:.1f}x" if b["ddp_comm_per_step"] > 0
                    else "n/a (DDP's step not above its local step)")
            lines += [
                f"| bound: raw gRPC, same bytes, per worker step | {1e3 * b['raw_per_worker_step']:.1f} | |",
                f"| bound: DDP allreduce communication (allreduce - local) | {1e3 * b['ddp_comm_per_step']:.1f} | |",
                f"| bound: raw gRPC alone / DDP comm | | {comm} |",
                f"| bound: best any gRPC PS could reach, (local + raw gRPC) / ddp:allreduce | | "
                f"{b['best_ratio_vs_ddp']:.2f}x |",
            ]
        lines += ["", "| gradwire stage (per round, all processes) | CPU ms |", "|---|---:|"]
        lines += [f"| {s} | {1e3 * g['stages'][s]:.1f} |" for s in STAGES]
        lines += [f"| PS peak RSS | {g['ps_maxrss_mb']:.0f} MB |", ""]
    if result.get("scaling"):
        lines += ["## PS CPU per worker message (1 M-parameter MLP, dense, emulated workers)", "",
                  "| workers | PS CPU ms per round | PS CPU ms per message | PS peak RSS MB |", "|---:|---:|---:|---:|"]
        for s in result["scaling"]:
            lines.append(f"| {s['workers']} | {1e3 * s['ps_cpu_per_round']:.1f} | {1e3 * s['ps_cpu_per_message']:.2f} "
                         f"| {s['ps_maxrss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (for tests)")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None,
                        help="first rounds left out of the medians, gradwire's and raw gRPC's alike (see the module's docstring)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ddp-steps", type=int, default=None)
    parser.add_argument("--scaling", type=int, nargs="*", default=None, help="worker counts of the PS sweep")
    parser.add_argument("--scaling-rounds", type=int, default=None)
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args(argv)
    quick = args.quick
    models = args.models or (["mlp1m"] if quick else ["mlp8m", "resnet18"])
    rounds = args.rounds or (4 if quick else 40)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 30)
    repeats = args.repeats or (1 if quick else 3)
    ddp_steps = args.ddp_steps or (4 if quick else 8)
    scaling = args.scaling if args.scaling is not None else ([2, 3] if quick else [2, 4, 8, 16])
    scaling_rounds = args.scaling_rounds or (4 if quick else 8)
    import torch

    result = {
        "host": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start",
        "command": " ".join(["python -m benchmarks.rounds", *(argv if argv is not None else sys.argv[1:])]),
        "models": [],
        "scaling": [],
    }
    print(f"# {result['host']}\n# {result['command']}\n", flush=True)

    def save() -> None:  # after every part: a long run that is stopped keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    for m in models:
        result["models"].append(measure_model(m, args.workers, rounds, repeats, ddp_steps, warmup))
        print(render({"models": result["models"][-1:]}), flush=True)
        save()
    for w in scaling:
        per = [scaling_run(w, scaling_rounds) for _ in range(repeats)]
        result["scaling"].append({"workers": w, **{k: median(p[k] for p in per) for k in per[0]}})
        save()
    if result["scaling"]:
        print(render({"models": [], "scaling": result["scaling"]}), end="", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
