"""The PS's and worker's per-round work without extra copies: the same results as before.

Kept buffers (the mean, the rollback guard) must give the same numbers as fresh ones, round
after round; zero-copy views of received bytes must never alias memory that changes later.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradwire import codecs, protocol
from gradwire.compressors.base import RoundContext, TensorSpec
from gradwire.compressors.registry import create_codec
from gradwire.compressors.update import UpdateDecoder, UpdateEncoder
from gradwire.local import load_parameters
from gradwire.server.aggregation import ServerOptimizer, mean_update
from gradwire.server.robust import ModelGuard, robust_step


def _reference_mean(updates):
    """The mean as it was computed before buffers were kept: copy the first, add the others, scale."""
    ranks = sorted(updates)
    out = {n: np.array(a, dtype=np.float32, copy=True) for n, a in updates[ranks[0]].items()}
    for r in ranks[1:]:
        for n, a in updates[r].items():
            out[n] += a
    for n in out:
        out[n] *= np.float32(1.0 / len(ranks))
    return out


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_mean_into_kept_buffers_is_bitwise_the_old_mean_round_after_round(workers):
    rng = np.random.default_rng(workers)
    kept: dict[str, np.ndarray] = {}
    first_buffers = None
    for _ in range(3):
        updates = {r: {"a": rng.standard_normal((7, 5)).astype(np.float32),
                       "b": rng.standard_normal(11).astype(np.float32)} for r in range(workers)}
        before = {r: {n: a.copy() for n, a in u.items()} for r, u in updates.items()}
        got = mean_update(updates, kept)
        want = _reference_mean(updates)
        for n in want:
            assert got[n].dtype == np.float32 and np.array_equal(got[n], want[n])  # bitwise
        assert all(np.array_equal(updates[r][n], before[r][n]) for r in updates for n in updates[r])  # inputs untouched
        if first_buffers is None:
            first_buffers = {n: kept[n] for n in kept}
        assert all(kept[n] is first_buffers[n] for n in kept)  # no new allocation after the first round
    assert mean_update({0: {"a": np.ones(3, np.float32)}})["a"].flags.writeable


def test_mean_reads_read_only_updates():
    a = np.frombuffer(np.arange(4, dtype=np.float32).tobytes(), dtype=np.float32)
    assert not a.flags.writeable
    out = mean_update({0: {"w": a}, 1: {"w": a}}, {})
    assert np.array_equal(out["w"], np.arange(4, dtype=np.float32))


def _momentum(opt: ServerOptimizer) -> list[torch.Tensor]:
    return [s["momentum_buffer"].clone() for s in opt.opt.state.values()]


def test_rollback_restores_the_last_good_step_with_kept_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = ServerOptimizer(model, lr=10.0, momentum=0.9, weight_decay=0.0, schedule="cosine", total_rounds=10)
    grads = [{n: np.full(tuple(p.shape), 0.01 * (k + 1), np.float32) for n, p in model.named_parameters()}
             for k in range(3)]
    assert not robust_step({0: grads[0]}, {0: "w0"}, opt, model, 0, "mean", 0.0, 0.2).refused
    # The rollback buffers exist from the first step on (model and momentum), written once then.
    guard = opt.guard
    assert isinstance(guard, ModelGuard) and guard.params
    kept = dict(guard.params)
    kept_momenta = [s["momentum_buffer"] for s in guard.optimizer_state["state"].values()]
    after_first = {n: p.detach().clone() for n, p in model.named_parameters()}
    for r in (1, 2):
        assert not robust_step({0: grads[r]}, {0: "w0"}, opt, model, r, "mean", 0.0, 0.2).refused
    # steps proven finite take no rollback copy (ServerOptimizer.step_bound)
    assert opt.guard is guard and all(torch.equal(guard.params[n], after_first[n]) for n in kept)
    good = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = _momentum(opt)
    huge = {n: np.full(tuple(p.shape), 3e38, np.float32) for n, p in model.named_parameters()}
    # a huge but finite update: no proof, so the guard copies into the buffers it has, the step
    # overflows and is rolled back: the peer's update allocated no model-sized buffer
    assert robust_step({0: huge}, {0: "w0"}, opt, model, 3, "mean", 0.0, 0.2).refused
    assert opt.guard is guard and all(guard.params[n] is kept[n] for n in kept)
    assert [s["momentum_buffer"] for s in guard.optimizer_state["state"].values()] == kept_momenta
    step = robust_step({0: huge}, {0: "w0"}, opt, model, 3, "mean", 0.0, 0.2)
    assert step.refused
    assert opt.guard is guard and all(guard.params[n] is kept[n] for n in kept)  # the same buffers each round
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), good[n])
    assert all(torch.equal(a, b) for a, b in zip(_momentum(opt), momentum, strict=True))
    # the restored momentum is the optimizer's own: the next save must not write into it
    restored = [s["momentum_buffer"] for s in opt.opt.state.values()]
    assert not any(t.data_ptr() == k.data_ptr() for t in restored for k in guard.params.values())
    assert not robust_step({0: grads[0]}, {0: "w0"}, opt, model, 4, "mean", 0.0, 0.2).refused
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_guard_saved_twice_restores_the_second_state():
    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    sgd.step()
    guard = ModelGuard()
    guard.save(model, sgd.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    sgd.step()
    second = {n: p.detach().clone() for n, p in model.named_parameters()}
    second_momentum = [s["momentum_buffer"].clone() for s in sgd.state.values()]
    guard.save(model, sgd.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)
    sgd.step()
    guard.restore(model, sgd)
    assert all(torch.equal(p.detach(), second[n]) for n, p in model.named_parameters())
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(sgd.state.values(), second_momentum, strict=True))


def test_dense_decoding_is_a_read_only_view_of_immutable_bytes_and_copies_mutable_ones():
    codec = create_codec("dense")
    spec = TensorSpec("w", (6,))
    ctx = RoundContext(round=0, rank=0, seed=0, num_workers=1)
    x = np.arange(6, dtype=np.float32)
    (view,) = UpdateEncoder(codec, [spec]).encode({"w": x}, ctx)  # the payload is a view of x
    # x's owner may write to it: decoding a view of it copies
    assert not np.shares_memory(UpdateDecoder(codec, [spec]).decode([view], ctx)["w"], x)
    encoded = type(view)(view.codec, spec, bytes(view.payload))  # as received: immutable bytes
    out = UpdateDecoder(codec, [spec]).decode([encoded], ctx)["w"]
    assert np.array_equal(out, x) and not out.flags.writeable  # no copy; nobody can write through it
    with pytest.raises(ValueError):
        out[0] = 1.0
    mutable = bytearray(encoded.payload)
    decoded = codec.make_decoder().decode(type(encoded)(encoded.codec, spec, mutable), ctx)  # type: ignore[arg-type]
    mutable[:4] = np.float32(99.0).tobytes()  # the owner reuses its buffer: the decoded tensor must not change
    assert np.array_equal(decoded, x)


def test_the_public_decode_returns_arrays_the_caller_may_write():
    x = np.arange(5, dtype=np.float32)
    out = codecs.decode(codecs.encode(x, "dense"))
    out += 1  # its own memory, not a view of the frame
    assert np.array_equal(out, x + 1)
    t = codecs.decode(codecs.encode(torch.from_numpy(x.copy()), "dense"))
    t.add_(1)
    assert torch.equal(t, torch.from_numpy(x + 1))


def test_a_received_model_is_read_only_and_loads_into_the_model():
    model = torch.nn.Linear(3, 2)
    params = {n: np.full(tuple(p.shape), 0.25 * (i + 1), np.float32) for i, (n, p) in enumerate(model.named_parameters())}
    data = protocol.server_message_to_bytes(protocol.RoundResult(1, protocol.Directive(), True, 1, model=params))
    received = protocol.server_message_from_bytes(data).model
    assert received is not None and all(not a.flags.writeable for a in received.values())
    load_parameters(model, received)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), torch.from_numpy(params[n]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training writes the model's own memory, never the received bytes
    assert all(np.array_equal(received[n], params[n]) for n in params)


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.9, 0.0), (0.0, 0.0), (0.9, 5e-4)])
def test_the_servers_sgd_steps_the_same_bits_as_torchs_default_sgd(momentum, weight_decay):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    twin.load_state_dict(model.state_dict())
    ours = ServerOptimizer(model, 0.1, momentum, weight_decay, "cosine", 5)
    reference = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    rng = np.random.default_rng(0)
    for r in range(4):
        grads = {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in model.named_parameters()}
        ours.step(grads, r)
        for group in reference.param_groups:
            group["lr"] = ours.lr_at(r)
        for n, p in twin.named_parameters():
            p.grad = torch.from_numpy(grads[n])
        reference.step()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("codec", ["dense", "fp16", "topk:ratio=0.5"])
def test_the_update_norm_comes_from_the_decodings_one_read_of_each_tensor(codec, monkeypatch):
    """decode_with_norm's norm is update_norm's, bit for bit, from one squared-norm read per tensor
    (the read that also proves the tensor finite), with no finiteness read beside it."""
    from gradwire.compressors import update as update_module
    from gradwire.server.robust import update_norm

    specs = [TensorSpec("w", (40, 30)), TensorSpec("b", (30,))]
    rng = np.random.default_rng(5)
    grads = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in specs}
    ctx = RoundContext(round=0, rank=0, seed=0, num_workers=1)
    encoded = [protocol.encoded_from_bytes(protocol.encoded_to_bytes(e))
               for e in UpdateEncoder(create_codec(codec), specs).encode(grads, ctx)]
    reads = []
    real = update_module.squared_norm
    monkeypatch.setattr(update_module, "squared_norm", lambda a: reads.append(a.size) or real(a))
    decoded, norm = UpdateDecoder(create_codec(codec), specs).decode_with_norm(encoded, ctx)
    assert reads == [s.numel for s in specs]
    assert norm == update_norm(decoded)
    bad = np.array(grads["b"])
    bad[3] = np.inf
    payload = bytearray(encoded[1].payload)
    if codec == "dense":  # a non-finite entry is refused by the same read
        payload[12:16] = bad[3:4].tobytes()
        with pytest.raises(update_module.InvalidUpdate, match="NaN or Inf"):
            UpdateDecoder(create_codec(codec), specs).decode_with_norm(
                [encoded[0], type(encoded[1])(encoded[1].codec, specs[1], bytes(payload))], ctx)


def _twin_models(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    return model, twin


def test_a_proven_step_skips_the_rollback_copy_and_steps_the_same_bits(monkeypatch):
    model, twin = _twin_models(1)
    opt = ServerOptimizer(model, lr=0.5, momentum=0.9, weight_decay=1e-3, schedule="cosine", total_rounds=8)
    reference = ServerOptimizer(twin, lr=0.5, momentum=0.9, weight_decay=1e-3, schedule="cosine", total_rounds=8)
    saves: list[int] = []
    save = ModelGuard.save
    monkeypatch.setattr(ModelGuard, "save", lambda self, *a: (saves.append(r), save(self, *a)))
    rng = np.random.default_rng(2)
    for r in range(6):
        updates = {k: {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in model.named_parameters()}
                   for k in range(3)}
        assert not robust_step(updates, {k: f"w{k}" for k in updates}, opt, model, r, "mean", 10.0, 0.2).refused
        # one copy, at the first step (the rollback buffers, server/robust.py); none after
        assert saves == [0], saves
        reference.step(mean_update(updates), r)
        for (_, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
            assert torch.equal(a, b)  # bitwise: the proof changes nothing but the copies


def test_step_bound_refuses_to_prove_a_step_that_may_overflow_and_measures_outside_writes():
    model, _ = _twin_models(3)
    opt = ServerOptimizer(model, lr=1.0, momentum=0.9, weight_decay=0.0, schedule="constant", total_rounds=8)
    ones = {n: np.ones(tuple(p.shape), np.float32) for n, p in model.named_parameters()}
    assert opt.step_bound(1.0, 0)
    opt.step(ones, 0)
    assert not opt.step_bound(3e38, 1)  # θ − lr·(μ·b + g) may pass float32's largest value
    assert not opt.step_bound(float("inf"), 1)
    assert opt.step_bound(1e30, 1)  # far from overflow: proven
    with torch.no_grad():  # written outside the optimizer: the kept bounds no longer hold
        next(iter(model.parameters())).fill_(3e38)
    assert not opt.step_bound(1e30, 1)  # measured again: |θ| is now 3e38


@pytest.mark.parametrize("scale", [1.0, 1e18, 1e36, 1e37, 3e37, 1e38])
def test_whatever_step_bound_proves_steps_finite(scale):
    """Soundness: a step step_bound proves leaves the model finite; the largest gradients take the
    guard path, whose rollback keeps the model finite anyway."""
    model, _ = _twin_models(4)
    opt = ServerOptimizer(model, lr=2.0, momentum=0.9, weight_decay=0.5, schedule="constant", total_rounds=8)
    rng = np.random.default_rng(5)
    for r in range(4):
        grad = {n: (rng.uniform(-1, 1, tuple(p.shape)) * scale).astype(np.float32) for n, p in model.named_parameters()}
        bound = max(float(np.abs(g).max()) for g in grad.values())
        if opt.step_bound(bound, r):
            opt.step(grad, r)
            assert all(torch.isfinite(p).all() for p in model.parameters())
            assert all(torch.isfinite(m).all() for m in _momentum(opt))
        else:
            robust_step({0: grad}, {0: "w0"}, opt, model, r, "mean", 0.0, 0.2)  # refused when it overflows
            assert all(torch.isfinite(p).all() for p in model.parameters())
