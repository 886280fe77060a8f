"""Querying a running PS: the Status RPC and the gRPC health service."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwire import protocol
from gradwire.protocol import Status


def fetch_status(channel: grpc.Channel, timeout: float = 5.0) -> Status:
    method = channel.unary_unary(
        protocol.STATUS_METHOD,
        request_serializer=protocol.status_request_to_bytes,
        response_deserializer=protocol.status_from_bytes,
    )
    return method(None, timeout=timeout)


def status_as_dict(status: Status) -> dict:
    return protocol.status_to_dict(status)


def is_serving(address: str, service: str = "", timeout: float = 3.0, channel: grpc.Channel | None = None) -> bool:
    """Health check over ``channel`` (a TLS one for a TLS PS), or a new insecure channel to ``address``."""
    if channel is None:
        with grpc.insecure_channel(address) as own:
            return is_serving(address, service, timeout, own)
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING
