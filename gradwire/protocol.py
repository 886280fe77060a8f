"""The one protobuf boundary: every ``gradwire.v1`` message to and from plain typed objects.

Everything on both ends (the round engine, the worker loop, the downlink, the byte ledger and
report) works on the frozen dataclasses below; only this module, the PS's servicer
(``server/servicer.py``) and the worker's client (``worker/client.py``) touch generated code.
Conversions come in ``*_to_proto`` / ``*_from_proto`` pairs (the layout of Flower's serde
module). Byte counts stay measured on the serialized protobuf: whoever serializes a message
(the servicer, the client) reports its size beside the typed object (``Received``).

Constants both ends share (protocol version, service and method names, message size limit)
live here too, so the worker imports nothing from the PS.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from gradwire.compressors.base import Directive, Encoded, Payload, TensorSpec
from gradwire.counters import LinkCounters, RoundCounters, WorkerCounters, link_fields
from gradwire.v1 import exchange_pb2 as pb

PROTOCOL = "gradwire.v1"
SERVICE_NAME = "gradwire.v1.GradientExchange"
TRAIN_METHOD = f"/{SERVICE_NAME}/Train"
STATUS_METHOD = f"/{SERVICE_NAME}/Status"
DEFAULT_MAX_MESSAGE_MB = 64
# Nested residuals (TPC around a codec) are one level deep in practice; a bound
# keeps a hostile message from recursing without end.
MAX_RESIDUAL_DEPTH = 4
# What an EncodedTensor may carry besides its payload, predictor coefficients and residual: its
# name, shape, dtype and codec spec. Honest ones are well under 1 KiB (a parameter name, a few
# dimensions, a canonical spec of at most compressors.bounds.MAX_SPEC_CHARS characters).
MAX_TENSOR_HEADER_BYTES = 8 * 1024

Params = dict[str, np.ndarray]
# A network interface's byte counters: {"interface", "tx_bytes", "rx_bytes"}, or None.
InterfaceCounters = dict[str, object] | None


class MalformedMessage(ValueError):
    """A protobuf message that parses but breaks the protocol's rules."""


# ---------------------------------------------------------------- typed messages


@dataclass(frozen=True)
class TaskSpec:
    dataset: str = ""
    model: str = ""
    batch_size: int = 0  # 0: the full shard
    num_shards: int = 0
    shard_index: int = 0
    partition: str = ""
    dirichlet_alpha: float = 0.0
    seed: int = 0
    data_dir: str = ""
    task: str = ""  # a user task's reference (MODULE:FACTORY); empty for a built-in task
    local_steps: int = 0  # local optimizer steps per round (0 or 1: one gradient per round)
    local_lr: float = 0.0  # the workers' local learning rate when local_steps > 1


@dataclass(frozen=True)
class Hello:
    protocol: str
    requested_worker_id: str = ""
    codecs: tuple[str, ...] = ()
    hostname: str = ""
    interface_start: InterfaceCounters = None


@dataclass(frozen=True)
class Update:
    round: int
    tensors: tuple[Encoded, ...]
    train_loss: float
    num_examples: int
    compute_seconds: float = 0.0  # the local training alone (gradient or local steps)
    buffers: Params | None = None  # the worker's buffers (BatchNorm statistics), sent in full
    encode_seconds: float = 0.0  # the codec's encoding of this update
    previous_round: WorkerTiming | None = None  # the worker's clock around its previous Update


@dataclass(frozen=True)
class WorkerTiming:
    """The worker's clock around one round trip (seconds): the PS splits round time with it."""

    reply_wait_seconds: float = 0.0  # queuing the previous Update -> the PS's answer received
    downlink_decode_seconds: float = 0.0  # rebuilding and loading the model of that answer


@dataclass(frozen=True)
class WorkerReport:
    codec_stats: Mapping[str, float] = field(default_factory=dict)
    interface_start: InterfaceCounters = None
    interface_end: InterfaceCounters = None


@dataclass(frozen=True)
class Welcome:
    protocol: str
    worker_id: str
    rank: int
    task: TaskSpec
    codec_spec: str
    round: int
    total_rounds: int
    model: Params
    directive: Directive
    workers: int
    downlink_codec_spec: str = ""
    buffers: Params | None = None  # the PS's buffers (BatchNorm statistics), when the model has any


@dataclass(frozen=True)
class ModelDelta:
    base_round: int  # the reference round the delta applies to
    tensors: tuple[Encoded, ...]


@dataclass(frozen=True)
class RoundResult:
    """The next round: the full model, or (``model_delta``) the change since the worker's reference."""

    round: int
    directive: Directive
    update_aggregated: bool
    workers: int
    model: Params | None = None
    model_delta: ModelDelta | None = None
    buffers: Params | None = None  # the averaged buffers, when the model has any


@dataclass(frozen=True)
class Finished:
    rounds: int
    reason: str


WorkerMessage = Hello | Update | WorkerReport
ServerMessage = Welcome | RoundResult | Finished


@dataclass(frozen=True)
class Received:
    """A message as it came off the wire: the typed message (or why it is unusable) and its size."""

    message: WorkerMessage | ServerMessage | None
    nbytes: int
    error: str = ""


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    rank: int
    connected: bool
    hostname: str
    counters: WorkerCounters
    interface_start: InterfaceCounters = None
    interface_end: InterfaceCounters = None


@dataclass(frozen=True)
class Status:
    protocol: str
    round: int
    total_rounds: int
    codec_spec: str
    params: int
    finished: bool
    downlink_codec_spec: str
    workers: tuple[WorkerStatus, ...] = ()
    rounds: tuple[RoundCounters, ...] = ()
    server_interface_start: InterfaceCounters = None
    server_interface_now: InterfaceCounters = None


# ---------------------------------------------------------------- tensors and models


def _fill_encoded(msg: pb.EncodedTensor, e: Encoded) -> None:
    """Fill ``msg`` where it lives (a nested residual too): building a nested message apart and
    copying it in (``CopyFrom``, or passing it to a constructor) copies its payload once more per level."""
    msg.name = e.spec.name
    msg.shape.extend(e.spec.shape)
    msg.dtype = e.spec.dtype
    msg.codec_spec = e.codec
    # protobuf takes only bytes: a payload that is a view (of a gradient, of a received
    # message) is copied here, as protobuf copies anything assigned to it anyway
    msg.payload = bytes(e.payload)
    msg.predictor_coefficients = bytes(e.coefficients)
    if e.residual is not None:
        _fill_encoded(msg.residual, e.residual)


def encoded_to_proto(e: Encoded) -> pb.EncodedTensor:
    msg = pb.EncodedTensor()
    _fill_encoded(msg, e)
    return msg


def encoded_from_proto(msg: pb.EncodedTensor, depth: int = 0, wire: _TensorViews | None = None) -> Encoded:
    """``wire``: the tensor's payload and coefficients as views of the received bytes, when the
    parsed message carries none (``worker_message_from_wire``)."""
    if depth > MAX_RESIDUAL_DEPTH:
        raise MalformedMessage(f"residuals nested deeper than {MAX_RESIDUAL_DEPTH}")
    # Each access to a field copies it out of the parsed message (a str for a string field): read
    # each once, and refuse an oversized spec before any check copies it again (worker_message_
    # header_error refuses one before parsing; this is for messages that did not go through it).
    payload: Payload = msg.payload
    coefficients: Payload = msg.predictor_coefficients
    codec_spec = msg.codec_spec
    if wire is not None:
        payload = wire.payload if wire.payload is not None else payload
        coefficients = wire.coefficients if wire.coefficients is not None else coefficients
    if len(codec_spec) > MAX_TENSOR_HEADER_BYTES:
        raise MalformedMessage(f"codec spec of {len(codec_spec)} characters (at most {MAX_TENSOR_HEADER_BYTES})")
    if not msg.name:
        raise MalformedMessage("an EncodedTensor has no name")
    if any(d < 0 for d in msg.shape):
        raise MalformedMessage(f"tensor {msg.name!r} has a negative dimension {list(msg.shape)}")
    if not codec_spec:
        raise MalformedMessage(f"tensor {msg.name!r} names no codec")
    residual = (encoded_from_proto(msg.residual, depth + 1, wire.residual if wire is not None else None)
                if msg.HasField("residual") else None)
    return Encoded(
        codec=codec_spec,
        spec=TensorSpec(msg.name, tuple(int(d) for d in msg.shape), msg.dtype or "float32"),
        payload=payload,
        coefficients=coefficients,
        residual=residual,
    )


def encoded_to_bytes(e: Encoded) -> bytes:
    """One EncodedTensor, serialized: the unit of gradwire.codecs' self-describing frames."""
    return encoded_to_proto(e).SerializeToString()


def encoded_from_bytes(data: bytes) -> Encoded:
    """Parse one serialized EncodedTensor; ``MalformedMessage`` says why it is not one."""
    msg = pb.EncodedTensor()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RecursionError) as exc:
        raise MalformedMessage(f"not a valid gradwire.v1.EncodedTensor ({len(data)} bytes): {exc}") from None
    return encoded_from_proto(msg)


def _fill_model(msg: pb.Model, params: Mapping[str, np.ndarray]) -> None:
    """Fill ``msg`` in place; marks it present even when ``params`` is empty (an empty model is
    still a model on the wire)."""
    msg.SetInParent()
    for k, v in params.items():
        t = msg.tensors.add()
        t.name = k
        t.shape.extend(v.shape)
        t.dtype = "float32"
        t.data = np.ascontiguousarray(v, dtype="<f4").tobytes()


def model_to_proto(params: Mapping[str, np.ndarray]) -> pb.Model:
    msg = pb.Model()
    _fill_model(msg, params)
    return msg


def model_from_proto(msg: pb.Model, data: Sequence[tuple[bytes, int, int] | None] | None = None) -> Params:
    """The model's arrays. ``data``: each tensor's data as (buffer, start, end) in a buffer of the
    caller's (``server_message_from_wire``), in tensor order, when the parsed message carries none."""
    out = {}
    for k, t in enumerate(msg.tensors):
        if t.dtype != "float32":
            raise MalformedMessage(f"model tensor {t.name!r} has dtype {t.dtype!r}, expected float32")
        span = data[k] if data is not None else None
        buffer, start, end = span if span is not None else (t.data, 0, len(t.data))
        if (end - start) % 4:
            raise MalformedMessage(f"model tensor {t.name!r}: {end - start} bytes of data, not float32 values")
        # No copy: the bytes are immutable (protobuf's copy in ``t.data``, or the received message),
        # so the read-only view is the model's; whoever needs to write copies it
        # (gradwire.local.load_parameters copies it into the model, as it must anyway).
        arr = np.frombuffer(buffer, dtype="<f4", count=(end - start) // 4, offset=start)
        if arr.size != int(np.prod(t.shape, dtype=np.int64)):
            raise MalformedMessage(f"model tensor {t.name!r}: {arr.size} values for shape {list(t.shape)}")
        arr = arr.reshape(tuple(t.shape))
        out[t.name] = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    return out


def model_payload_bytes(params: Mapping[str, np.ndarray]) -> int:
    """The float32 bytes a full model carries on the wire (``Tensor.data``)."""
    return sum(4 * int(np.asarray(v).size) for v in params.values())


def payload_bytes(tensors: Iterable[Encoded]) -> int:
    return sum(t.payload_bytes for t in tensors)


def counters_to_proto(c: Mapping[str, Any] | None) -> pb.InterfaceCounters:
    if not c:
        return pb.InterfaceCounters()
    return pb.InterfaceCounters(interface=str(c["interface"]), tx_bytes=int(c["tx_bytes"]), rx_bytes=int(c["rx_bytes"]))


def counters_from_proto(msg: pb.InterfaceCounters) -> dict[str, object] | None:
    if not msg.interface:
        return None
    return {"interface": msg.interface, "tx_bytes": int(msg.tx_bytes), "rx_bytes": int(msg.rx_bytes)}


def directive_to_proto(d: Directive) -> pb.CodecDirective:
    return pb.CodecDirective(values=dict(d.values), blob=d.blob)


def directive_from_proto(msg: pb.CodecDirective) -> Directive:
    return Directive(values=dict(msg.values), blob=bytes(msg.blob))


def task_to_proto(t: TaskSpec) -> pb.TaskSpec:
    return pb.TaskSpec(**{f.name: getattr(t, f.name) for f in fields(TaskSpec)})


def task_from_proto(msg: pb.TaskSpec) -> TaskSpec:
    return TaskSpec(**{f.name: getattr(msg, f.name) for f in fields(TaskSpec)})


# ---------------------------------------------------------------- worker -> PS


def worker_message_to_proto(m: WorkerMessage) -> pb.WorkerMessage:
    if isinstance(m, Hello):
        return pb.WorkerMessage(hello=pb.Hello(
            protocol=m.protocol, requested_worker_id=m.requested_worker_id, codecs=list(m.codecs),
            hostname=m.hostname, interface_start=counters_to_proto(m.interface_start),
        ))
    if isinstance(m, Update):
        msg = pb.WorkerMessage()
        update = msg.update
        update.round, update.train_loss = m.round, m.train_loss
        update.num_examples, update.compute_seconds = m.num_examples, m.compute_seconds
        update.encode_seconds = m.encode_seconds
        update.SetInParent()
        for e in m.tensors:
            _fill_encoded(update.tensors.add(), e)
        if m.buffers is not None:
            _fill_model(update.buffers, m.buffers)
        if m.previous_round is not None:
            update.previous_round.reply_wait_seconds = m.previous_round.reply_wait_seconds
            update.previous_round.downlink_decode_seconds = m.previous_round.downlink_decode_seconds
        return msg
    if isinstance(m, WorkerReport):
        return pb.WorkerMessage(report=pb.WorkerReport(
            codec_stats=dict(m.codec_stats), interface_start=counters_to_proto(m.interface_start),
            interface_end=counters_to_proto(m.interface_end),
        ))
    raise TypeError(f"not a worker message: {type(m).__name__}")


def worker_message_to_bytes(m: WorkerMessage) -> bytes:
    """One WorkerMessage, serialized: what the worker's client writes to its Train stream, and
    ``gradwire fuzz`` mutates. An Update's payloads are copied once, into the returned bytes
    (``_update_chunks``); the bytes are ``worker_message_to_proto(m).SerializeToString()`` with
    alignment padding before each large payload (``_aligned``), and exactly it without one."""
    if isinstance(m, Update):
        return b"".join(_aligned(lambda aligner: _field(2, _update_chunks(m, aligner))))
    return worker_message_to_proto(m).SerializeToString()


def worker_message_from_bytes(data) -> WorkerMessage:
    """Parse one serialized WorkerMessage; ``MalformedMessage`` says why it is not a usable one."""
    msg = pb.WorkerMessage()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RecursionError) as exc:
        raise MalformedMessage(f"malformed gradwire.v1.WorkerMessage ({len(data)} bytes): {exc}") from None
    return worker_message_from_proto(msg)


