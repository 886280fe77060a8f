"""Network namespaces for ``gradwire simulate --link/--links``: one per worker, behind a bridge.

Containers give every worker its own network stack; ``simulate`` runs local processes, so to shape
each worker's link it gives each worker a namespace of its own::

    host namespace:  bridge gw<tag>br 169.254.90.1/24  <- the PS listens here
                         |            |
    worker i:        veth gw<tag>v<i> 169.254.90.<10+i>/24 (shaped by the worker, gradwire/links.py)

The PS stays in the host namespace (simulate reads its Status there); a worker is started inside
its namespace with ``ip netns exec``. Addresses are link-local (169.254.90.0/24, or the next free
/24 up to 169.254.99.0/24 while another simulation holds it: ``free_subnet_prefix``): nothing is
routed off the machine, and every packet stays between the bridge and the namespaces made here.
Needs root and iproute2's ``ip``; everything made is removed on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET_PREFIX = "169.254.90"
PS_HOST = f"{SUBNET_PREFIX}.1"
FIRST_WORKER_HOST = 10
# Two shaped simulations on one machine (two users, two experiments) must not share a subnet: two
# bridges holding the same address would route each other's packets astray. A network takes the
# first of these /24s that no interface on the host holds yet (169.254.90.0/24 when alone).
SUBNET_PREFIXES = tuple(f"169.254.{third}" for third in range(90, 100))


def free_subnet_prefix() -> str:
    """The first of ``SUBNET_PREFIXES`` no host interface has an address in; ``GRADWIRE_SIM_SUBNET``
    (one of them, e.g. ``169.254.95``) names the one to take, for a user who wants to keep clear of
    another's simulations that always take the first."""
    wanted = os.environ.get("GRADWIRE_SIM_SUBNET", "")
    if wanted and wanted not in SUBNET_PREFIXES:
        raise NamespaceError(f"GRADWIRE_SIM_SUBNET={wanted!r} is not one of {', '.join(SUBNET_PREFIXES)}")
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=30).stdout
    for prefix in (wanted,) if wanted else SUBNET_PREFIXES:
        if f" {prefix}." not in shown:
            return prefix
    if wanted:
        raise NamespaceError(f"GRADWIRE_SIM_SUBNET={wanted}.0/24 is in use on this host")
    raise NamespaceError(f"every subnet of {SUBNET_PREFIXES[0]}-{SUBNET_PREFIXES[-1]}.0/24 is in use on this host")
MAX_WORKERS = 200


class NamespaceError(RuntimeError):
    """The namespaces cannot be made here; the message says why."""


def why_unavailable() -> str:
    """'' when this process can make network namespaces, else the reason."""
    if os.geteuid() != 0:
        return "shaping links in simulate needs root (network namespaces); use docker compose with GRADWIRE_LINK"
    if not shutil.which("ip"):
        return "shaping links in simulate needs iproute2's `ip` (apt-get install iproute2)"
    return ""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class WorkerNetwork:
    """A bridge in the host namespace and one namespace per worker; a context manager."""

    workers: int
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    made: list[str] = field(default_factory=list)
    subnet: str = SUBNET_PREFIX  # chosen when entered (free_subnet_prefix)

    @property
    def ps_host(self) -> str:
        return f"{self.subnet}.1"

    @property
    def bridge(self) -> str:
        return f"gw{self.tag}br"

    def namespace(self, i: int) -> str:
        return f"gwsim{self.tag}w{i}"

    def interface(self, i: int) -> str:
        return f"gw{self.tag}v{i}"  # the worker's end of its veth pair, inside its namespace

    def __enter__(self) -> WorkerNetwork:
        why = why_unavailable()
        if why:
            raise NamespaceError(why)
        if not 1 <= self.workers <= MAX_WORKERS:
            raise NamespaceError(f"namespaces for {self.workers} workers: 1..{MAX_WORKERS}")
        self.subnet = free_subnet_prefix()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self.made.append("bridge")
            _ip("addr", "add", f"{self.ps_host}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(self.workers):
                ns, inner, outer = self.namespace(i), self.interface(i), f"gw{self.tag}h{i}"
                _ip("netns", "add", ns)
                self.made.append(ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{self.subnet}.{FIRST_WORKER_HOST + i}/24", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def command(self, i: int, argv: list[str]) -> list[str]:
        """argv run inside worker i's namespace."""
        return ["ip", "netns", "exec", self.namespace(i), *argv]

    def close(self) -> None:
        for name in reversed(self.made):
            if name == "bridge":
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
            else:  # deleting a namespace deletes its veth end, and with it the peer on the bridge
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made.clear()

    def __exit__(self, *exc) -> None:
        self.close()
