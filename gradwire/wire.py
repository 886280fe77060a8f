"""Conversions between the codec dataclasses and ``gradwire.v1`` protobuf messages.

The one place (with the servicer and the worker client) that touches generated
code; everything else uses ``compressors.base.Encoded`` and numpy arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from gradwire.compressors.base import Encoded, TensorSpec
from gradwire.v1 import exchange_pb2 as pb

PROTOCOL = "gradwire.v1"
# Nested residuals (TPC around a codec) are one level deep in practice; a bound
# keeps a hostile message from recursing without end.
MAX_RESIDUAL_DEPTH = 4


class MalformedMessage(ValueError):
    """A protobuf message that parses but breaks the protocol's rules."""


def encoded_to_proto(e: Encoded) -> pb.EncodedTensor:
    msg = pb.EncodedTensor(
        name=e.spec.name,
        shape=list(e.spec.shape),
        dtype=e.spec.dtype,
        codec_spec=e.codec,
        payload=e.payload,
        predictor_coefficients=e.coefficients,
    )
    if e.residual is not None:
        msg.residual.CopyFrom(encoded_to_proto(e.residual))
    return msg


def encoded_from_proto(msg: pb.EncodedTensor, depth: int = 0) -> Encoded:
    if depth > MAX_RESIDUAL_DEPTH:
        raise MalformedMessage(f"residuals nested deeper than {MAX_RESIDUAL_DEPTH}")
    if not msg.name:
        raise MalformedMessage("an EncodedTensor has no name")
    if any(d < 0 for d in msg.shape):
        raise MalformedMessage(f"tensor {msg.name!r} has a negative dimension {list(msg.shape)}")
    if not msg.codec_spec:
        raise MalformedMessage(f"tensor {msg.name!r} names no codec")
    residual = encoded_from_proto(msg.residual, depth + 1) if msg.HasField("residual") else None
    return Encoded(
        codec=msg.codec_spec,
        spec=TensorSpec(msg.name, tuple(int(d) for d in msg.shape), msg.dtype or "float32"),
        payload=bytes(msg.payload),
        coefficients=bytes(msg.predictor_coefficients),
        residual=residual,
    )


def model_to_proto(params: Mapping[str, np.ndarray]) -> pb.Model:
    return pb.Model(
        tensors=[
            pb.Tensor(name=k, shape=list(v.shape), dtype="float32", data=np.ascontiguousarray(v, dtype="<f4").tobytes())
            for k, v in params.items()
        ]
    )


def model_from_proto(msg: pb.Model) -> dict[str, np.ndarray]:
    out = {}
    for t in msg.tensors:
        if t.dtype != "float32":
            raise MalformedMessage(f"model tensor {t.name!r} has dtype {t.dtype!r}, expected float32")
        arr = np.frombuffer(t.data, dtype="<f4")
        if arr.size != int(np.prod(t.shape, dtype=np.int64)):
            raise MalformedMessage(f"model tensor {t.name!r}: {arr.size} values for shape {list(t.shape)}")
        out[t.name] = arr.reshape(tuple(t.shape)).astype(np.float32)
    return out


def counters_to_proto(c: Mapping[str, Any] | None) -> pb.InterfaceCounters:
    if not c:
        return pb.InterfaceCounters()
    return pb.InterfaceCounters(interface=str(c["interface"]), tx_bytes=int(c["tx_bytes"]), rx_bytes=int(c["rx_bytes"]))


def counters_from_proto(msg: pb.InterfaceCounters) -> dict[str, object] | None:
    if not msg.interface:
        return None
    return {"interface": msg.interface, "tx_bytes": int(msg.tx_bytes), "rx_bytes": int(msg.rx_bytes)}


def payload_bytes(tensors: Iterable[Encoded]) -> int:
    return sum(t.payload_bytes for t in tensors)
