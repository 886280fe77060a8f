"""`gradwire bytes`, the report: per-container rows, PS row, totals and rounds as plain data.

Part of the bytes report (``gradwire bytes``, docs/algorithms.md §6; overview in
``gradwire/bytes_report.py``). ``build_report`` joins a run's ``RunData`` with the project's
containers (``ContainerInfo``, matched by hostname) into the dict ``--json`` prints and the
tables render: interface bytes over the session, ratios to the protobuf bytes, bits per entry,
compression against dense float32, and the honest-accounting allowance check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gradwire.bytes_report_run import RunData, WorkerRun
from gradwire.counters import LinkCounters, total

DEFAULT_PS_SERVICE = "ps"
DEFAULT_WORKER_SERVICE = "worker"
DENSE_BYTES_PER_ENTRY = 4  # float32: what an uncompressed update costs per entry

# The honest-accounting check (docs/algorithms.md §6): the interface must count at least the protobuf
# bytes, and at most 10 % more plus a fixed allowance per message (gRPC's 5-byte prefix, HTTP/2
# frame headers, TCP/IP headers of small segments, the TCP acknowledgements of the reply) and per
# connection (TCP handshake, HTTP/2 preface and SETTINGS, request headers, keepalive pings).
ALLOWANCE_RELATIVE = 0.10
ALLOWANCE_PER_MESSAGE_BYTES = 1024
ALLOWANCE_PER_CONNECTION_BYTES = 8192


@dataclass
class ContainerInfo:
    name: str
    id: str
    hostname: str
    service: str
    state: str  # docker's status: running, exited, created, ...
    number: int = 0
    # docker stats while running: interface name -> {"tx_bytes", "rx_bytes"}; None otherwise
    live: dict[str, dict[str, int]] | None = None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def allowance_bytes(message_bytes: int, messages: int, connections: int = 1) -> float:
    """How far above ``message_bytes`` an interface count may honestly be."""
    return (ALLOWANCE_RELATIVE * message_bytes + ALLOWANCE_PER_MESSAGE_BYTES * messages
            + ALLOWANCE_PER_CONNECTION_BYTES * connections)


def within_allowance(interface_bytes: int | None, message_bytes: int, messages: int, connections: int = 1) -> bool | None:
    """message bytes <= interface bytes <= message bytes + allowance; None when not measured."""
    if interface_bytes is None:
        return None
    return message_bytes <= interface_bytes <= message_bytes + allowance_bytes(message_bytes, messages, connections)


def interface_bytes(start: Mapping[str, Any] | None, end: Mapping[str, Any] | None,
                    live: Mapping[str, Mapping[str, int]] | None) -> tuple[int | None, int | None, str]:
    """(tx, rx, source) over the session: live or recorded end counters minus the recorded start."""
    iface = (start or end or {}).get("interface")
    now: Mapping[str, Any] | None = None
    source = "none"
    if live:
        if iface and iface in live:
            now, source = live[iface], "docker-stats"
        elif not iface:
            # Nothing recorded yet: the whole namespace (all interfaces but loopback).
            now = {"tx_bytes": sum(v["tx_bytes"] for k, v in live.items() if k != "lo"),
                   "rx_bytes": sum(v["rx_bytes"] for k, v in live.items() if k != "lo")}
            source = "docker-stats"
    if now is None and end:
        now, source = end, "recorded"
    if now is None:
        return None, None, "none"
    tx, rx = int(now["tx_bytes"]), int(now["rx_bytes"])
    if start and (source == "recorded" or start.get("interface") == iface):
        tx, rx = tx - int(start["tx_bytes"]), rx - int(start["rx_bytes"])
    return tx, rx, source


def _match(worker: WorkerRun, containers: list[ContainerInfo]) -> ContainerInfo | None:
    """A worker's container: by hostname (compose: the container id's first 12 hex digits)."""
    for key in (worker.hostname, worker.worker_id):
        if not key:
            continue
        for c in containers:
            if key in (c.hostname, c.name) or (len(key) >= 12 and c.id.startswith(key)):
                return c
    return None


def _bits_per_entry(nbytes: int | None, params: int, updates: int) -> float | None:
    if nbytes is None or params <= 0 or updates <= 0:
        return None
    return 8.0 * nbytes / (params * updates)


def build_report(run: RunData, containers: Iterable[ContainerInfo] = (), *, project: str | None = None,
                 ps_service: str = DEFAULT_PS_SERVICE, worker_service: str = DEFAULT_WORKER_SERVICE) -> dict[str, Any]:
    """The report as plain data (what ``--json`` prints)."""
    containers = list(containers)
    worker_containers = [c for c in containers if c.service == worker_service]
    ps_container = next((c for c in containers if c.service == ps_service), None)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for w in sorted(run.workers, key=lambda w: (w.rank, w.worker_id)):
        c = _match(w, worker_containers)
        if c is not None:
            seen.add(c.id)
        tx, rx, source = interface_bytes(w.interface_start, w.interface_end, c.live if c else None)
        up_msg = w.link.uplink_message_bytes + w.uplink_control_bytes
        messages = w.rounds + (2 if w.uplink_control_bytes else 0)
        dense_bytes = DENSE_BYTES_PER_ENTRY * run.params * w.rounds
        rows.append({
            "container": c.name if c else None, "container_id": c.id[:12] if c else None,
            "state": c.state if c else ("connected" if w.connected else "gone"),
            "worker_id": w.worker_id, "hostname": w.hostname, "rank": w.rank, "rounds": w.rounds,
            **w.link.to_dict(), "uplink_control_bytes": w.uplink_control_bytes,
            "interface": (w.interface_start or w.interface_end or {}).get("interface"),
            "interface_source": source, "interface_tx_bytes": tx, "interface_rx_bytes": rx,
            "tx_over_message": ratio(tx, up_msg), "rx_over_downlink": ratio(rx, w.link.downlink_message_bytes),
            "message_over_payload": ratio(w.link.uplink_message_bytes, w.link.uplink_payload_bytes),
            "payload_bits_per_entry": _bits_per_entry(w.link.uplink_payload_bytes, run.params, w.rounds),
            "interface_bits_per_entry": _bits_per_entry(tx, run.params, w.rounds),
            "dense_equivalent_bytes": dense_bytes,
            "payload_compression": ratio(dense_bytes, w.link.uplink_payload_bytes),
            "interface_compression": ratio(dense_bytes, tx),
            "uplink_within_allowance": within_allowance(tx, up_msg, messages),
            "uplink_allowance_bytes": allowance_bytes(up_msg, messages),
        })
    # Worker containers the PS has not heard of (not joined yet, or failed before joining).
    for c in sorted(worker_containers, key=lambda c: c.number):
        if c.id in seen:
            continue
        tx, rx, source = interface_bytes(None, None, c.live)
        rows.append({
            "container": c.name, "container_id": c.id[:12], "state": c.state, "worker_id": None, "hostname": c.hostname,
            "rank": None, "rounds": 0, **LinkCounters().to_dict(), "uplink_control_bytes": 0,
            "interface": None, "interface_source": source, "interface_tx_bytes": tx,
            "interface_rx_bytes": rx, "tx_over_message": None, "rx_over_downlink": None, "message_over_payload": None,
            "payload_bits_per_entry": None, "interface_bits_per_entry": None, "dense_equivalent_bytes": 0,
            "payload_compression": None, "interface_compression": None, "uplink_within_allowance": None,
            "uplink_allowance_bytes": None,
        })

    joined = [r for r in rows if r["rank"] is not None]
    # Every worker the PS knows, with the uplink messages counted whole: Hello and WorkerReport too.
    links = total(w.link for w in run.workers)
    links.uplink_message_bytes += sum(w.uplink_control_bytes for w in run.workers)
    total_msg, total_down = links.uplink_message_bytes, links.downlink_message_bytes
    txs = [r["interface_tx_bytes"] for r in joined]
    rxs = [r["interface_rx_bytes"] for r in joined]
    total_tx = sum(txs) if txs and None not in txs else None
    total_rx = sum(rxs) if rxs and None not in rxs else None
    dense_total = sum(r["dense_equivalent_bytes"] for r in joined)
    updates = sum(r["rounds"] for r in joined)

    ps_tx, ps_rx, ps_source = interface_bytes(run.server_interface_start, run.server_interface_end,
                                              ps_container.live if ps_container else None)
    ps = {
        "container": ps_container.name if ps_container else None,
        "state": ps_container.state if ps_container else None,
        "interface": (run.server_interface_start or run.server_interface_end or {}).get("interface"),
        "interface_source": ps_source, "interface_tx_bytes": ps_tx, "interface_rx_bytes": ps_rx,
        **links.to_dict(),
        "rx_over_uplink_message": ratio(ps_rx, total_msg), "tx_over_downlink": ratio(ps_tx, total_down),
    }
    ranks = [r["rank"] for r in joined]
    return {
        "project": project, "source": run.source, "codec": run.codec, "downlink_codec": run.downlink_codec,
        "params": run.params, "round": run.round,
        "total_rounds": run.total_rounds, "finished": run.finished, "final_accuracy": run.final_accuracy,
        "distinct_ranks": len(set(ranks)) == len(ranks),
        "allowance": {"relative": ALLOWANCE_RELATIVE, "per_message_bytes": ALLOWANCE_PER_MESSAGE_BYTES,
                      "per_connection_bytes": ALLOWANCE_PER_CONNECTION_BYTES},
        "workers": rows,
        "ps": ps,
        "totals": {
            "workers": len(joined), "updates": updates, **links.to_dict(),
            "interface_tx_bytes": total_tx, "interface_rx_bytes": total_rx,
            "tx_over_message": ratio(total_tx, total_msg), "rx_over_downlink": ratio(total_rx, total_down),
            "payload_bits_per_entry": _bits_per_entry(links.uplink_payload_bytes, run.params, updates),
            "interface_bits_per_entry": _bits_per_entry(total_tx, run.params, updates),
            "dense_equivalent_bytes": dense_total,
            "payload_compression": ratio(dense_total, links.uplink_payload_bytes),
            "interface_compression": ratio(dense_total, total_tx),
        },
        "rounds": [
            {"round": r.round, "workers": r.workers, **r.link.to_dict(),
             "payload_bits_per_entry": _bits_per_entry(r.link.uplink_payload_bytes, run.params, r.workers),
             "train_loss": r.train_loss, "test_accuracy": r.test_accuracy}
            for r in run.rounds
        ],
    }
