"""TPC / LAG resync through a real parameter server on loopback (docs/algorithms.md §0).

Two hand-driven workers run the real gRPC protocol against a real PS with a
stateful predictive codec. After every round the worker encoder's history and
the PS decoder's history for that worker must be bitwise identical. Worker B is
then forced to reconnect twice:

1. the PS rejects a corrupted update (one coefficient byte too many) and closes the
   round without B; B reconnects with a fresh encoder, its first update is a
   full update and both histories match again;
2. B disconnects, the PS aggregates a round without it, and B comes back with
   its *old* encoder state (as a worker that missed the reset would): the PS
   refuses it with a history-digest mismatch instead of diverging silently;
   B then resets and the pair is identical again.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from gradwire import protocol
from gradwire.compressors.base import RoundContext, TensorSpec
from gradwire.compressors.registry import available_codecs, create_codec
from gradwire.compressors.update import MODEL_TENSOR_NAME, UpdateEncoder
from gradwire.server.app import start_server
from gradwire.server.config import ServerConfig
from gradwire.worker.client import TrainStream, open_channel, wait_for_server


class Client:
    """A worker that speaks the real protocol with gradients we choose."""

    def __init__(self, target: str, worker_id: str, seed: int):
        self.target = target
        self.worker_id = worker_id
        self.rng = np.random.default_rng(seed)
        self.channel = open_channel(target, 64)
        wait_for_server(self.channel, 30)
        self.stream: TrainStream | None = None
        self.encoder: UpdateEncoder | None = None
        self.model: dict[str, np.ndarray] = {}
        self.directions: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def send_hello(self) -> None:
        self.stream = TrainStream(self.channel)
        self.stream.send(protocol.Hello(
            protocol=protocol.PROTOCOL, requested_worker_id=self.worker_id, codecs=tuple(available_codecs())))

    def receive_welcome(self, keep_encoder: bool = False) -> protocol.Welcome:
        reply = self.stream.receive()
        assert isinstance(reply, protocol.Welcome), reply
        self.welcome = reply
        self.model = reply.model
        self.round = reply.round
        self.workers = reply.workers
        specs = [TensorSpec(n, tuple(a.shape)) for n, a in self.model.items()]
        if not keep_encoder:  # a new session is a resync: fresh codec state
            self.encoder = UpdateEncoder(create_codec(reply.codec_spec), specs)
        self.encoder.model_received(self.model)  # the update layer tracks the model's moves (LAG trigger)
        return reply

    def gradients(self, round_: int) -> dict[str, np.ndarray]:
        out = {}
        for name, arr in self.model.items():
            if name not in self.directions:
                self.directions[name] = (self.rng.standard_normal(arr.shape), self.rng.standard_normal(arr.shape))
            a, b = self.directions[name]
            g = 0.02 * (np.cos(0.3 * round_) * a + np.sin(0.3 * round_) * b)
            out[name] = (g + 0.002 * self.rng.standard_normal(arr.shape)).astype(np.float32)
        return out

    def ctx(self) -> RoundContext:
        return RoundContext(round=self.round, rank=self.welcome.rank, seed=self.welcome.task.seed,
                            num_workers=max(1, self.workers))

    def send_update(self, corrupt: bool = False):
        msgs = self.encoder.encode(self.gradients(self.round), self.ctx())
        if corrupt:
            msgs = [dataclasses.replace(m, coefficients=m.coefficients + b"\0") for m in msgs]
        self.stream.send(protocol.Update(round=self.round, tensors=tuple(msgs), train_loss=1.0, num_examples=1))
        return msgs

    def receive_result(self) -> protocol.RoundResult:
        reply = self.stream.receive()
        assert isinstance(reply, protocol.RoundResult), reply
        self.model = reply.model
        self.encoder.model_received(self.model)
        self.round = reply.round
        self.workers = reply.workers
        return reply

    def leave(self) -> None:
        self.stream.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.channel.close()


def ps_decoder(running, worker_id: str):
    session = running.engine.sessions[worker_id]
    return session.decoder.decoder


def assert_in_sync(running, client: Client) -> None:
    enc = client.encoder.encoder
    dec = ps_decoder(running, client.worker_id)
    assert set(enc.cores) == set(dec.cores) == {MODEL_TENSOR_NAME}
    he, hd = enc.history(MODEL_TENSOR_NAME), dec.history(MODEL_TENSOR_NAME)
    assert he.shape == hd.shape and he.tobytes() == hd.tobytes()
    e_hist, d_hist = enc.cores[MODEL_TENSOR_NAME].history, dec.cores[MODEL_TENSOR_NAME].history
    assert (e_hist.digest, e_hist.pushes, e_hist.since) == (d_hist.digest, d_hist.pushes, d_hist.since)


def play_round(running, clients: list[Client]) -> list[protocol.RoundResult]:
    for c in clients:
        c.send_update()
    results = [c.receive_result() for c in clients]
    for c in clients:
        assert_in_sync(running, c)
    return results


@pytest.mark.parametrize(
    "codec",
    ["tpc:order=2,eps=0.5,max_stale=3,residual=dense", "lag:max_stale=3,alpha=0.5"],
)
def test_histories_identical_across_forced_reconnects(codec):
    running = start_server(ServerConfig(
        address="127.0.0.1:0", workers=2, rounds=15, codec=codec, eval_every=100,
        round_timeout_s=60.0, start_timeout_s=60.0, report_timeout_s=2.0,
    ))
    target = f"127.0.0.1:{running.port}"
    a, b = Client(target, "A", seed=1), Client(target, "B", seed=2)
    try:
        for c in (a, b):  # both hellos before either Welcome: the PS waits for 2
            c.send_hello()
        for c in (a, b):
            c.receive_welcome()
        for _ in range(4):  # rounds 0..3
            play_round(running, [a, b])

        # 1. round 4: the PS rejects B's corrupted update and closes the round without B
        a.send_update()
        b.send_update(corrupt=True)
        with pytest.raises(grpc.RpcError) as info:
            b.stream.receive()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "coefficient" in info.value.details()
        result = a.receive_result()
        assert result.round == 5 and result.update_aggregated
        assert_in_sync(running, a)
        b.send_hello()
        assert b.receive_welcome().round == 5
        assert ps_decoder(running, "B").cores == {} and b.encoder.encoder.cores == {}
        msgs_b = b.send_update()
        assert msgs_b[0].coefficients == b"" and msgs_b[0].residual is not None  # full update after a reset
        a.send_update()
        for c in (b, a):
            c.receive_result()
            assert_in_sync(running, c)
        for _ in range(3):  # rounds 6..8
            play_round(running, [a, b])

        # 2. round 9 without B; B returns with stale codec state and is refused
        b.leave()
        a.send_update()
        assert a.receive_result().round == 10
        assert_in_sync(running, a)
        b.send_hello()
        assert b.receive_welcome(keep_encoder=True).round == 10
        b.send_update()
        a.send_update()
        with pytest.raises(grpc.RpcError) as info:
            b.stream.receive()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "digest" in info.value.details()
        assert a.receive_result().round == 11
        b.send_hello()
        assert b.receive_welcome().round == 11
        for _ in range(3):  # rounds 11..13
            play_round(running, [a, b])
        rec_b = running.engine.records["B"]
        assert rec_b.sessions == 4 and rec_b.counters.rejected_messages == 2
        stats = a.encoder.stats()
        assert 0.0 < stats["trigger_rate"] <= 1.0
    finally:
        a.close()
        b.close()
        running.stop(grace=None)