def worker_message_from_proto(msg: pb.WorkerMessage) -> WorkerMessage:
    """The typed message; MalformedMessage for an empty body or a tensor that breaks the rules."""
    kind = msg.WhichOneof("body")
    if kind == "hello":
        h = msg.hello
        return Hello(protocol=h.protocol, requested_worker_id=h.requested_worker_id, codecs=tuple(h.codecs),
                     hostname=h.hostname, interface_start=counters_from_proto(h.interface_start))
    if kind == "update":
        u = msg.update
        return Update(round=int(u.round), tensors=tuple(encoded_from_proto(t) for t in u.tensors),
                      train_loss=float(u.train_loss), num_examples=int(u.num_examples),
                      compute_seconds=float(u.compute_seconds),
                      buffers=model_from_proto(u.buffers) if u.HasField("buffers") else None,
                      encode_seconds=float(u.encode_seconds),
                      previous_round=WorkerTiming(float(u.previous_round.reply_wait_seconds),
                                                  float(u.previous_round.downlink_decode_seconds))
                      if u.HasField("previous_round") else None)
    if kind == "report":
        r = msg.report
        return WorkerReport(codec_stats={k: float(v) for k, v in r.codec_stats.items()},
                            interface_start=counters_from_proto(r.interface_start),
                            interface_end=counters_from_proto(r.interface_end))
    raise MalformedMessage("expected an Update or a WorkerReport (a Hello to open a stream), got an empty message")


# ---------------------------------------------------------------- tensor headers, before parsing
#
# protobuf's Python API gives no way to know a string field's length without converting it to a
# str, and its ByteSize() serializes the message again: both copy what they measure. A hostile
# Update's 800 KB codec spec therefore costs a str for the spec on top of gRPC's buffer, the
# request bytes and the parsed message, and every check that looks at it copies it again. So the
# PS reads the wire framing first (tag, varint length: what protobuf itself reads) and refuses a
# tensor whose name, shape, dtype and codec spec exceed MAX_TENSOR_HEADER_BYTES before parsing.
# Hand-written because no protobuf library exposes field offsets; it only walks lengths, never
# copies, and leaves any framing error to protobuf's parser, which reports it.

_WORKER_UPDATE, _UPDATE_TENSORS, _TENSOR_RESIDUAL = 2, 2, 7
_TENSOR_HEADER_FIELDS = frozenset({1, 2, 3, 4})  # name, shape, dtype, codec_spec


class _Framing(Exception):
    """The bytes are not protobuf framing: the parser will say why."""


def _read_varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while i < end and shift < 64:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    raise _Framing


def _fields(buf: memoryview, start: int, end: int):
    """(field number, start, end) of each length-delimited field in buf[start:end]; others skipped."""
    for number, wire_type, _, value_start, field_end in _spans(buf, start, end):
        if wire_type == 2:
            yield number, value_start, field_end


def _tensor_header_bytes(buf: memoryview, start: int, end: int, depth: int) -> int:
    """The largest header (name, shape, dtype, codec spec bytes) of the tensor or its residuals."""
    header, nested = 0, 0
    for number, a, b in _fields(buf, start, end):
        if number in _TENSOR_HEADER_FIELDS:
            header += b - a
        elif number == _TENSOR_RESIDUAL and depth <= MAX_RESIDUAL_DEPTH:
            nested = max(nested, _tensor_header_bytes(buf, a, b, depth + 1))
    return max(header, nested)


