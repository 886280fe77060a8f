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
