"""gradwire.ddp: DDP communication hooks on 2 real gloo processes over loopback.

Runs examples/ddp_digits.py's training (the digits MLP, a few steps) with several gradwire
hooks in one process group, and checks that the replicas stay bitwise identical and that the
bytes each rank reports are the bytes the other rank received and parsed from it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessExitedException

import gradwire.ddp
from gradwire.compressors.base import CodecError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def example():
    # Spawned ranks unpickle the example's functions by module name: they inherit sys.path.
    sys.path.insert(0, str(EXAMPLES))
    try:
        import ddp_digits

        yield ddp_digits
    finally:
        sys.path.remove(str(EXAMPLES))


SPECS = ["fp16", "ans:bits=4", "topk:ratio=0.05,ef=1", "randk:ratio=0.1", "tpc", "lag:residual=fp16", "powersgd:rank=2"]
STEPS = 4


@pytest.fixture(scope="module")
def runs(example):
    try:
        reports = example.run(SPECS, STEPS)
    except ProcessExitedException as exc:
        # gloo aborted a rank in C++ once in a CI run (SIGABRT, "terminate called without an active
        # exception"; 30 runs in a row here, and more under CPU load, never did): a rank killed by a signal is run
        # again, once. Anything the ranks report is still checked as it comes.
        if exc.signal_name is None:
            raise
        warnings.warn(f"DDP example: {exc}; running it again", stacklevel=1)
        reports = example.run(SPECS, STEPS)
    return dict(zip(SPECS, reports, strict=True))


@pytest.mark.parametrize("spec", SPECS)
def test_ranks_stay_identical_and_reported_bytes_are_the_bytes_exchanged(example, runs, spec):
    reports = runs[spec]
    assert example.check(reports) == []
    for rank, rep in enumerate(reports):
        assert rep["rank"] == rank and rep["identical"] and rep["steps"] == STEPS
        assert [s["step"] for s in rep["per_step"]] == list(range(STEPS))
        for step in rep["per_step"]:
            # Compressed: fewer payload bytes than dense float32; the frame adds its description.
            assert 0 < step["payload_bytes"] < rep["dense_bytes_per_step"], spec
            assert step["payload_bytes"] < step["frame_bytes"] <= step["padded_bytes"] - 8 * step["buckets"]
        # What this rank received from itself equals what it reports sending.
        assert rep["received_frame_bytes"][rank] == rep["total"]["frame_bytes"]
        assert rep["received_payload_bytes"][rank] == rep["total"]["payload_bytes"]


def test_payload_counts_are_the_ps_counts(runs):
    # fp16 sends 2 bytes per entry and nothing else: exactly half of dense float32 per step,
    # as the PS counts an fp16 update; the frame adds the header and the tensors' descriptions.
    for rep in runs["fp16"]:
        assert all(s["payload_bytes"] * 2 == rep["dense_bytes_per_step"] for s in rep["per_step"])
        overhead = (rep["total"]["frame_bytes"] - rep["total"]["payload_bytes"]) / rep["steps"]
        assert overhead < 1000


def test_refusals_before_any_communication():
    with pytest.raises(CodecError, match="parameter-server coordinator"):
        gradwire.ddp.hook("lgc")
    with pytest.raises(CodecError, match="would be sent dense"):
        gradwire.ddp.hook("powersgd", layout="bucket")
    with pytest.raises(CodecError, match="needs the model's motion"):
        gradwire.ddp.hook("lag")
    with pytest.raises(CodecError, match="layout must be"):
        gradwire.ddp.hook("fp16", layout="rows")
    assert not dist.is_initialized()


def test_hook_state_checkpoint_resumes_bit_for_bit(example, tmp_path):
    """A one-rank gloo group in this process: train, checkpoint the hook state and the model,
    continue; a fresh model and hook restored from the checkpoint continue identically."""
    import copy

    import numpy as np
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradwire.tasks import make_task

    dist.init_process_group("gloo", init_method=example.rendezvous(str(tmp_path)), rank=0, world_size=1)
    try:
        task = make_task("digits", seed=0)
        batches = [(torch.from_numpy(task.dataset.train_x[i * 32:(i + 1) * 32]),
                    torch.from_numpy(task.dataset.train_y[i * 32:(i + 1) * 32])) for i in range(8)]

        def start(module):
            model = DDP(module)
            state, comm_hook = gradwire.ddp.hook("topk:ratio=0.05", model=model, seed=3)
            model.register_comm_hook(state, comm_hook)
            return model, state, torch.optim.SGD(model.parameters(), lr=0.1)

        def steps(model, optimizer, todo):
            for x, y in todo:
                optimizer.zero_grad()
                task.loss_fn(model(x), y).backward()
                optimizer.step()

        model, state, optimizer = start(task.build_model())
        steps(model, optimizer, batches[:4])
        saved_module, saved_state = copy.deepcopy(model.module), copy.deepcopy(state.state_dict())
        assert saved_state["encoder"]["residuals"], "error feedback memory is part of the state"
        steps(model, optimizer, batches[4:])

        model2, state2, optimizer2 = start(saved_module)
        state2.load_state_dict(saved_state)
        steps(model2, optimizer2, batches[4:])
        for a, b in zip(model.parameters(), model2.parameters(), strict=True):
            assert torch.equal(a, b)
        for key in ("total", "received_frame_bytes", "received_payload_bytes", "per_step"):
            assert state2.bytes_report()[key] == state.bytes_report()[key]
        assert state.iter == 8 and np.isclose(state.bytes_report()["mean_payload_bytes_per_step"],
                                              state.total["payload_bytes"] / 8)
    finally:
        dist.destroy_process_group()