def update_header_error(data) -> str | None:
    """Why a serialized WorkerMessage's Update is refused unparsed (a tensor header over
    MAX_TENSOR_HEADER_BYTES), or None: it may be parsed (framing errors are the parser's to report)."""
    buf = memoryview(data).cast("B")
    try:
        for number, a, b in _fields(buf, 0, len(buf)):
            if number != _WORKER_UPDATE:
                continue
            for field_number, ta, tb in _fields(buf, a, b):
                if field_number != _UPDATE_TENSORS:
                    continue
                header = _tensor_header_bytes(buf, ta, tb, 0)
                if header > MAX_TENSOR_HEADER_BYTES:
                    return (f"an encoded tensor's name, shape, dtype and codec spec take {header} bytes "
                            f"(at most {MAX_TENSOR_HEADER_BYTES})")
    except _Framing:
        return None
    return None


# ---------------------------------------------------------------- a RoundResult's model as views
#
# A worker receives the whole model every round. protobuf's Python API copies each tensor's data
# twice on the way (parsing into its own memory, then ``t.data`` into a new bytes object), 2 x 34
# MB per round for an 8.5 M-parameter model. ``server_message_from_wire`` parses a RoundResult
# without its tensors' data instead: the framing is walked (as ``update_header_error`` does; only
# lengths, never a copy), the message is rebuilt without the Tensor.data fields (a few hundred
# bytes) and parsed by protobuf, which still checks everything else, and each tensor's data is a
# read-only view of the received bytes. Only the plain layout protobuf itself writes takes this
# path (one round_result, at most one model and one buffers, one data field per tensor): anything
# else, where protobuf would merge repeated fields, is left to protobuf's own parse.

_SERVER_ROUND_RESULT, _RESULT_MODEL, _RESULT_BUFFERS, _MODEL_TENSORS, _TENSOR_DATA = 2, 2, 7, 1, 4


def _spans(buf: memoryview, start: int, end: int):
    """(field number, wire type, field start, value start, field end) of each field in buf[start:end]."""
    i = start
    while i < end:
        field_start = i
        key, i = _read_varint(buf, i, end)
        wire_type = key & 7
        value_start = i
        if wire_type == 0:
            _, i = _read_varint(buf, i, end)
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        elif wire_type == 2:
            size, value_start = _read_varint(buf, i, end)
            i = value_start + size
        else:  # groups: not in gradwire.v1
            raise _Framing
        if i > end:
            raise _Framing
        yield key >> 3, wire_type, field_start, value_start, i


def _model_without_data(buf: memoryview, start: int, end: int, spans: list) -> Chunks:
    """A Model's fields with its tensors' data left out; each tensor's (start, end) of data, or
    None, appended to ``spans`` in tensor order."""
    chunks: Chunks = []
    for number, wire_type, field_start, value_start, field_end in _spans(buf, start, end):
        if number != _MODEL_TENSORS or wire_type != 2:
            chunks.append(buf[field_start:field_end])
            continue
        inner: Chunks = []
        data = None
        for n, wt, fs, vs, fe in _spans(buf, value_start, field_end):
            if n == _TENSOR_DATA and wt == 2:
                if data is not None:
                    raise _Framing  # twice: protobuf keeps the last; its own parse decides
                data = (vs, fe)
            elif n == _TENSOR_PADDING and wt == 2:
                continue  # read by nobody: not copied into the rebuilt header
            else:
                inner.append(buf[fs:fe])
        spans.append(data)
        chunks += _field(_MODEL_TENSORS, inner)
    return chunks


def _only_body(buf: memoryview, number: int) -> tuple[int, int] | None:
    """Where the body of a message whose only top-level field is ``number`` (length-delimited)
    lies in ``buf``; None for any other layout (protobuf's own parse reads those)."""
    top = list(_spans(buf, 0, len(buf)))
    if len(top) != 1 or top[0][0] != number or top[0][1] != 2:
        return None
    return top[0][3], top[0][4]


def _parse_rebuilt(msg: Any, number: int, chunks: Chunks) -> bool:
    """Parse the rebuilt body (``chunks``) framed as field ``number`` into ``msg``; False when
    protobuf refuses it (its parse of the whole message then says why)."""
    try:
        msg.ParseFromString(b"".join(_field(number, chunks)))
    except (DecodeError, RecursionError):
        return False
    return True


def server_message_from_wire(data: bytes) -> ServerMessage:
    """A received ServerMessage; a RoundResult's model and buffers are read-only views of ``data``
    (immutable bytes). ``MalformedMessage`` says why the bytes are not a usable message."""
    fast = _round_result_with_views(data) if isinstance(data, bytes) else None
    return fast if fast is not None else server_message_from_bytes(data)


def _round_result_with_views(data: bytes) -> RoundResult | None:
    buf = memoryview(data)
    try:
        body = _only_body(buf, _SERVER_ROUND_RESULT)
        if body is None:
            return None
        chunks: Chunks = []
        spans: dict[int, list] = {}
        for number, wire_type, field_start, value_start, field_end in _spans(buf, *body):
            if number in (_RESULT_MODEL, _RESULT_BUFFERS) and wire_type == 2:
                if number in spans:
                    return None  # twice: protobuf merges them; its own parse does
                spans[number] = []
                chunks += _field(number, _model_without_data(buf, value_start, field_end, spans[number]))
            else:
                chunks.append(buf[field_start:field_end])
    except _Framing:
        return None
    msg = pb.ServerMessage()
    if not _parse_rebuilt(msg, _SERVER_ROUND_RESULT, chunks):
        return None
    rr = msg.round_result

    def views(number: int, model: pb.Model) -> Params:
        return model_from_proto(model, [None if s is None else (data, s[0], s[1]) for s in spans[number]])

    delta = model_delta_from_proto(rr.model_delta) if rr.HasField("model_delta") else None
    return RoundResult(
        round=int(rr.round), directive=directive_from_proto(rr.directive),
        update_aggregated=bool(rr.update_aggregated), workers=int(rr.workers),
        model=None if delta is not None else (views(_RESULT_MODEL, rr.model) if _RESULT_MODEL in spans
                                              else model_from_proto(rr.model)),
        model_delta=delta,
        buffers=views(_RESULT_BUFFERS, rr.buffers) if _RESULT_BUFFERS in spans else None,
    )


