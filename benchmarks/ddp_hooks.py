"""gradwire DDP hooks against DDP's own allreduce, fp16 and PowerSGD hooks.

    python -m benchmarks.ddp_hooks [--steps 300] [--codecs SPEC ...] [--json out.json]

Two gloo ranks on 127.0.0.1 (``torch.multiprocessing.spawn``), one thread each, train the
digits MLP of ``gradwire.tasks`` (26,122 parameters) from the same initial weights with
SGD (lr 0.1), mini-batches of 32 per rank from each rank's half of the training set, the
same batches for every method. Per method it reports:

* bytes per step and rank: for DDP's hooks, the bytes of every tensor the hook passes to
  ``dist.all_reduce`` (counted by wrapping it: all three built-in hooks call it); for the
  gradwire hooks, the payload bytes as the gradwire PS counts them, and beside them the
  frame bytes (payload + self-description) each rank sends. The ratio is against DDP's
  allreduce measured in the same run;
* time per step: the rank's CPU time (``time.process_time``: forward, backward, hook,
  optimizer; all threads of the process) and the wall time, means over both ranks of the
  steps after the first 5 (DDP rebuilds its buckets after the first step). On a loaded
  machine the wall time also counts waiting for a core; CPU time is the steadier figure;
* test accuracy after the run, and whether the two ranks' models are bitwise identical.

PowerSGD (torch) uses rank 2, error feedback and warm start, and starts compressing at
step 2 (``start_powerSGD_iter=2``, the earliest it allows with error feedback): before
that it allreduces, as in torch.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import gradwire.ddp  # noqa: E402
from gradwire.tasks import make_task, shard_indices  # noqa: E402

WORLD_SIZE = 2
WARMUP_STEPS = 5
BUILTINS = ["ddp:allreduce", "ddp:fp16", "ddp:powersgd"]
DEFAULT_CODECS = ["fp16", "ans:bits=4", "qsgd:levels=4", "topk:ratio=0.01", "powersgd:rank=2", "tpc"]


class AllreduceCounter:
    """Counts the bytes DDP's built-in hooks hand to ``dist.all_reduce`` on this rank."""

    def __init__(self):
        self.bytes = 0
        self._original = dist.all_reduce

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def register(method: str, model: DDP):
    """Registers the method's hook; returns the gradwire state (None for DDP's hooks)."""
    if method == "ddp:allreduce":
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    elif method == "ddp:fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif method == "ddp:powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2,
                                            start_powerSGD_iter=2, random_seed=0)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        state, comm_hook = gradwire.ddp.hook(method, model=model, seed=0)
        model.register_comm_hook(state, comm_hook)
        return state
    return None


def train(rank: int, method: str, steps: int) -> dict:
    task = make_task("digits", seed=0)
    model = DDP(task.build_model())
    state = register(method, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = task.dataset
    shard = shard_indices(ds.train_y, WORLD_SIZE, rank)
    rng = np.random.default_rng([0, rank])
    cpu, wall, sent = [], [], []
    with AllreduceCounter() as counter:
        for _ in range(steps):
            idx = rng.choice(shard, size=32, replace=False)
            x, y = torch.from_numpy(ds.train_x[idx]), torch.from_numpy(ds.train_y[idx])
            before = counter.bytes
            c0, w0 = time.process_time(), time.perf_counter()
            optimizer.zero_grad()
            task.loss_fn(model(x), y).backward()
            optimizer.step()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            sent.append(counter.bytes - before)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(everyone, flat)
    _, accuracy = task.evaluate(model.module)
    if state is not None:
        report = state.bytes_report()
        payload = [s["payload_bytes"] for s in report["per_step"]]
        frames = [s["frame_bytes"] for s in report["per_step"]]
    else:
        payload = frames = sent
    return {
        "method": method, "rank": rank, "accuracy": accuracy,
        "identical": all(torch.equal(everyone[0], other) for other in everyone[1:]),
        "payload_bytes_per_step": float(np.mean(payload)), "frame_bytes_per_step": float(np.mean(frames)),
        "cpu_ms_per_step": 1e3 * float(np.mean(cpu[WARMUP_STEPS:])),
        "wall_ms_per_step": 1e3 * float(np.mean(wall[WARMUP_STEPS:])),
        "dense_bytes": 4 * flat.numel(),
    }


def rank_main(rank: int, methods: list[str], steps: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = []
        for method in methods:
            dist.barrier()
            results.append(train(rank, method, steps))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(methods: list[str], steps: int) -> list[dict]:
    """Both ranks' results merged per method (bytes: rank 0 and 1 averaged; times: mean)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(rank_main, args=(methods, steps, free_port(), out_dir), nprocs=WORLD_SIZE, join=True)
        by_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    merged = []
    for i, method in enumerate(methods):
        rows = [by_rank[r][i] for r in range(WORLD_SIZE)]
        row = {key: float(np.mean([x[key] for x in rows])) for key in
               ("payload_bytes_per_step", "frame_bytes_per_step", "cpu_ms_per_step", "wall_ms_per_step")}
        row.update(method=method, accuracy=rows[0]["accuracy"], identical=all(x["identical"] for x in rows),
                   dense_bytes=rows[0]["dense_bytes"])
        merged.append(row)
    return merged


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["method"] == "ddp:allreduce")
    lines = [
        "| hook | bytes/step/rank | less than allreduce | frame bytes/step | CPU ms/step | × allreduce "
        "| wall ms/step | × allreduce | test accuracy | ranks identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        name = r["method"] if r["method"].startswith("ddp:") else f"gradwire {r['method']}"
        lines.append(
            f"| {name} | {r['payload_bytes_per_step']:,.0f} | "
            f"{base['payload_bytes_per_step'] / r['payload_bytes_per_step']:.1f}× | "
            f"{r['frame_bytes_per_step']:,.0f} | {r['cpu_ms_per_step']:.2f} | "
            f"{r['cpu_ms_per_step'] / base['cpu_ms_per_step']:.2f} | {r['wall_ms_per_step']:.2f} | "
            f"{r['wall_ms_per_step'] / base['wall_ms_per_step']:.2f} | {r['accuracy']:.3f} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, help="gradwire codec specs")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = run(BUILTINS + list(args.codecs), args.steps)
    print(f"# 2 gloo ranks on 127.0.0.1, digits MLP, {args.steps} steps of 32 examples per rank; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
