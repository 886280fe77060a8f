"""Who may talk to the PS: TLS (mutual when a CA is given) and bearer tokens.

* **TLS**: ``--tls-cert/--tls-key`` make the PS listen with TLS; with ``--tls-ca`` too, every
  client must present a certificate signed by that CA (mTLS), and a client without one fails
  the handshake before any RPC exists.
* **Tokens**: ``GRADWIRE_TOKEN`` (one shared token) and/or ``--token-file`` (lines
  ``worker_id:token``). A gRPC server interceptor checks the ``authorization: Bearer <token>``
  metadata before any handler runs or any request is parsed, and answers UNAUTHENTICATED
  otherwise; Status needs the same token. Only the gRPC health service is open (it says
  SERVING or not, nothing more), so orchestrators can probe the PS.
* **Identity**: a per-worker token binds its worker id, and with mTLS the client certificate's
  common name does too (unless it is a shared name, see ``SHARED_CERT_NAMES``): a worker asking
  for another id is refused with PERMISSION_DENIED, so an id cannot be squatted.

Tokens are compared in constant time (``hmac.compare_digest``). Without TLS a token crosses
the network in clear text: use tokens without TLS on loopback only.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

# The client side (what workers and `gradwire status` use) lives in gradwire/channel.py, so that the
# worker imports nothing from the PS.
from gradwire.channel import BEARER, TOKEN_METADATA, AuthError

# Methods answered without a token: the health service says SERVING or not, nothing else.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
MAX_TOKEN_CHARS = 512
MAX_WORKER_ID_CHARS = 128


def read_token_file(path: str) -> dict[str, str]:
    """``worker_id:token`` per line (``#`` comments, blank lines allowed) -> {token: worker_id}."""
    table: dict[str, str] = {}
    ids: set[str] = set()
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        worker_id, sep, token = line.partition(":")
        worker_id, token = worker_id.strip(), token.strip()
        if not sep or not worker_id or not token:
            raise AuthError(f"{path}:{n}: expected worker_id:token")
        if len(token) < 16 or len(token) > MAX_TOKEN_CHARS:
            raise AuthError(f"{path}:{n}: a token must have 16 to {MAX_TOKEN_CHARS} characters")
        if len(worker_id) > MAX_WORKER_ID_CHARS:
            raise AuthError(f"{path}:{n}: worker id longer than {MAX_WORKER_ID_CHARS} characters")
        if token in table or worker_id in ids:
            raise AuthError(f"{path}:{n}: token or worker id {worker_id!r} given twice")
        table[token] = worker_id
        ids.add(worker_id)
    if not table:
        raise AuthError(f"{path}: no worker_id:token line")
    return table


@dataclass(frozen=True)
class Credentials:
    """The PS's accepted tokens: token -> bound worker id ("" for the shared token)."""

    tokens: dict[str, str]

    @classmethod
    def load(cls, shared_token: str, token_file: str) -> Credentials | None:
        tokens: dict[str, str] = {}
        if shared_token:
            if len(shared_token) < 16 or len(shared_token) > MAX_TOKEN_CHARS:
                raise AuthError(f"the shared token must have 16 to {MAX_TOKEN_CHARS} characters")
            tokens[shared_token] = ""
        if token_file:
            tokens.update(read_token_file(token_file))
        return cls(tokens) if tokens else None

    def lookup(self, presented: str) -> str | None:
        """The worker id a token binds ("" = none), or None when no token matches."""
        found = None
        for token, worker_id in self.tokens.items():  # every entry compared: no early exit on a match
            if hmac.compare_digest(token.encode(), presented.encode()):
                found = worker_id
        return found


def presented_token(metadata) -> str:
    for key, value in metadata or ():
        if key == TOKEN_METADATA and isinstance(value, str) and value.startswith(BEARER):
            return value[len(BEARER):][:MAX_TOKEN_CHARS + 1]
    return ""


def _deny(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that aborts UNAUTHENTICATED, without parsing the request."""

    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC but the health service unless it carries an accepted token."""

    def __init__(self, credentials: Credentials):
        self.credentials = credentials

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        token = presented_token(handler_call_details.invocation_metadata)
        if not token:
            return _deny(handler, "this parameter server requires a token (authorization: Bearer <token>)")
        if self.credentials.lookup(token) is None:
            return _deny(handler, "the token is not accepted")
        return handler


# Certificate common names that several clients share (a CA-wide "worker" cert): no identity.
SHARED_CERT_NAMES = frozenset({"", "worker", "gradwire-worker"})


def bound_identities(context: grpc.ServicerContext, credentials: Credentials | None) -> set[str]:
    """The worker ids this call's credentials bind: the per-worker token's, the certificate's name.

    Empty when they bind none; two different ids (w0's certificate with w1's token) are refused.
    """
    ids = set()
    if credentials is not None:
        worker_id = credentials.lookup(presented_token(context.invocation_metadata()))
        if worker_id:
            ids.add(worker_id)
    names = (context.auth_context() or {}).get("x509_common_name") or []
    name = names[0].decode(errors="replace") if names else ""
    if name not in SHARED_CERT_NAMES:
        ids.add(name)
    return ids


def server_credentials(cert: str, key: str, ca: str) -> grpc.ServerCredentials:
    pair = (Path(key).read_bytes(), Path(cert).read_bytes())
    root = Path(ca).read_bytes() if ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=bool(ca))


def check_server_auth_options(cert: str, key: str, ca: str) -> None:
    if bool(cert) != bool(key):
        raise AuthError("--tls-cert and --tls-key go together")
    if ca and not cert:
        raise AuthError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
    for path in (cert, key, ca):
        if path and not Path(path).is_file():
            raise AuthError(f"TLS file {path!r} does not exist")


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def check_metrics_address(metrics_address: str, authenticated: bool) -> None:
    """The Prometheus endpoint has no authentication: with credentials on, it may listen on loopback only."""
    if not metrics_address or not authenticated:
        return
    host = metrics_address.rpartition(":")[0]
    if host not in LOOPBACK_HOSTS:
        raise AuthError(f"--metrics-address {metrics_address!r}: the metrics endpoint has no authentication; "
                        "with TLS client certificates or tokens on, bind it to 127.0.0.1")