# ---------------------------------------------------------------- an Update's payloads as views
#
# The PS receives every worker's whole update every round, and protobuf's Python API copies each
# payload twice on the way (parsing into its own memory, then ``t.payload`` into a new bytes
# object): 2 x 34 MB per update for an 8.5 M-parameter model. ``worker_message_from_wire`` reads
# an Update as ``server_message_from_wire`` reads a RoundResult: the framing is walked (lengths
# only), the message is rebuilt without its tensors' payload and coefficients and its buffers'
# data and parsed by protobuf, which still checks everything else, and those bytes are read-only
# views of the received message (immutable bytes). The hostile-input checks are unchanged: the
# servicer's header check runs first, ``encoded_from_proto`` checks the tensors as before, and
# the decoders bound their work by the sizes (``compressors.bounds``). Only the layout protobuf
# itself writes takes this path (one update, one payload, coefficients and residual per tensor,
# at most one buffers); anything protobuf would merge is left to its own parse.

_UPDATE_BUFFERS, _TENSOR_PAYLOAD, _TENSOR_COEFFICIENTS = 6, 5, 6


@dataclass
class _TensorViews:
    """An EncodedTensor's payload and coefficients as views of the received bytes (None: absent)."""

    payload: memoryview | None = None
    coefficients: memoryview | None = None
    residual: _TensorViews | None = None


def _tensor_without_payloads(buf: memoryview, start: int, end: int, depth: int) -> tuple[Chunks, _TensorViews]:
    if depth > MAX_RESIDUAL_DEPTH:
        raise _Framing  # protobuf's parse and encoded_from_proto refuse it, with the reason
    chunks: Chunks = []
    views = _TensorViews()
    for number, wire_type, field_start, value_start, field_end in _spans(buf, start, end):
        if wire_type == 2 and number in (_TENSOR_PAYLOAD, _TENSOR_COEFFICIENTS):
            name = "payload" if number == _TENSOR_PAYLOAD else "coefficients"
            if getattr(views, name) is not None:
                raise _Framing  # twice: protobuf keeps the last; its own parse decides
            setattr(views, name, buf[value_start:field_end])
        elif wire_type == 2 and number == _ENCODED_PADDING:
            continue  # read by nobody: not copied into the rebuilt header
        elif wire_type == 2 and number == _TENSOR_RESIDUAL:
            if views.residual is not None:
                raise _Framing  # twice: protobuf merges them
            inner, views.residual = _tensor_without_payloads(buf, value_start, field_end, depth + 1)
            chunks += _field(_TENSOR_RESIDUAL, inner)
        else:
            chunks.append(buf[field_start:field_end])
    return chunks, views


def worker_message_from_wire(data: bytes) -> WorkerMessage:
    """A received WorkerMessage; an Update's payloads, coefficients and buffers are read-only views
    of ``data`` (immutable bytes). ``MalformedMessage`` says why the bytes are not a usable message."""
    fast = _update_with_views(data) if isinstance(data, bytes) else None
    return fast if fast is not None else worker_message_from_bytes(data)


def _update_with_views(data: bytes) -> Update | None:
    buf = memoryview(data)
    try:
        body = _only_body(buf, _WORKER_UPDATE)
        if body is None:
            return None  # a Hello or a report (small), or a layout protobuf would merge
        chunks: Chunks = []
        tensors: list[_TensorViews] = []
        buffer_spans: list | None = None
        for number, wire_type, field_start, value_start, field_end in _spans(buf, *body):
            if number == _UPDATE_TENSORS and wire_type == 2:
                inner, views = _tensor_without_payloads(buf, value_start, field_end, 0)
                tensors.append(views)
                chunks += _field(_UPDATE_TENSORS, inner)
            elif number == _UPDATE_BUFFERS and wire_type == 2:
                if buffer_spans is not None:
                    return None  # twice: protobuf merges them; its own parse does
                buffer_spans = []
                chunks += _field(_UPDATE_BUFFERS, _model_without_data(buf, value_start, field_end, buffer_spans))
            else:
                chunks.append(buf[field_start:field_end])
    except _Framing:
        return None
    msg = pb.WorkerMessage()
    if not _parse_rebuilt(msg, _WORKER_UPDATE, chunks):
        return None
    u = msg.update
    if len(u.tensors) != len(tensors):
        return None  # not the layout walked above; protobuf's own parse decides
    buffers = None
    if u.HasField("buffers"):
        spans = [None if s is None else (data, s[0], s[1]) for s in buffer_spans] if buffer_spans is not None else None
        buffers = model_from_proto(u.buffers, spans)
    return Update(round=int(u.round),
                  tensors=tuple(encoded_from_proto(t, 0, v) for t, v in zip(u.tensors, tensors, strict=True)),
                  train_loss=float(u.train_loss), num_examples=int(u.num_examples),
                  compute_seconds=float(u.compute_seconds), buffers=buffers,
                  encode_seconds=float(u.encode_seconds),
                  previous_round=WorkerTiming(float(u.previous_round.reply_wait_seconds),
                                              float(u.previous_round.downlink_decode_seconds))
                  if u.HasField("previous_round") else None)


# ---------------------------------------------------------------- serialized in pieces
#
# Large messages are serialized as a list of chunks joined once: the small fields by protobuf
# itself (a message with only those fields set serializes to exactly their bytes), the large
# ``bytes`` fields (payloads, tensor data) framed here around the caller's buffers, without a
# copy. protobuf's Python API has no way to serialize a message around a buffer it does not own:
# assigning a 44 MB payload copies it, each level of nesting copies it again, and
# SerializeToString copies it once more (docs/results/perf/). The framing is protobuf's own
# (tag = field << 3 | 2, a varint length, the bytes) and fields go in field-number order, as
# protobuf serializes them, so the bytes are identical to the protobuf serialization, but for the
# alignment padding put just before each large data field (below; tests/gradwire/test_wire_bytes.py
# checks both).

Chunks = list  # of bytes-like objects (bytes, memoryview)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, chunks: Chunks) -> Chunks:
    """A length-delimited field (wire type 2) around already-serialized chunks."""
    return [_varint(number << 3 | 2), _varint(sum(len(c) for c in chunks)), *chunks]


def _bytes_field(number: int, data) -> Chunks:
    """A proto3 ``bytes`` field: left out when empty, as protobuf does."""
    return _field(number, [data]) if len(data) else []


