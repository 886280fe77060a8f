"""The worker's side of the gRPC stream."""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Iterator

import grpc

from gradwire.v1 import exchange_pb2 as pb
from server.servicer import SERVICE_NAME

log = logging.getLogger("gradwire.worker")
_CLOSE = object()


def open_channel(target: str, max_message_mb: int) -> grpc.Channel:
    limit = max_message_mb * 2**20
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 0),
        ],
    )


def wait_for_server(channel: grpc.Channel, timeout_s: float) -> None:
    """Wait until the channel connects, with exponential backoff and jitter."""
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            grpc.channel_ready_future(channel).result(timeout=min(delay * 4, max(0.1, deadline - time.monotonic())))
            return
        except grpc.FutureTimeoutError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"parameter server not reachable within {timeout_s:.0f} s") from None
            log.info("parameter server not up yet; retrying in %.1f s", delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)


class TrainStream:
    """A bidirectional Train stream: ``send`` messages, iterate the replies."""

    def __init__(self, channel: grpc.Channel):
        self._outbox: queue.Queue = queue.Queue()
        method = channel.stream_stream(
            f"/{SERVICE_NAME}/Train",
            request_serializer=pb.WorkerMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString,
        )
        self._call = method(self._requests())
        self.sent_bytes = 0

    def _requests(self) -> Iterator[pb.WorkerMessage]:
        while True:
            item = self._outbox.get()
            if item is _CLOSE:
                return
            yield item

    def send(self, message: pb.WorkerMessage) -> int:
        nbytes = message.ByteSize()
        self.sent_bytes += nbytes
        self._outbox.put(message)
        return nbytes

    def receive(self) -> pb.ServerMessage | None:
        return next(self._call, None)

    def close(self) -> None:
        self._outbox.put(_CLOSE)

    def cancel(self) -> None:
        self._call.cancel()
