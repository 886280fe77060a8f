"""Worker configuration: flags, with GRADWIRE_* environment variables as defaults."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass

from gradwire.channel import token_from_environment
from gradwire.envvars import env
from gradwire.links import validate as validate_links
from gradwire.protocol import DEFAULT_MAX_MESSAGE_MB


@dataclass(frozen=True)
class WorkerConfig:
    server: str = "127.0.0.1:50051"
    worker_id: str = ""  # "" = the hostname (a container id under compose)
    task: str = ""  # how this worker imports the run's task; "" = the reference the PS sends
    connect_timeout_s: float = 300.0  # give up if the PS cannot be reached for this long
    max_reconnects: int = 20
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    interface: str = ""  # network interface whose counters are reported
    threads: int = 1
    link: str = ""  # link profile of every worker (gradwire/links.py), e.g. 10mbit or 10mbit/100mbit
    links: str = ""  # profiles by rank, comma-separated; overrides link
    stale_updates: bool = False  # compute round r+1's gradient on round r's model while the update is in flight
    tls_ca: str = ""  # PEM CA of the PS's certificate: connect with TLS
    tls_cert: str = ""  # PEM client certificate and key, for a PS that requires mTLS
    tls_key: str = ""
    tls_server_name: str = ""  # name to verify in the PS's certificate, when not the host of --server
    token: str = ""  # GRADWIRE_TOKEN; never logged

    def __post_init__(self) -> None:
        if ":" not in self.server:
            raise ValueError(f"server must be host:port, got {self.server!r}")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be > 0")
        validate_links(self.link, self.links)  # a bad profile fails at start-up, not after joining

    @property
    def security(self) -> dict[str, str]:
        return {"tls_ca": self.tls_ca, "tls_cert": self.tls_cert, "tls_key": self.tls_key, "token": self.token,
                "server_name": self.tls_server_name}

    @property
    def resolved_worker_id(self) -> str:
        return self.worker_id or socket.gethostname()


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    d = WorkerConfig()
    p.add_argument("--server", default=env("SERVER", d.server), help="PS address host:port")
    p.add_argument("--task", default=env("TASK", d.task),
                   help="import the run's task this way (MODULE:FACTORY); default: the reference the PS sends")
    p.add_argument("--worker-id", default=env("WORKER_ID", d.worker_id), help="default: the hostname")
    p.add_argument("--connect-timeout-s", type=float, default=env("CONNECT_TIMEOUT_S", d.connect_timeout_s))
    p.add_argument("--max-reconnects", type=int, default=env("MAX_RECONNECTS", d.max_reconnects))
    p.add_argument("--max-message-mb", type=int, default=env("MAX_MESSAGE_MB", d.max_message_mb))
    p.add_argument("--interface", default=env("INTERFACE", d.interface), help="interface whose byte counters are reported")
    p.add_argument("--threads", type=int, default=env("THREADS", d.threads), help="torch threads")
    p.add_argument("--link", default=env("LINK", d.link),
                   help="shape this worker's link (needs CAP_NET_ADMIN): RATE or UP/DOWN, e.g. 10mbit")
    p.add_argument("--links", default=env("LINKS", d.links),
                   help="profiles by rank, e.g. 10mbit,10mbit,100mbit (rank i takes entry i mod n)")
    stale = str(env("STALE", "0")).strip().lower() not in ("0", "", "false", "no")
    p.add_argument("--stale-updates", action="store_true", default=stale,
                   help="overlap: compute the next gradient on the model at hand while the update is in flight; "
                        "the PS then applies each gradient one round late (GRADWIRE_STALE=1)")
    add_client_security_flags(p)


def add_client_security_flags(p: argparse.ArgumentParser) -> None:
    """TLS and token flags of every client of the PS (worker, status, health)."""
    d = WorkerConfig()
    p.add_argument("--tls-ca", default=env("TLS_CA", d.tls_ca), help="PEM CA that signed the PS's certificate")
    p.add_argument("--tls-cert", default=env("TLS_CERT", d.tls_cert), help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", default=env("TLS_KEY", d.tls_key), help="PEM key of --tls-cert")
    p.add_argument("--tls-server-name", default=env("TLS_SERVER_NAME", d.tls_server_name),
                   help="name the PS's certificate must carry (default: the host of the address)")
    # GRADWIRE_TOKEN or GRADWIRE_TOKEN_FROM (a file) only: a flag would show in `ps`
    p.set_defaults(token=token_from_environment(d.token))


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    fields = WorkerConfig.__dataclass_fields__
    return WorkerConfig(**{k: v for k, v in vars(args).items() if k in fields})