# Large data fields start at a multiple of ALIGNMENT bytes from the message's start. A reader
# views them in place (float32 arrays over the received bytes: ``worker_message_from_wire``,
# ``server_message_from_wire``), and a received message is a bytes object whose data starts
# 16-aligned (CPython's bytes header is 32 bytes, malloc's blocks are 16-aligned): so the arrays
# are aligned, and numpy and BLAS take their fast loops on them. At an odd offset, on one core at
# 8.5 M float32 entries, the PS's norm took 4.2-5.4 ms instead of 2.9 and its sum of two updates
# 10.6-12.3 ms instead of 6.3 (docs/results/perf/steady.md). The padding is a field readers ignore
# (``alignment_padding``, 2 to 17 bytes before a field of at least ALIGN_FROM_BYTES); smaller
# messages are exactly protobuf's own serialization. Hand-written: protobuf has no layout control.
ALIGNMENT = 16
ALIGN_FROM_BYTES = 1 << 16
_ENCODED_PADDING, _TENSOR_PADDING = 8, 5


class _Aligner:
    """The padding fields of one layout of a message: ``before`` gives the padding to put just
    before each large data field, in the order the fields are written, and records the field."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes  # each padding field's whole size (0: none), by data field in order
        self.data: list = []  # the large data chunks, in order

    def before(self, number: int, data) -> Chunks:
        if len(data) < ALIGN_FROM_BYTES:
            return []
        size = self.sizes[len(self.data)] if len(self.data) < len(self.sizes) else 0
        self.data.append(data)
        return _field(number, [bytes(size - 2)]) if size else []


def _padding_size(shift: int) -> int:
    """The smallest size of a padding field (0, or tag + one-byte length + bytes: at least 2) that
    is ``shift`` modulo ALIGNMENT."""
    r = shift % ALIGNMENT
    return r + ALIGNMENT if r == 1 else r


def _aligned(build: Callable[[_Aligner], Chunks]) -> Chunks:
    """The chunks of ``build`` with padding fields that put each large data field at a multiple of
    ALIGNMENT from the start. Laid out again while a padding change moved an enclosing field's
    length varint (rare: a few passes at most); alignment is for speed only, so a layout that
    still does not align after the last pass is sent as it is (valid protobuf either way)."""
    sizes: list[int] = []
    for _ in range(4):
        aligner = _Aligner(sizes)
        flat = build(aligner)
        if not aligner.data:
            return flat
        at, position = {}, 0
        for chunk in flat:
            at[id(chunk)] = position
            position += len(chunk)
        old = sizes + [0] * (len(aligner.data) - len(sizes))
        new, moved = [], 0  # each padding change moves every later field by as much
        for size, chunk in zip(old, aligner.data, strict=True):
            size2 = _padding_size(size - at[id(chunk)] - moved)
            new.append(size2)
            moved += size2 - size
        if new == old:
            return flat
        sizes = new
    return flat


def _encoded_chunks(e: Encoded, aligner: _Aligner) -> Chunks:
    head = pb.EncodedTensor(name=e.spec.name, shape=list(e.spec.shape), dtype=e.spec.dtype, codec_spec=e.codec)
    chunks = [head.SerializeToString(), *aligner.before(_ENCODED_PADDING, e.payload), *_bytes_field(5, e.payload),
              *_bytes_field(6, e.coefficients)]
    if e.residual is not None:
        chunks += _field(7, _encoded_chunks(e.residual, aligner))
    return chunks


def _model_chunks(params: Mapping[str, np.ndarray], aligner: _Aligner, data: list | None = None) -> Chunks:
    """A Model's fields; each tensor's data is a view of its (float32, C-contiguous) array.
    ``data``: (name, shape, the data chunk) of each tensor appended, for its offset once joined."""
    chunks: Chunks = []
    for k, v in params.items():
        arr = np.ascontiguousarray(v, dtype="<f4")
        head = pb.Tensor(name=k, shape=list(np.shape(v)), dtype="float32").SerializeToString()
        raw = arr.reshape(-1).view(np.uint8)
        if data is not None:
            data.append((k, np.shape(v), raw))
        chunks += _field(1, [head, *aligner.before(_TENSOR_PADDING, raw), *_bytes_field(4, raw)])
    return chunks


def _views_in(data: bytes, flat: Chunks, tensors: list) -> Params:
    """Read-only views of ``data`` (the join of ``flat``) where the tensors' data chunks landed."""
    at, position = {}, 0
    for chunk in flat:
        at[id(chunk)] = position
        position += len(chunk)
    out = {}
    for name, shape, raw in tensors:
        count = int(np.prod(shape, dtype=np.int64))
        start = at[id(raw)] if count else 0  # an empty tensor has no data field
        out[name] = np.frombuffer(data, dtype="<f4", count=count, offset=start).reshape(shape)
    return out


def _update_chunks(m: Update, aligner: _Aligner) -> Chunks:
    # Update: round (1), tensors (2), train_loss (3), num_examples (4), compute_seconds (5), buffers (6),
    # encode_seconds (7), previous_round (8)
    chunks = [pb.Update(round=m.round).SerializeToString()]
    for e in m.tensors:
        chunks += _field(2, _encoded_chunks(e, aligner))
    chunks.append(pb.Update(train_loss=m.train_loss, num_examples=m.num_examples,
                            compute_seconds=m.compute_seconds).SerializeToString())
    if m.buffers is not None:
        chunks += _field(6, _model_chunks(m.buffers, aligner))
    # encode_seconds (7), previous_round (8): small fields after the buffers, in field order.
    tail = pb.Update(encode_seconds=m.encode_seconds)
    if m.previous_round is not None:
        tail.previous_round.reply_wait_seconds = m.previous_round.reply_wait_seconds
        tail.previous_round.downlink_decode_seconds = m.previous_round.downlink_decode_seconds
    chunks.append(tail.SerializeToString())
    return chunks


