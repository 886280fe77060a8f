"""Querying a running PS: the Status RPC and the gRPC health service."""

from __future__ import annotations

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwire.v1 import exchange_pb2 as pb
from gradwire.v1 import exchange_pb2_grpc as pb_grpc


def fetch_status(channel: grpc.Channel, timeout: float = 5.0) -> pb.StatusResponse:
    return pb_grpc.GradientExchangeStub(channel).Status(pb.StatusRequest(), timeout=timeout)


def status_as_dict(status: pb.StatusResponse) -> dict:
    return json_format.MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def is_serving(address: str, service: str = "", timeout: float = 3.0, channel: grpc.Channel | None = None) -> bool:
    """Health check over ``channel`` (a TLS one for a TLS PS), or a new insecure channel to ``address``."""
    own = channel is None
    channel = grpc.insecure_channel(address) if own else channel
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError:
        return False
    finally:
        if own:
            channel.close()
    return resp.status == health_pb2.HealthCheckResponse.SERVING
