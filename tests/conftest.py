"""Shared fixtures: a real parameter server on a loopback port, and hand-driven workers."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import replace

import grpc
import numpy as np
import pytest

from gradwire import protocol
from gradwire.compressors.base import Encoded, TensorSpec
from gradwire.protocol import SERVICE_NAME
from gradwire.server.app import RunningServer, start_server
from gradwire.server.config import ServerConfig
from gradwire.v1 import exchange_pb2 as pb

_CLOSE = object()

# Small, quick runs: the embedded digits task, a few rounds, generous timeouts so
# that a slow CI machine never turns a worker into a straggler by accident.
BASE_CONFIG = ServerConfig(address="127.0.0.1:0", workers=2, rounds=3, codec="dense", eval_every=1,
                           round_timeout_s=60.0, start_timeout_s=60.0, report_timeout_s=5.0)


def _run_workers(port: int, n: int, prefix: str = "w") -> list:
    """Run n real workers (the `gradwire worker` loop) against a PS on 127.0.0.1:port, in threads;
    returns their WorkerResults in order."""
    from gradwire.worker.config import WorkerConfig
    from gradwire.worker.loop import Worker

    results: list = [None] * n

    def run(i):
        results[i] = Worker(WorkerConfig(server=f"127.0.0.1:{port}", worker_id=f"{prefix}{i}", connect_timeout_s=30)).run()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.fixture
def run_workers():
    """``run_workers(port, n, prefix="w")``: n real workers against a loopback PS (see _run_workers)."""
    return _run_workers


@pytest.fixture
def make_server():
    """Factory: start a real PS on 127.0.0.1 with an OS-chosen port; stopped at teardown."""
    started: list[RunningServer] = []

    def factory(**overrides) -> RunningServer:
        running = start_server(replace(BASE_CONFIG, **overrides))
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop(grace=None)


class ManualWorker:
    """A worker driven message by message, to test what the PS does with each one."""

    def __init__(self, target: str, raw: bool = False):
        self.channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.outbox: queue.Queue = queue.Queue()
        serializer = (lambda b: b) if raw else pb.WorkerMessage.SerializeToString
        call = self.channel.stream_stream(
            f"/{SERVICE_NAME}/Train", request_serializer=serializer,
            response_deserializer=pb.ServerMessage.FromString,
        )
        self.replies = call(self._requests())
        self.welcome: pb.Welcome | None = None
        self.model: dict[str, np.ndarray] = {}

    def _requests(self) -> Iterator:
        while True:
            item = self.outbox.get()
            if item is _CLOSE:
                return
            yield item

    def send(self, message) -> None:
        self.outbox.put(message)

    def recv(self, timeout: float = 30.0) -> pb.ServerMessage:
        result: list = []

        def pull():
            try:
                result.append(next(self.replies))
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                result.append(exc)

        t = threading.Thread(target=pull, daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            raise TimeoutError("no reply from the PS")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def hello(self, worker_id: str = "", codecs=("dense",)) -> pb.ServerMessage:
        self.send(pb.WorkerMessage(hello=pb.Hello(protocol=protocol.PROTOCOL, requested_worker_id=worker_id, codecs=list(codecs))))
        reply = self.recv()
        if reply.WhichOneof("body") == "welcome":
            self.welcome = reply.welcome
            self.model = protocol.model_from_proto(reply.welcome.model)
        return reply

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, tuple(a.shape)) for n, a in self.model.items()]

    def dense_update(self, grads: dict[str, np.ndarray], round_: int, codec: str = "dense") -> pb.WorkerMessage:
        tensors = [
            protocol.encoded_to_proto(Encoded(codec, s, np.ascontiguousarray(grads[s.name], dtype="<f4").tobytes()))
            for s in self.specs()
        ]
        return pb.WorkerMessage(update=pb.Update(round=round_, tensors=tensors, train_loss=1.0, num_examples=1))

    def close(self) -> None:
        self.outbox.put(_CLOSE)
        self.channel.close()


@pytest.fixture
def manual_workers():
    made: list[ManualWorker] = []

    def factory(target: str, raw: bool = False) -> ManualWorker:
        w = ManualWorker(target, raw)
        made.append(w)
        return w

    yield factory
    for w in made:
        w.close()