class BroadcastSerializer:
    """RoundResults to bytes, each distinct message serialized once for all the workers it goes to.

    Every worker's RoundResult of a round carries the same model (or model delta) and buffers;
    only the round, directive, ``update_aggregated`` and ``workers`` fields are the worker's own,
    and with most codecs they are the same for every worker too. A message is one join of its
    small fields around views of the model's arrays (one copy of the model, into the bytes gRPC
    sends), and is kept, by identity of the model, delta and buffers objects (which the round
    engine replaces, never mutates, when a round closes) and equality of the small fields: the
    next worker with the same fields gets the same bytes, with no copy. Only the latest round's
    messages are kept (at most ``keep`` of them), so the PS holds one round's bytes. Thread-safe:
    the handlers of a round ask at the same moment, and the first one serializes while the others
    wait for it.
    """

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._lock = threading.Lock()
        # ((model, delta, buffers), small fields' bytes, the message's bytes); holds the objects,
        # so their ids cannot be reused while cached
        self._messages: list[tuple[tuple[object, object, object], bytes, bytes]] = []

    def to_bytes(self, m: ServerMessage) -> bytes:
        """The serialized ServerMessage: ``server_message_to_proto(m).SerializeToString()``, with
        alignment padding before each large data field (``_aligned``)."""
        if not isinstance(m, RoundResult):
            return server_message_to_proto(m).SerializeToString()
        small, head, middle = self._small_fields(m)
        shared = (m.model, m.model_delta, m.buffers)
        with self._lock:
            for held, fields, data in self._messages:
                if fields == small and all(a is b for a, b in zip(held, shared, strict=True)):
                    return data
            flat = _aligned(lambda aligner: self._flat(m, head, middle, aligner))
            data = b"".join(flat)
            self._keep(shared, small, data)
            return data

    def snapshot(self, m: RoundResult) -> RoundResult:
        """Serialize ``m`` now and keep its bytes: ``m`` with its model and buffers replaced by
        read-only views of those bytes.

        For the round engine as a round closes: ``m`` carries the live model, which is copied
        once, into the message (no copy of its own kept beside it), and the caller hands the views
        out as the round's model. Every worker's RoundResult that carries these views and the same
        small fields gets the kept bytes from ``to_bytes``, without another copy."""
        if m.model_delta is not None:
            raise ValueError("snapshot serializes a full model; a delta goes through to_bytes")
        small, head, middle = self._small_fields(m)
        model_data: list = []
        buffers_data: list = []

        def layout(aligner: _Aligner) -> Chunks:
            model_data.clear()
            buffers_data.clear()
            return self._flat(m, head, middle, aligner, model_data, buffers_data)

        flat = _aligned(layout)
        data = b"".join(flat)
        model = _views_in(data, flat, model_data)
        buffers = _views_in(data, flat, buffers_data) if m.buffers is not None else None
        with self._lock:
            self._keep((model, None, buffers), small, data)
        return dataclasses.replace(m, model=model, buffers=buffers)

    @staticmethod
    def _small_fields(m: RoundResult) -> tuple[bytes, bytes, bytes]:
        # RoundResult: round (1), model (2), directive (3), update_aggregated (4), workers (5),
        # model_delta (6), buffers (7)
        head = pb.RoundResult(round=m.round).SerializeToString()
        middle = pb.RoundResult(directive=directive_to_proto(m.directive), update_aggregated=m.update_aggregated,
                                workers=m.workers).SerializeToString()
        return _varint(len(head)) + head + middle, head, middle  # unambiguous: the head's length first

    @staticmethod
    def _flat(m: RoundResult, head: bytes, middle: bytes, aligner: _Aligner, model_data: list | None = None,
              buffers_data: list | None = None) -> Chunks:
        chunks: Chunks = [head]
        delta = m.model_delta
        if delta is None:
            chunks += _field(2, _model_chunks(m.model if m.model is not None else {}, aligner, model_data))
        chunks.append(middle)
        if delta is not None:
            chunks += _field(6, _model_delta_chunks(delta, aligner))
        if m.buffers is not None:
            chunks += _field(7, _model_chunks(m.buffers, aligner, buffers_data))
        return _field(2, chunks)

    def _keep(self, shared: tuple[object, object, object], small: bytes, data: bytes) -> None:
        """Caller holds the lock. Another round's messages are let go: the engine has replaced its model."""
        self._messages = [e for e in self._messages if all(a is b for a, b in zip(e[0], shared, strict=True))]
        self._messages.append((shared, small, data))
        del self._messages[: max(0, len(self._messages) - self.keep)]


def _model_delta_chunks(d: ModelDelta, aligner: _Aligner) -> Chunks:
    chunks = [pb.ModelDelta(base_round=d.base_round).SerializeToString()]
    for e in d.tensors:
        chunks += _field(2, _encoded_chunks(e, aligner))
    return chunks


def server_message_to_bytes(m: ServerMessage) -> bytes:
    """One ServerMessage, serialized (a RoundResult without a cache shared across workers)."""
    return BroadcastSerializer(keep=0).to_bytes(m)


# ---------------------------------------------------------------- PS -> worker


def _fill_model_delta(msg: pb.ModelDelta, d: ModelDelta) -> None:
    msg.SetInParent()
    msg.base_round = d.base_round
    for e in d.tensors:
        _fill_encoded(msg.tensors.add(), e)


def model_delta_to_proto(d: ModelDelta) -> pb.ModelDelta:
    msg = pb.ModelDelta()
    _fill_model_delta(msg, d)
    return msg


def model_delta_from_proto(msg: pb.ModelDelta) -> ModelDelta:
    return ModelDelta(base_round=int(msg.base_round), tensors=tuple(encoded_from_proto(t) for t in msg.tensors))


def server_message_to_proto(m: ServerMessage) -> pb.ServerMessage:
    if isinstance(m, Welcome):
        msg = pb.ServerMessage()
        welcome = msg.welcome
        welcome.protocol, welcome.worker_id, welcome.rank = m.protocol, m.worker_id, m.rank
        welcome.task.CopyFrom(task_to_proto(m.task))  # small messages: a copy costs nothing here
        welcome.codec_spec, welcome.round, welcome.total_rounds = m.codec_spec, m.round, m.total_rounds
        _fill_model(welcome.model, m.model)
        welcome.directive.CopyFrom(directive_to_proto(m.directive))
        welcome.workers, welcome.downlink_codec_spec = m.workers, m.downlink_codec_spec
        if m.buffers is not None:
            _fill_model(welcome.buffers, m.buffers)
        return msg
    if isinstance(m, RoundResult):
        msg = pb.ServerMessage()
        rr = msg.round_result
        rr.round, rr.update_aggregated, rr.workers = m.round, m.update_aggregated, m.workers
        rr.directive.CopyFrom(directive_to_proto(m.directive))
        if m.model_delta is not None:
            _fill_model_delta(rr.model_delta, m.model_delta)
        else:
            _fill_model(rr.model, m.model or {})
        if m.buffers is not None:
            _fill_model(rr.buffers, m.buffers)
        return msg
    if isinstance(m, Finished):
        return pb.ServerMessage(finished=pb.Finished(rounds=m.rounds, reason=m.reason))
    raise TypeError(f"not a server message: {type(m).__name__}")


