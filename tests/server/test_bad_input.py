"""Every kind of bad input is refused with a gRPC status and a reason; nothing is lost.

Each test: two workers join a real PS on loopback; worker B sends one bad
message and must get the expected status; worker A's valid update then closes
the round alone, and the new global model must be exactly θ0 − lr·g_A (the first
SGD-with-momentum step), proving the bad message never touched it. The PS must
also keep serving: Status answers, and B can rejoin with its old rank.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from gradwire import protocol
from gradwire.v1 import exchange_pb2 as pb
from tests.conftest import ManualWorker


def _grads(worker: ManualWorker, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in worker.model.items()}


def _two_workers(make_server, manual_workers, raw_b: bool = False, **overrides):
    running = make_server(rounds=50, **overrides)
    target = f"127.0.0.1:{running.port}"
    a, b = manual_workers(target), manual_workers(target, raw=raw_b)
    # Both hellos must be in before either Welcome comes back (the PS waits for 2).
    hello_b = pb.WorkerMessage(hello=pb.Hello(protocol=protocol.PROTOCOL, requested_worker_id="B", codecs=["dense"]))
    a.send(pb.WorkerMessage(hello=pb.Hello(protocol=protocol.PROTOCOL, requested_worker_id="A", codecs=["dense"])))
    b.send(hello_b.SerializeToString() if raw_b else hello_b)
    for w in (a, b):
        reply = w.recv()
        w.welcome = reply.welcome
        w.model = protocol.model_from_proto(reply.welcome.model)
    assert {a.welcome.rank, b.welcome.rank} == {0, 1}
    return running, target, a, b


def _expect_rejection(worker: ManualWorker, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        worker.recv()
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    for word in words:
        assert word.lower() in details.lower(), details
    return details


def _assert_untouched_and_serving(running, target, a: ManualWorker, manual_workers, lr: float = 0.05):
    theta0 = dict(a.model)
    g = _grads(a)
    a.send(a.dense_update(g, 0))
    reply = a.recv()
    assert reply.WhichOneof("body") == "round_result"
    assert reply.round_result.round == 1 and reply.round_result.update_aggregated
    theta1 = protocol.model_from_proto(reply.round_result.model)
    for name in theta0:
        np.testing.assert_allclose(theta1[name], theta0[name] - np.float32(lr) * g[name], rtol=0, atol=1e-6)
    status = running.engine.snapshot()
    assert status.rounds[0].workers == 1
    # The PS keeps serving: B rejoins (same id, same rank) at the current round.
    b2 = manual_workers(target)
    welcome = b2.hello("B").welcome
    assert welcome.round == 1 and welcome.rank in (0, 1)
    return status


def test_malformed_bytes_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers, raw_b=True)
    b.send(b"\xff\xff\xff\xff garbage that is not a protobuf")
    _expect_rejection(b, grpc.StatusCode.INVALID_ARGUMENT, "malformed")
    _assert_untouched_and_serving(running, target, a, manual_workers)


def test_malformed_update_after_hello(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers)
    b.send(pb.WorkerMessage())  # neither update nor report
    _expect_rejection(b, grpc.StatusCode.INVALID_ARGUMENT, "expected an Update")
    _assert_untouched_and_serving(running, target, a, manual_workers)


def test_truncated_payload_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers)
    msg = b.dense_update(_grads(b, 2), 0)
    msg.update.tensors[0].payload = msg.update.tensors[0].payload[:-3]
    b.send(msg)
    _expect_rejection(b, grpc.StatusCode.INVALID_ARGUMENT, "does not decode", "expected")
    _assert_untouched_and_serving(running, target, a, manual_workers)


def test_oversized_message_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers, max_message_mb=1)
    msg = b.dense_update(_grads(b, 3), 0)
    msg.update.tensors[0].payload = b"\0" * (2 * 2**20)
    b.send(msg)
    _expect_rejection(b, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")
    _assert_untouched_and_serving(running, target, a, manual_workers)


def test_unknown_codec_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers)
    b.send(b.dense_update(_grads(b, 4), 0, codec="nosuchcodec:bits=3"))
    _expect_rejection(b, grpc.StatusCode.INVALID_ARGUMENT, "nosuchcodec", "dense")
    _assert_untouched_and_serving(running, target, a, manual_workers)


def test_unsupported_codec_at_hello(make_server, manual_workers):
    running = make_server(workers=1, rounds=5)
    w = manual_workers(f"127.0.0.1:{running.port}")
    w.send(pb.WorkerMessage(hello=pb.Hello(protocol=protocol.PROTOCOL, requested_worker_id="X", codecs=["fp16"])))
    _expect_rejection(w, grpc.StatusCode.FAILED_PRECONDITION, "does not support")


def test_wrong_protocol_rejected(make_server, manual_workers):
    running = make_server(workers=1, rounds=5)
    w = manual_workers(f"127.0.0.1:{running.port}")
    w.send(pb.WorkerMessage(hello=pb.Hello(protocol="gradwire.v0", requested_worker_id="X")))
    _expect_rejection(w, grpc.StatusCode.FAILED_PRECONDITION, "gradwire.v0")


def test_shape_mismatch_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers)
    msg = b.dense_update(_grads(b, 5), 0)
    t = msg.update.tensors[0]
    t.shape[:] = [t.shape[0] + 1] + list(t.shape[1:])
    b.send(msg)
    _expect_rejection(b, grpc.StatusCode.INVALID_ARGUMENT, "shape mismatch")
    _assert_untouched_and_serving(running, target, a, manual_workers)


def test_missing_tensor_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers)
    msg = b.dense_update(_grads(b, 6), 0)
    del msg.update.tensors[-1]
    b.send(msg)
    _expect_rejection(b, grpc.StatusCode.INVALID_ARGUMENT, "missing")
    _assert_untouched_and_serving(running, target, a, manual_workers)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_rejected(make_server, manual_workers, bad):
    running, target, a, b = _two_workers(make_server, manual_workers)
    g = _grads(b, 7)
    first = next(iter(g))
    g[first].flat[3] = bad
    b.send(b.dense_update(g, 0))
    _expect_rejection(b, grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf")
    _assert_untouched_and_serving(running, target, a, manual_workers)


def test_future_round_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers)
    b.send(b.dense_update(_grads(b, 8), 7))
    _expect_rejection(b, grpc.StatusCode.FAILED_PRECONDITION, "future")
    _assert_untouched_and_serving(running, target, a, manual_workers)


def test_stale_round_rejected(make_server, manual_workers):
    """A straggler: the round closes without it (timeout), then its update arrives."""
    running, target, a, b = _two_workers(make_server, manual_workers, round_timeout_s=1.0)
    ga = _grads(a, 9)
    a.send(a.dense_update(ga, 0))
    assert a.recv().round_result.round == 1  # closed at the timeout without B
    assert running.engine.snapshot().rounds[0].stragglers == 1
    b.send(b.dense_update(_grads(b, 10), 0))
    _expect_rejection(b, grpc.StatusCode.FAILED_PRECONDITION, "stale")
    assert running.engine.snapshot().rounds[0].workers == 1


def test_duplicate_update_in_round_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers)
    msg = b.dense_update(_grads(b, 11), 0)
    b.send(msg)
    b.send(msg)  # the first is filed; the second arrives while B waits for the round
    a.send(a.dense_update(_grads(a, 12), 0))
    assert a.recv().round_result.round == 1
    assert b.recv().round_result.round == 1
    # Now B's second copy is handled: it is for round 0, which has closed.
    _expect_rejection(b, grpc.StatusCode.FAILED_PRECONDITION, "stale")


def test_duplicate_worker_id_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers)
    dup = manual_workers(target)
    dup.send(pb.WorkerMessage(hello=pb.Hello(protocol=protocol.PROTOCOL, requested_worker_id="A", codecs=["dense"])))
    _expect_rejection(dup, grpc.StatusCode.ALREADY_EXISTS, "already connected")
    # The original A is unaffected and B still takes part.
    b.send(b.dense_update(_grads(b, 13), 0))
    a.send(a.dense_update(_grads(a, 14), 0))
    assert a.recv().round_result.update_aggregated
    assert running.engine.snapshot().rounds[0].workers == 2


def test_diverged_train_loss_rejected(make_server, manual_workers):
    running, target, a, b = _two_workers(make_server, manual_workers)
    msg = b.dense_update(_grads(b, 15), 0)
    msg.update.train_loss = float("nan")
    b.send(msg)
    _expect_rejection(b, grpc.StatusCode.INVALID_ARGUMENT, "train_loss")
    _assert_untouched_and_serving(running, target, a, manual_workers)
