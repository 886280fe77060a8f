"""The gRPC face of the round engine: one bidirectional stream per worker.

Besides ``gradwire.protocol``, the only code that touches generated protobuf code: requests are
parsed and converted to typed messages (``gradwire.protocol``) here, replies converted back, and
every message's serialized size goes to the ledger.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import grpc

from gradwire import protocol
from gradwire.netstats import read_counters
from gradwire.protocol import (
    Hello,
    Received,
    RoundResult,
    Status,
    Update,
    Welcome,
    WorkerReport,
    WorkerStatus,
)
from gradwire.server.admission import (
    MAX_HOSTNAME_CHARS,
    MAX_REASON_CHARS,
    StreamGate,
    check_worker_id,
    default_max_streams,
    printable,
)
from gradwire.server.auth import Credentials, bound_identities
from gradwire.server.round_engine import Rejected, RoundEngine, Session
from gradwire.v1 import exchange_pb2 as pb

log = logging.getLogger("gradwire.server")


def parse_worker_message(data: bytes) -> Received:
    # grpc's default deserializer turns a parse error into an opaque INTERNAL
    # status; parsing here lets the servicer answer INVALID_ARGUMENT with a reason.
    oversized = protocol.update_header_error(data)  # before protobuf copies an oversized string
    if oversized:
        return Received(None, len(data), f"malformed gradwire.v1.WorkerMessage: {oversized}")
    try:
        # An Update's payloads are read-only views of these bytes, not protobuf's copies
        # (protocol.worker_message_from_wire); the decoders get bytes where they need them.
        return Received(protocol.worker_message_from_wire(data), len(data))
    except protocol.MalformedMessage as exc:
        return Received(None, len(data), str(exc))


def _abort(context: grpc.ServicerContext, code: str, reason: str):
    context.abort(getattr(grpc.StatusCode, code), printable(reason, MAX_REASON_CHARS))


def _drop_traceback(exc: BaseException) -> None:
    """Break the reference cycle gRPC's request iterator makes when it raises.

    On a cancelled or ended stream, ``grpc._server._raise_rpc_error`` raises an RpcError it keeps in
    a local: exception → traceback → that frame → the exception. Caught in a handler, the cycle also
    holds the handler's frames, the Train generator, its Session and the session's codec decoder,
    which stayed allocated until Python's next full garbage collection. Under a stream of refused
    sessions (`gradwire fuzz`: a refusal ends the session) that was a few MiB of peak RSS.
    Without the traceback, the exception and the frames are freed by reference counting.
    """
    exc.__traceback__ = None
    exc.__context__ = None


def _until_cancelled(request_iterator):
    """The stream's requests; ends (instead of raising) when gRPC reports the stream cancelled."""
    try:
        yield from request_iterator
    except grpc.RpcError as exc:
        _drop_traceback(exc)


class GradientExchangeServicer:
    def __init__(self, engine: RoundEngine, credentials: Credentials | None = None,
                 gate: StreamGate | None = None):
        self.engine = engine
        self.credentials = credentials
        c = engine.config
        self.gate = gate or StreamGate(c.max_streams or default_max_streams(c.workers), c.hello_timeout_s)
        # A round's model (or delta) goes to every worker: serialized once, not once per worker
        # (the engine's serializer: with the dense downlink it serializes the model as a round opens).
        self.broadcast = engine.serializer

    def _send(self, session: Session, message: protocol.ServerMessage) -> bytes:
        """The message serialized (gRPC sends these bytes as they are), its size counted."""
        data = self.broadcast.to_bytes(message)
        models = 1 if isinstance(message, Welcome | RoundResult) else 0
        self.engine.count_downlink(session, len(data), protocol.server_message_payload_bytes(message), models)
        return data

    def Train(self, request_iterator, context):
        if not self.gate.enter(context):
            _abort(context, "RESOURCE_EXHAUSTED", f"the PS holds its maximum of {self.gate.max_streams} streams")
        deadline = self.gate.hello_deadline(context)  # an idle stream holds no thread for long
        try:
            first = next(request_iterator, None)
        except Exception as exc:  # noqa: BLE001 - cancelled at the Hello deadline, or the client went away
            _drop_traceback(exc)
            first = None
        finally:
            deadline.cancel()
        if first is None or not context.is_active():
            return
        if first.message is None:
            _abort(context, "INVALID_ARGUMENT", first.error)
        if not isinstance(first.message, Hello):
            _abort(context, "INVALID_ARGUMENT", "the first message of a Train stream must be a Hello")
        hello, refusal = admitted_hello(first.message, bound_identities(context, self.credentials))
        if refusal:
            _abort(context, *refusal)
        try:
            session = self.engine.join(hello, first.nbytes)
        except Rejected as exc:
            log.warning("refused a worker: %s", printable(exc.reason, MAX_REASON_CHARS))  # may quote its Hello
            _abort(context, exc.code, exc.reason)
        context.add_callback(lambda: self.engine.leave(session))
        try:
            opening = self.engine.welcome(session)
            yield self._send(session, opening)
            if not isinstance(opening, Welcome):
                return
            for item in _until_cancelled(request_iterator):
                try:
                    reply = self._handle(session, item)
                except Rejected as exc:
                    self.engine.reject(session, printable(exc.reason, MAX_REASON_CHARS), item.nbytes)
                    _abort(context, exc.code, exc.reason)
                if reply is None:
                    return
                yield self._send(session, reply)
        finally:
            self.engine.leave(session)

    def _handle(self, session: Session, item: Received) -> protocol.ServerMessage | None:
        if item.message is None:
            raise Rejected("INVALID_ARGUMENT", item.error)
        if isinstance(item.message, Update):
            return self.engine.submit(session, item.message, item.nbytes)
        if isinstance(item.message, WorkerReport):
            self.engine.report(session, item.message, item.nbytes)
            return None
        raise Rejected("INVALID_ARGUMENT", f"expected an Update or a WorkerReport, got {type(item.message).__name__}")

    def Status(self, request, _context) -> pb.StatusResponse:
        return protocol.status_to_proto(self.status())

    def status(self) -> protocol.Status:
        snap = self.engine.snapshot()
        e = self.engine
        return Status(
            protocol=protocol.PROTOCOL, round=snap.round, total_rounds=e.config.rounds, codec_spec=e.codec.spec,
            params=e.params, finished=snap.phase == "finished", downlink_codec_spec=e.downlink_codec.spec,
            server_interface_start=e.interface_start, server_interface_now=e.interface_end or _now_counters(e),
            workers=tuple(
                WorkerStatus(worker_id=r.worker_id, rank=r.rank, connected=r.connected, hostname=r.hostname,
                             counters=r.counters, interface_start=r.interface_start, interface_end=r.interface_end)
                for r in snap.records
            ),
            rounds=snap.rounds,
        )


def admitted_hello(hello: Hello, identities: set[str]) -> tuple[Hello, tuple[str, str] | None]:
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
    return replace(hello, requested_worker_id=requested, hostname=printable(hello.hostname, MAX_HOSTNAME_CHARS)), None


def _now_counters(engine: RoundEngine):
    iface = (engine.interface_start or {}).get("interface")
    return read_counters(iface) if iface else None


def generic_handler(servicer: GradientExchangeServicer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        protocol.SERVICE_NAME,
        {
            "Train": grpc.stream_stream_rpc_method_handler(
                servicer.Train,
                request_deserializer=parse_worker_message,
                response_serializer=None,  # Train yields bytes serialized by _send
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                servicer.Status,
                request_deserializer=pb.StatusRequest.FromString,
                response_serializer=pb.StatusResponse.SerializeToString,
            ),
        },
    )