def server_message_from_proto(msg: pb.ServerMessage) -> ServerMessage:
    kind = msg.WhichOneof("body")
    if kind == "welcome":
        w = msg.welcome
        return Welcome(
            protocol=w.protocol, worker_id=w.worker_id, rank=int(w.rank), task=task_from_proto(w.task),
            codec_spec=w.codec_spec, round=int(w.round), total_rounds=int(w.total_rounds),
            model=model_from_proto(w.model), directive=directive_from_proto(w.directive), workers=int(w.workers),
            downlink_codec_spec=w.downlink_codec_spec,
            buffers=model_from_proto(w.buffers) if w.HasField("buffers") else None,
        )
    if kind == "round_result":
        rr = msg.round_result
        delta = model_delta_from_proto(rr.model_delta) if rr.HasField("model_delta") else None
        return RoundResult(
            round=int(rr.round), directive=directive_from_proto(rr.directive),
            update_aggregated=bool(rr.update_aggregated), workers=int(rr.workers),
            model=None if delta is not None else model_from_proto(rr.model), model_delta=delta,
            buffers=model_from_proto(rr.buffers) if rr.HasField("buffers") else None,
        )
    if kind == "finished":
        return Finished(rounds=int(msg.finished.rounds), reason=msg.finished.reason)
    raise MalformedMessage(f"expected a Welcome, a RoundResult or Finished, got {kind or 'an empty message'}")


def server_message_from_bytes(data: bytes) -> ServerMessage:
    """Parse one serialized ServerMessage; ``MalformedMessage`` says why it is not a usable one."""
    msg = pb.ServerMessage()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RecursionError) as exc:
        raise MalformedMessage(f"not a valid gradwire.v1.ServerMessage ({len(data)} bytes): {exc}") from None
    return server_message_from_proto(msg)


def server_message_payload_bytes(m: ServerMessage) -> int:
    """What a server message carries as payload: a full model's floats, or a delta's codec bytes,
    plus the buffers (BatchNorm statistics and the like), which always go in full, plus the codec's
    per-worker directive blob (LGC's encoder weights and support feedback): bytes the method sends
    down, so they count as payload, not as framing."""
    if isinstance(m, Welcome):
        return model_payload_bytes(m.model) + model_payload_bytes(m.buffers or {}) + len(m.directive.blob)
    if isinstance(m, RoundResult):
        extra = model_payload_bytes(m.buffers or {}) + len(m.directive.blob)
        if m.model_delta is not None:
            return payload_bytes(m.model_delta.tensors) + extra
        return model_payload_bytes(m.model or {}) + extra
    return 0


# ---------------------------------------------------------------- Status


def _nan_for_none(x: float | None) -> float:
    return math.nan if x is None else x


def _none_for_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def status_to_proto(s: Status) -> pb.StatusResponse:
    resp = pb.StatusResponse(
        protocol=s.protocol, round=s.round, total_rounds=s.total_rounds, codec_spec=s.codec_spec, params=s.params,
        finished=s.finished, downlink_codec_spec=s.downlink_codec_spec,
        server_interface_start=counters_to_proto(s.server_interface_start),
        server_interface_now=counters_to_proto(s.server_interface_now),
    )
    for w in s.workers:
        c = w.counters
        resp.workers.append(pb.WorkerStatus(
            worker_id=w.worker_id, rank=w.rank, connected=w.connected, hostname=w.hostname,
            rounds_aggregated=c.rounds_aggregated, rejected_messages=c.rejected_messages,
            interface_start=counters_to_proto(w.interface_start), interface_end=counters_to_proto(w.interface_end),
            **{name: getattr(c, name) for name in link_fields()},
        ))
    for r in s.rounds:
        resp.rounds.append(pb.RoundStatus(
            round=r.round, workers_aggregated=r.workers, stragglers=r.stragglers,
            train_loss=_nan_for_none(r.train_loss), test_accuracy=_nan_for_none(r.test_accuracy),
            test_loss=_nan_for_none(r.test_loss), **{name: getattr(r, name) for name in link_fields()},
        ))
    return resp


def _round_from_proto(r: pb.RoundStatus) -> RoundCounters:
    entry = RoundCounters(
        round=int(r.round), workers=int(r.workers_aggregated), stragglers=int(r.stragglers),
        train_loss=_none_for_nan(r.train_loss), test_accuracy=_none_for_nan(r.test_accuracy),
        test_loss=_none_for_nan(r.test_loss),
    )
    entry.add(LinkCounters(**{name: int(getattr(r, name)) for name in link_fields()}))
    return entry


def status_from_proto(msg: pb.StatusResponse) -> Status:
    workers = tuple(
        WorkerStatus(
            worker_id=w.worker_id, rank=int(w.rank), connected=bool(w.connected), hostname=w.hostname,
            counters=WorkerCounters(rounds_aggregated=int(w.rounds_aggregated), rejected_messages=int(w.rejected_messages),
                                    **{name: int(getattr(w, name)) for name in link_fields()}),
            interface_start=counters_from_proto(w.interface_start), interface_end=counters_from_proto(w.interface_end),
        )
        for w in msg.workers
    )
    rounds = tuple(_round_from_proto(r) for r in msg.rounds)
    return Status(
        protocol=msg.protocol, round=int(msg.round), total_rounds=int(msg.total_rounds), codec_spec=msg.codec_spec,
        params=int(msg.params), finished=bool(msg.finished), downlink_codec_spec=msg.downlink_codec_spec,
        workers=workers, rounds=rounds, server_interface_start=counters_from_proto(msg.server_interface_start),
        server_interface_now=counters_from_proto(msg.server_interface_now),
    )


def status_request_to_bytes(_request: object = None) -> bytes:
    return pb.StatusRequest().SerializeToString()


def status_from_bytes(data: bytes) -> Status:
    return status_from_proto(pb.StatusResponse.FromString(data))


def status_to_dict(s: Status) -> dict:
    """The Status as protobuf JSON (snake_case names), the form ``gradwire status --json`` prints."""
    return json_format.MessageToDict(status_to_proto(s), preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)


def status_to_text(s: Status) -> str:
    return str(status_to_proto(s))
