"""A channel to the PS as every client opens it (workers, `gradwire status`, `gradwire health`):
TLS when a CA is given (mutual with a client certificate), and a bearer token on every call when
one is given. The PS's side of the same scheme is ``server/auth.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_METADATA = "authorization"
BEARER = "Bearer "


class AuthError(ValueError):
    """A credential file or option that cannot be used."""


TOKEN_ENV = "GRADWIRE_TOKEN"
# A file that holds the shared token: compose mounts it read-only (docker-compose.tls.yml), so the
# token is in no compose file, no image and no `docker inspect` output.
TOKEN_FROM_ENV = "GRADWIRE_TOKEN_FROM"


def token_from_environment(default: str = "") -> str:
    """GRADWIRE_TOKEN, else the first line of the file GRADWIRE_TOKEN_FROM names, else ``default``."""
    token = os.environ.get(TOKEN_ENV, "")
    if token:
        return token
    path = os.environ.get(TOKEN_FROM_ENV, "")
    if not path:
        return default
    try:
        with open(path) as f:
            token = f.readline(4096).strip()
    except OSError as exc:
        raise AuthError(f"{TOKEN_FROM_ENV}={path!r}: cannot read the token: {exc.strerror}") from None
    if not token:
        raise AuthError(f"{TOKEN_FROM_ENV}={path!r}: the file holds no token")
    return token


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
                     grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (works on insecure loopback channels too,
    where gRPC refuses call credentials)."""

    def __init__(self, token: str):
        self.metadata = ((TOKEN_METADATA, BEARER + token),)

    def _details(self, details):
        metadata = tuple(details.metadata or ()) + self.metadata
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple
    credentials: object
    wait_for_ready: bool | None
    compression: object


# HTTP/2 flow control for model-sized messages. gRPC's default starts each stream at a 64 KiB
# window and grows it by bandwidth-delay probing, so a 45 MB message crosses loopback as many
# small window updates and wakeups. A fixed window as large as the largest message (at most
# 16 MiB) cut the CPU of a raw gRPC round trip of 44.7 MB each way by about 16 % here (308 ms ->
# 259 ms, both processes, benchmarks.rounds measures it in place). The window is never larger than
# the receive limit, so a peer can make the receiver buffer no more than one allowed message
# (which gRPC buffers anyway before handing it over): no new room for a hostile peer.
MAX_FLOW_CONTROL_WINDOW = 16 * 2**20
MIN_FLOW_CONTROL_WINDOW = 64 * 2**10  # gRPC's own initial window


def flow_control_options(message_limit_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options: a fixed HTTP/2 window sized to the largest message allowed."""
    window = max(MIN_FLOW_CONTROL_WINDOW, min(int(message_limit_bytes), MAX_FLOW_CONTROL_WINDOW))
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)]


def client_channel(target: str, options: list[tuple], tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                   token: str = "", server_name: str = "") -> grpc.Channel:
    """A channel to the PS: TLS when a CA is given (with a client certificate for mTLS), a token when given."""
    if tls_ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(tls_ca).read_bytes(),
            private_key=Path(tls_key).read_bytes() if tls_key else None,
            certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
        )
        if server_name:
            options = [*options, ("grpc.ssl_target_name_override", server_name)]
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        if tls_cert or tls_key:
            raise AuthError("a client certificate needs --tls-ca (the CA that signed the PS's certificate)")
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _TokenMetadata(token)) if token else channel
