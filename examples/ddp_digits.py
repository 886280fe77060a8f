"""Train with PyTorch DDP on 2 gloo processes, gradients carried by a gradwire codec hook.

    python examples/ddp_digits.py                       # ans:bits=4, then topk with error feedback
    python examples/ddp_digits.py --codec qsgd:levels=4 --steps 200

The model is the digits MLP of ``gradwire.tasks`` (26,122 parameters); each rank trains
on its own half of the training set with mini-batches of 32. After training the script
checks, and exits non-zero otherwise, that

* the two ranks' models are bitwise identical (every rank averages the same decoded
  bytes in the same order);
* the bytes each rank reports sending equal the bytes the other rank received from it,
  both the frames and the payload (re-parsed by the receiver from the frames), per run.

It prints, per codec, the test accuracy, the payload bytes per step (counted as the
gradwire PS counts uplink payload) against dense float32, and the frame bytes per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import gradwire.ddp
from gradwire.tasks import make_task, shard_indices

WORLD_SIZE = 2


def rendezvous(out_dir: str) -> str:
    # A file store in the run's own directory, not a TCP store on a port found free a moment
    # before: another process can take such a port before rank 0 binds it (a race seen once
    # in a loaded test run). gloo's own rank-to-rank connections bind port 0 and are unaffected.
    return "file://" + str(Path(out_dir, "rendezvous"))


def train_one(rank: int, codec: str, steps: int, lr: float = 0.1, batch: int = 32) -> dict:
    """Train the digits MLP from scratch with DDP and a gradwire hook; this rank's report."""
    task = make_task("digits", seed=0)
    model = DDP(task.build_model())  # same seed on every rank: the same initial weights
    state, comm_hook = gradwire.ddp.hook(codec, model=model, seed=0)
    model.register_comm_hook(state, comm_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    ds = task.dataset
    shard = shard_indices(ds.train_y, WORLD_SIZE, rank)
    rng = np.random.default_rng([0, rank])
    for _ in range(steps):
        idx = rng.choice(shard, size=batch, replace=False)
        x, y = torch.from_numpy(ds.train_x[idx]), torch.from_numpy(ds.train_y[idx])
        optimizer.zero_grad()
        task.loss_fn(model(x), y).backward()
        optimizer.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(everyone, flat)
    _, accuracy = task.evaluate(model.module)
    report = state.bytes_report()
    report.update(
        accuracy=accuracy,
        identical=all(torch.equal(everyone[0], other) for other in everyone[1:]),
        dense_bytes_per_step=4 * flat.numel(),
    )
    return report


def train(rank: int, codecs: list[str], steps: int, out_dir: str) -> None:
    """One spawned rank: every codec in turn, in one process group (start-up is the slow part)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous(out_dir), rank=rank, world_size=WORLD_SIZE)
    try:
        reports = [train_one(rank, codec, steps) for codec in codecs]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(reports))
        # Both ranks done before either closes its gloo connections: a rank torn down while the
        # other still talked was a suspect when one rank once died of "terminate called without
        # an active exception" (SIGABRT) at the end of a CI test run.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(codecs: list[str], steps: int) -> list[list[dict]]:
    """Train on 2 spawned processes; per codec, each rank's report."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(train, args=(codecs, steps, out_dir), nprocs=WORLD_SIZE, join=True)
        by_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return [[by_rank[r][i] for r in range(WORLD_SIZE)] for i in range(len(codecs))]


def check(reports: list[dict]) -> list[str]:
    """What is wrong with a run's reports (empty when all is well)."""
    problems = []
    for r, rep in enumerate(reports):
        if not rep["identical"]:
            problems.append(f"rank {r}: the ranks' models differ")
        if len(rep["per_step"]) != rep["steps"] or sum(s["payload_bytes"] for s in rep["per_step"]) != rep["total"][
                "payload_bytes"]:
            problems.append(f"rank {r}: per-step bytes do not add up to the total")
        for other in reports:
            for key in ("frame_bytes", "payload_bytes"):
                if other[f"received_{key}"][r] != rep["total"][key]:
                    problems.append(f"rank {other['rank']} received {other[f'received_{key}'][r]} {key} from "
                                    f"rank {r}, which reports sending {rep['total'][key]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codec", action="append", help="gradwire codec spec (repeatable)")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    failed = False
    codecs = args.codec or ["ans:bits=4", "topk:ratio=0.05,ef=1"]
    for codec, reports in zip(codecs, run(codecs, args.steps), strict=True):
        rep = reports[0]
        per_step = rep["mean_payload_bytes_per_step"]
        print(f"{codec:<24} accuracy {rep['accuracy']:.3f}  payload {per_step:,.0f} B/step "
              f"({rep['dense_bytes_per_step'] / per_step:.1f}x less than dense float32)  "
              f"frames {rep['mean_frame_bytes_per_step']:,.0f} B/step  ranks identical: {rep['identical']}")
        for problem in check(reports):
            print("  FAILED:", problem)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
