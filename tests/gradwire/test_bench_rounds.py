"""benchmarks/rounds.py --quick runs end to end and reports every figure it promises (structure
only: speed is measured by the benchmark, never asserted in a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rounds_benchmark_quick(tmp_path):
    out = tmp_path / "rounds.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rounds", "--quick", "--scaling", "2", "3",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (model,) = result["models"]
    g = model["gradwire"]
    assert model["model"] == "mlp1m" and model["workers"] == 2
    assert set(g["stages"]) == {"train", "encode", "serialize", "transfer", "decode", "aggregate", "broadcast"}
    assert all(g["stages"][s] >= 0 for s in ("train", "encode", "serialize", "decode", "aggregate", "broadcast"))
    assert 0 < g["train_per_round"] < g["cpu_per_round"]
    assert g["nontrain_per_round"] == pytest.approx(g["cpu_per_round"] - g["train_per_round"], rel=0.5)
    # a dense Update carries the 1,034,506 float32 parameters plus framing, both ways
    assert 4 * 1_034_506 < g["uplink_bytes"] < 4 * 1_034_506 + 4096
    assert 4 * 1_034_506 < g["downlink_bytes"] < 4 * 1_034_506 + 4096
    assert model["raw_grpc_cpu_per_round"] > 0 and model["ratio_nontrain_vs_raw_grpc"] > 0
    assert set(model["ddp_cpu_per_step"]) == {"local", "ddp:allreduce", "ddp:fp16", "ddp:powersgd"}
    assert set(model["ratio_vs_ddp"]) == {"ddp:allreduce", "ddp:fp16", "ddp:powersgd"}
    assert [s["workers"] for s in result["scaling"]] == [2, 3]
    assert all(s["ps_cpu_per_message"] > 0 for s in result["scaling"])
    necessary = model["necessary_work"]
    assert len(necessary) == 8 and all(cpu > 0 for cpu in necessary.values())
    assert model["floor_ratio_vs_raw_grpc"] == pytest.approx(
        (model["raw_grpc_cpu_per_round"] + sum(necessary.values())) / model["raw_grpc_cpu_per_round"])
    assert model["warmup"] == 1
    b = model["transport_bound"]
    assert b["raw_per_worker_step"] == pytest.approx(model["raw_grpc_cpu_per_round"] / 2)
    assert b["best_ratio_vs_ddp"] > 0
    for heading in ("raw gRPC, same bytes and rounds", "ddp:powersgd", "| transfer |", "PS CPU per worker message",
                    "raw gRPC alone / DDP comm", "best any gRPC PS could reach", "necessary work beyond raw gRPC",
                    "PS: optimizer step (fused SGD)"):
        assert heading in proc.stdout


def test_transport_bound_is_computed_from_the_runs_figures():
    from benchmarks.rounds import transport_bound

    ddp = {"local": 1.2, "ddp:allreduce": 1.25, "ddp:fp16": 1.1, "ddp:powersgd": 1.3}
    b = transport_bound(0.5, 2, ddp)
    assert b["raw_per_worker_step"] == pytest.approx(0.25)
    assert b["ddp_comm_per_step"] == pytest.approx(0.05)
    assert b["raw_vs_ddp_comm"] == pytest.approx(5.0)
    assert b["best_ratio_vs_ddp"] == pytest.approx((1.2 + 0.25) / 1.25)
    # DDP's step measured below its local step (noise): no ratio to its communication, the bound still holds
    noisy = transport_bound(0.5, 2, {**ddp, "ddp:allreduce": 1.19})
    assert noisy["raw_vs_ddp_comm"] != noisy["raw_vs_ddp_comm"]  # nan
    assert noisy["best_ratio_vs_ddp"] == pytest.approx(1.45 / 1.19)
