"""The worker's side of the gRPC stream: typed messages in and out (``gradwire.protocol``)."""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwire import protocol
from gradwire.channel import client_channel, flow_control_options
from gradwire.protocol import SERVICE_NAME, TRAIN_METHOD

log = logging.getLogger("gradwire.worker")
_CLOSE = object()


def open_channel(target: str, max_message_mb: int, **security: str) -> grpc.Channel:
    """``security``: tls_ca, tls_cert, tls_key, token, server_name (see gradwire/channel.py's client_channel)."""
    limit = max_message_mb * 2**20
    return client_channel(
        target,
        **security,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 0),
            *flow_control_options(limit),
        ],
    )


def wait_for_server(channel: grpc.Channel, timeout_s: float) -> None:
    """Wait until the PS's health service says SERVING, with exponential backoff and jitter.

    A health Check with wait_for_ready rather than grpc.channel_ready_future: the future's
    connectivity-polling thread outlives it and raises "Channel closed!" when the channel is
    closed later (grpc/grpc#29848), and SERVING also says the PS is ready, not just listening.
    """
    deadline = time.monotonic() + timeout_s
    stub = health_pb2_grpc.HealthStub(channel)
    delay = 0.2
    while True:
        attempt = min(delay * 4, max(0.1, deadline - time.monotonic()))
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=attempt,
                               wait_for_ready=True)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            reason = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            reason = err.code().name
        if time.monotonic() >= deadline:
            raise TimeoutError(f"parameter server not ready within {timeout_s:.0f} s (last: {reason})")
        log.info("parameter server not ready yet (%s); retrying in %.1f s", reason, delay)
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 5.0)


class TrainStream:
    """A bidirectional Train stream: ``send`` typed messages, ``receive`` the typed replies.

    ``receive`` raises ``protocol.MalformedMessage`` for a reply that parses but breaks the
    protocol's rules (a model delta's tensor without a name, say).
    """

    def __init__(self, channel: grpc.Channel):
        self._outbox: queue.Queue = queue.Queue()
        method = channel.stream_stream(
            TRAIN_METHOD,
            request_serializer=None,  # send() serializes: the bytes it counts are the bytes sent
            response_deserializer=None,  # receive() parses: a model as views of the bytes (protocol)
        )
        self._call = method(self._requests())
        self.sent_bytes = 0

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._outbox.get()
            if item is _CLOSE:
                return
            yield item

    def send(self, message: protocol.WorkerMessage) -> int:
        """Serialize and queue a message; returns its serialized size (``len`` of the bytes sent:
        ``ByteSize()`` would cost a second serialization)."""
        data = protocol.worker_message_to_bytes(message)
        self.sent_bytes += len(data)
        self._outbox.put(data)
        return len(data)

    def receive(self) -> protocol.ServerMessage | None:
        """The next reply; None when the PS closed the stream. A RoundResult's model is read-only
        views of the received bytes (``protocol.server_message_from_wire``): no copy until the
        trainer loads it."""
        data = next(self._call, None)
        return protocol.server_message_from_wire(data) if data is not None else None

    def close(self) -> None:
        self._outbox.put(_CLOSE)

    def cancel(self) -> None:
        self._call.cancel()
