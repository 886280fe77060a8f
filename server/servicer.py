"""The gRPC face of the coordinator: one bidirectional stream per worker."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from gradwire.server.admission import (
    MAX_HOSTNAME_CHARS,
    MAX_REASON_CHARS,
    StreamGate,
    check_worker_id,
    default_max_streams,
    printable,
)
from gradwire.server.auth import Credentials, bound_identities
from gradwire.server.coordinator import Coordinator, Rejected, Session

from gradwire import wire
from gradwire.downlink import downlink_payload_bytes
from gradwire.netstats import read_counters
from gradwire.v1 import exchange_pb2 as pb

log = logging.getLogger("gradwire.server")
SERVICE_NAME = "gradwire.v1.GradientExchange"


@dataclass(frozen=True)
class Received:
    """A request as it came off the wire: the parsed message or why it did not parse."""

    message: pb.WorkerMessage | None
    nbytes: int
    error: str = ""


def parse_worker_message(data: bytes) -> Received:
    # grpc's default deserializer turns a parse error into an opaque INTERNAL
    # status; parsing here lets the servicer answer INVALID_ARGUMENT with a reason.
    try:
        return Received(pb.WorkerMessage.FromString(data), len(data))
    except DecodeError as exc:
        return Received(None, len(data), f"malformed gradwire.v1.WorkerMessage ({len(data)} bytes): {exc}")


def _abort(context: grpc.ServicerContext, code: str, reason: str):
    context.abort(getattr(grpc.StatusCode, code), printable(reason, MAX_REASON_CHARS))


class GradientExchangeServicer:
    def __init__(self, coordinator: Coordinator, credentials: Credentials | None = None,
                 gate: StreamGate | None = None):
        self.coord = coordinator
        self.credentials = credentials
        c = coordinator.config
        self.gate = gate or StreamGate(c.max_streams or default_max_streams(c.workers), c.hello_timeout_s)

    def _send(self, session: Session, message: pb.ServerMessage) -> pb.ServerMessage:
        payload = downlink_payload_bytes(message)
        models = 1 if message.WhichOneof("body") in ("welcome", "round_result") else 0
        self.coord.count_downlink(session, message.ByteSize(), payload, models)
        return message

    def Train(self, request_iterator, context):
        if not self.gate.enter(context):
            _abort(context, "RESOURCE_EXHAUSTED", f"the PS holds its maximum of {self.gate.max_streams} streams")
        deadline = self.gate.hello_deadline(context)  # an idle stream holds no thread for long
        try:
            first = next(request_iterator, None)
        except Exception:  # noqa: BLE001 - cancelled at the Hello deadline, or the client went away
            first = None
        finally:
            deadline.cancel()
        if first is None or not context.is_active():
            return
        if first.message is None:
            _abort(context, "INVALID_ARGUMENT", first.error)
        if first.message.WhichOneof("body") != "hello":
            _abort(context, "INVALID_ARGUMENT", "the first message of a Train stream must be a Hello")
        hello, refusal = admitted_hello(first.message.hello, bound_identities(context, self.credentials))
        if refusal:
            _abort(context, *refusal)
        try:
            session = self.coord.join(hello, first.nbytes)
        except Rejected as exc:
            log.warning("refused a worker: %s", printable(exc.reason, MAX_REASON_CHARS))  # may quote its Hello
            _abort(context, exc.code, exc.reason)
        context.add_callback(lambda: self.coord.leave(session))
        try:
            opening = self.coord.welcome(session)
            yield self._send(session, opening)
            if opening.WhichOneof("body") == "finished":
                return
            for item in request_iterator:
                try:
                    reply = self._handle(session, item)
                except Rejected as exc:
                    self.coord.reject(session, printable(exc.reason, MAX_REASON_CHARS), item.nbytes)
                    _abort(context, exc.code, exc.reason)
                if reply is None:
                    return
                yield self._send(session, reply)
        finally:
            self.coord.leave(session)

    def _handle(self, session: Session, item: Received) -> pb.ServerMessage | None:
        if item.message is None:
            raise Rejected("INVALID_ARGUMENT", item.error)
        kind = item.message.WhichOneof("body")
        if kind == "update":
            return self.coord.submit(session, item.message.update, item.nbytes)
        if kind == "report":
            self.coord.report(session, item.message.report, item.nbytes)
            return None
        raise Rejected("INVALID_ARGUMENT", f"expected an Update or a WorkerReport, got {kind or 'an empty message'}")

    def Status(self, request, _context) -> pb.StatusResponse:
        snap = self.coord.snapshot()
        c = self.coord
        resp = pb.StatusResponse(
            protocol=wire.PROTOCOL, round=snap["round"], total_rounds=c.config.rounds, codec_spec=c.codec.spec,
            params=c.params, finished=snap["phase"] == "finished", downlink_codec_spec=c.downlink_codec.spec,
            server_interface_start=wire.counters_to_proto(c.interface_start),
            server_interface_now=wire.counters_to_proto(c.interface_end or _now_counters(c)),
        )
        for r in snap["records"]:
            resp.workers.append(pb.WorkerStatus(
                worker_id=r["worker_id"], rank=r["rank"], connected=r["connected"], hostname=r["hostname"],
                rounds_aggregated=r["rounds_aggregated"], uplink_payload_bytes=r["uplink_payload_bytes"],
                uplink_message_bytes=r["uplink_message_bytes"], downlink_message_bytes=r["downlink_message_bytes"],
                downlink_payload_bytes=r["downlink_payload_bytes"], rejected_messages=r["rejected_messages"],
                interface_start=wire.counters_to_proto(r["interface_start"]),
                interface_end=wire.counters_to_proto(r["interface_end"]),
            ))
        for e in snap["rounds_log"]:
            resp.rounds.append(pb.RoundStatus(
                round=e["round"], uplink_payload_bytes=e["uplink_payload_bytes"],
                uplink_message_bytes=e["uplink_message_bytes"], downlink_message_bytes=e["downlink_message_bytes"],
                downlink_payload_bytes=e.get("downlink_payload_bytes", 0),
                workers_aggregated=e["workers"], stragglers=e["stragglers"],
                train_loss=e["train_loss"] if e["train_loss"] is not None else math.nan,
                test_accuracy=e["test_accuracy"] if e["test_accuracy"] is not None else math.nan,
                test_loss=e["test_loss"] if e["test_loss"] is not None else math.nan,
            ))
        return resp


def admitted_hello(hello: pb.Hello, identities: set[str]) -> tuple[pb.Hello, tuple[str, str] | None]:
    """The Hello with bounded strings and the id its credentials bind, or (code, reason) to refuse it."""
    requested = hello.requested_worker_id
    if len(identities) > 1:
        return hello, ("PERMISSION_DENIED", "the certificate and the token belong to different workers")
    identity = next(iter(identities), "")
    if identity:
        if requested and requested != identity:
            return hello, ("PERMISSION_DENIED", f"these credentials belong to worker {identity!r}, "
                                                f"not {printable(requested, 64)!r}")
        requested = identity
    elif requested:
        why = check_worker_id(requested)
        if why:
            return hello, ("INVALID_ARGUMENT", why)
    admitted = pb.Hello()
    admitted.CopyFrom(hello)
    admitted.requested_worker_id = requested
    admitted.hostname = printable(hello.hostname, MAX_HOSTNAME_CHARS)
    return admitted, None


def _now_counters(coord: Coordinator):
    iface = (coord.interface_start or {}).get("interface")
    return read_counters(iface) if iface else None


def generic_handler(servicer: GradientExchangeServicer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Train": grpc.stream_stream_rpc_method_handler(
                servicer.Train,
                request_deserializer=parse_worker_message,
                response_serializer=pb.ServerMessage.SerializeToString,
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                servicer.Status,
                request_deserializer=pb.StatusRequest.FromString,
                response_serializer=pb.StatusResponse.SerializeToString,
            ),
        },
    )
