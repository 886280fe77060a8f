"""`gradwire bytes`: what a compose project put on the wire, per container and per round.

Three byte counts side by side (docs/algorithms.md §6):

1. codec payload bytes and 2. protobuf message bytes, both counted by the PS (its Status RPC while
   it runs, its ``summary.json`` afterwards);
3. interface bytes, counted by each container's own network namespace: ``docker stats`` while a
   container runs, otherwise the ``/sys/class/net/<if>/statistics`` counters that the worker and the
   PS recorded themselves at the start and end of training (so the numbers outlive the containers).

Interface bytes are reported as the difference from the counters the process recorded when it
started (when it did), so they cover the training session: connection set-up, every message with its
gRPC/HTTP/2/TCP/IP framing, and the TCP acknowledgements of the other direction.

Sources, in order of preference (``--project``, the default): the Status of the running PS, queried
from inside the PS container over its loopback (so the query itself never shows up on the PS's
interface counters), else ``summary.json`` read out of the (possibly stopped) PS container.
``--summary FILE`` or ``--status FILE`` read a saved summary / ``gradwire status --json`` output
instead and need no Docker engine.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tarfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gradwire.counters import LinkCounters, total

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
DEFAULT_PROJECT = "gradwire"
DEFAULT_PS_SERVICE = "ps"
DEFAULT_WORKER_SERVICE = "worker"
DEFAULT_PORT = 50051
DENSE_BYTES_PER_ENTRY = 4  # float32: what an uncompressed update costs per entry

# The honest-accounting check (docs/algorithms.md §6): the interface must count at least the protobuf
# bytes, and at most 10 % more plus a fixed allowance per message (gRPC's 5-byte prefix, HTTP/2
# frame headers, TCP/IP headers of small segments, the TCP acknowledgements of the reply) and per
# connection (TCP handshake, HTTP/2 preface and SETTINGS, request headers, keepalive pings).
ALLOWANCE_RELATIVE = 0.10
ALLOWANCE_PER_MESSAGE_BYTES = 1024
ALLOWANCE_PER_CONNECTION_BYTES = 8192


class ReportError(RuntimeError):
    """Something the user can fix: no engine, no such project, no data yet."""


# ---------------------------------------------------------------------------------------------
# Normalised run data (from Status or from summary.json)


@dataclass
class WorkerRun:
    worker_id: str
    rank: int
    hostname: str
    rounds: int  # updates the PS aggregated
    link: LinkCounters  # uplink message bytes: Update messages only
    uplink_control_bytes: int  # Hello and WorkerReport (0 where the source does not say)
    connected: bool | None = None
    interface_start: dict[str, Any] | None = None
    interface_end: dict[str, Any] | None = None


@dataclass
class RoundRun:
    round: int
    workers: int
    link: LinkCounters
    train_loss: float | None = None
    test_accuracy: float | None = None


@dataclass
class RunData:
    source: str  # "status" or "summary"
    codec: str
    params: int
    round: int
    total_rounds: int
    finished: bool
    workers: list[WorkerRun] = field(default_factory=list)
    rounds: list[RoundRun] = field(default_factory=list)
    server_interface_start: dict[str, Any] | None = None
    server_interface_end: dict[str, Any] | None = None
    final_accuracy: float | None = None
    downlink_codec: str = "dense"


def _int(value: Any, default: int = 0) -> int:
    """uint64 fields arrive as strings from protobuf's JSON mapping."""
    if value is None or value == "":
        return default
    return int(value)


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    f = float(value)  # protobuf's JSON writes NaN as the string "NaN"
    return None if math.isnan(f) else f


def _counters(value: Any) -> dict[str, Any] | None:
    """An InterfaceCounters dict, or None where it was not recorded (empty interface name)."""
    if not isinstance(value, Mapping) or not value.get("interface"):
        return None
    return {"interface": str(value["interface"]), "tx_bytes": _int(value.get("tx_bytes")),
            "rx_bytes": _int(value.get("rx_bytes"))}


def _worker_run(w: Mapping[str, Any], *, uplink_control_bytes: int, connected: bool) -> WorkerRun:
    """One worker's counters; the two sources name them alike (Status and summary.json)."""
    return WorkerRun(
        worker_id=str(w.get("worker_id", "")), rank=_int(w.get("rank")), hostname=str(w.get("hostname", "")),
        rounds=_int(w.get("rounds_aggregated")), link=LinkCounters.from_dict(w, convert=_int),
        uplink_control_bytes=uplink_control_bytes, connected=connected,
        interface_start=_counters(w.get("interface_start")), interface_end=_counters(w.get("interface_end")),
    )


def _round_run(r: Mapping[str, Any], *, workers: int) -> RoundRun:
    return RoundRun(
        round=_int(r.get("round")), workers=workers, link=LinkCounters.from_dict(r, convert=_int),
        train_loss=_float(r.get("train_loss")), test_accuracy=_float(r.get("test_accuracy")),
    )


def run_from_status(d: Mapping[str, Any]) -> RunData:
    """From ``gradwire status --json`` (protobuf JSON, snake_case field names)."""
    # Status does not carry the Hello/WorkerReport bytes; they are counted in the summary only.
    workers = [_worker_run(w, uplink_control_bytes=0, connected=bool(w.get("connected", False)))
               for w in d.get("workers", [])]
    rounds = [_round_run(r, workers=_int(r.get("workers_aggregated"))) for r in d.get("rounds", [])]
    accs = [r.test_accuracy for r in rounds if r.test_accuracy is not None]
    return RunData(
        source="status", codec=str(d.get("codec_spec", "")), params=_int(d.get("params")), round=_int(d.get("round")),
        total_rounds=_int(d.get("total_rounds")), finished=bool(d.get("finished", False)), workers=workers, rounds=rounds,
        server_interface_start=_counters(d.get("server_interface_start")),
        server_interface_end=_counters(d.get("server_interface_now")), final_accuracy=accs[-1] if accs else None,
        downlink_codec=str(d.get("downlink_codec_spec") or "dense"),
    )


def run_from_summary(d: Mapping[str, Any]) -> RunData:
    """From the PS's ``summary.json``."""
    workers = [_worker_run(w, uplink_control_bytes=_int(w.get("uplink_control_bytes")), connected=False)
               for w in d.get("per_worker", [])]
    rounds = [_round_run(r, workers=_int(r.get("workers"))) for r in d.get("rounds_log", [])]
    server = d.get("server_interface") or {}
    config = d.get("config") or {}
    n_rounds = _int(d.get("rounds"), len(rounds))
    return RunData(
        source="summary", codec=str(d.get("codec", "")), params=_int(d.get("params")), round=n_rounds,
        total_rounds=_int(config.get("rounds"), n_rounds), finished=True, workers=workers, rounds=rounds,
        server_interface_start=_counters(server.get("start")), server_interface_end=_counters(server.get("end")),
        final_accuracy=_float(d.get("final_accuracy")), downlink_codec=str(d.get("downlink_codec") or "dense"),
    )


def run_from_json(d: Mapping[str, Any]) -> RunData:
    """Either format, told apart by its keys."""
    if "per_worker" in d or "rounds_log" in d:
        return run_from_summary(d)
    if "workers" in d and isinstance(d["workers"], list) or "codec_spec" in d:
        return run_from_status(d)
    raise ReportError("neither a gradwire summary.json nor a `gradwire status --json` output")


# ---------------------------------------------------------------------------------------------
# Containers and the report


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


# ---------------------------------------------------------------------------------------------
# Rendering


def _b(n: int | float | None) -> str:
    return "–" if n is None else f"{int(n):,}"


def _r(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _x(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:.1f}×" if x < 100 else f"{x:,.0f}×"


def _short(name: str | None, project: str | None) -> str | None:
    if name and project and name.startswith(project + "-"):
        return name[len(project) + 1:]
    return name


_SOURCE = {"docker-stats": "live", "recorded": "rec", "none": "–"}


def render(report: Mapping[str, Any], max_rounds: int | None = None):
    """A rich renderable: the per-container table, then the per-round table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state = "finished" if report["finished"] else "running"
    where = f"project {report['project']}" if report["project"] else f"from {report['source']}"
    downlink = report.get("downlink_codec") or "dense"
    title = (f"gradwire bytes · {where} · codec {report['codec'] or '–'}"
             f"{'' if downlink == 'dense' else f' · downlink {downlink}'} · "
             f"{report['params']:,} params · round {report['round']}/{report['total_rounds']} ({state})")
    t = Table(title=title, title_justify="left", header_style="bold")
    for name in ("container", "rank", "rounds", "↑ payload\nB", "↑ protobuf\nB", "↑ iface\nB", "↑ iface\n/proto",
                 "↓ payload\nB", "↓ protobuf\nB", "↓ iface\nB", "↓ iface\n/proto", "payload\nb/entry", "iface\nb/entry",
                 "vs dense\n(iface)", "src"):
        t.add_column(name, justify="left" if name in ("container", "src") else "right", no_wrap=True)
    project = report["project"]
    for r in report["workers"]:
        ok = r["uplink_within_allowance"]
        ratio_text = Text(_r(r["tx_over_message"]), style="" if ok is None else "green" if ok else "bold red")
        link = LinkCounters.from_dict(r)
        t.add_row(
            _short(r["container"], project) or r["hostname"] or "?", "–" if r["rank"] is None else str(r["rank"]),
            str(r["rounds"]), _b(link.uplink_payload_bytes), _b(link.uplink_message_bytes + r["uplink_control_bytes"]),
            _b(r["interface_tx_bytes"]), ratio_text, _b(link.downlink_payload_bytes),
            _b(link.downlink_message_bytes), _b(r["interface_rx_bytes"]),
            _r(r["rx_over_downlink"]), _r(r["payload_bits_per_entry"], 2), _r(r["interface_bits_per_entry"], 2),
            _x(r["interface_compression"]), _SOURCE.get(r["interface_source"], r["interface_source"]),
        )
    tot = report["totals"]
    links = LinkCounters.from_dict(tot)
    t.add_section()
    t.add_row(
        Text("workers", style="bold"), "", str(tot["updates"]), _b(links.uplink_payload_bytes),
        _b(links.uplink_message_bytes), _b(tot["interface_tx_bytes"]), _r(tot["tx_over_message"]),
        _b(links.downlink_payload_bytes), _b(links.downlink_message_bytes), _b(tot["interface_rx_bytes"]), _r(tot["rx_over_downlink"]),
        _r(tot["payload_bits_per_entry"], 2), _r(tot["interface_bits_per_entry"], 2), _x(tot["interface_compression"]), "",
    )
    ps = report["ps"]
    ps_links = LinkCounters.from_dict(ps)
    # The PS's side of the same traffic: it receives the uplink (rx) and sends the downlink (tx).
    t.add_row(
        Text(f"{_short(ps['container'], project) or 'ps'} (PS)", style="bold"), "", "", _b(ps_links.uplink_payload_bytes),
        _b(ps_links.uplink_message_bytes), _b(ps["interface_rx_bytes"]), _r(ps["rx_over_uplink_message"]),
        "", _b(ps_links.downlink_message_bytes), _b(ps["interface_tx_bytes"]), _r(ps["tx_over_downlink"]), "", "", "",
        _SOURCE.get(ps["interface_source"], ps["interface_source"]),
    )
    rounds = report["rounds"]
    shown = rounds[-max_rounds:] if max_rounds else rounds
    rt = Table(title=f"per round (PS counts){'' if len(shown) == len(rounds) else f', last {len(shown)} of {len(rounds)}'}",
               title_justify="left", header_style="bold")
    for name in ("round", "workers", "↑ payload B", "↑ protobuf B", "↓ payload B", "↓ protobuf B", "payload b/entry",
                 "train loss", "test acc"):
        rt.add_column(name, justify="right", no_wrap=True)
    for r in shown:
        link = LinkCounters.from_dict(r)
        rt.add_row(str(r["round"]), str(r["workers"]), _b(link.uplink_payload_bytes), _b(link.uplink_message_bytes),
                   _b(link.downlink_payload_bytes), _b(link.downlink_message_bytes), _r(r["payload_bits_per_entry"], 2), _r(r["train_loss"], 4),
                   _r(r["test_accuracy"], 4))
    notes = Text(
        "↑ uplink (worker → PS): iface = the worker's tx, on the PS row the PS's rx; ↓ downlink: the worker's rx, the "
        "PS's tx. Interface bytes cover the session (counters minus those recorded at start: src live = docker stats, "
        "rec = recorded at the end) with all gRPC/HTTP/2/TCP/IP framing and the ACKs of the other direction. "
        "vs dense = 32-bit dense bytes / iface bytes. Green ratio: within "
        f"{ALLOWANCE_RELATIVE:.0%} + {ALLOWANCE_PER_MESSAGE_BYTES} B/message + {ALLOWANCE_PER_CONNECTION_BYTES} B "
        "of the protobuf bytes.", style="dim")
    if not report["finished"] and any(r["interface_source"] == "docker-stats" for r in report["workers"]):
        notes.append("\nWhile training runs, the interface counters and the PS's counts are read up to about half "
                     "a second apart, so the ratios of fast rounds move by a few percent; they are exact once the "
                     "run has finished.", style="yellow")
    return Group(t, rt, notes)


# ---------------------------------------------------------------------------------------------
# Docker


def docker_client():
    try:
        import docker
    except ImportError as e:  # pragma: no cover - docker is a dependency
        raise ReportError("the docker Python package is missing: pip install docker") from e
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:
        raise ReportError(f"cannot talk to a Docker engine ({e}). Is it running (scripts/install_docker.sh)? "
                          "For a run's saved summary use: gradwire bytes --summary PATH/summary.json") from e
    return client


def _live_counters(container) -> dict[str, dict[str, int]] | None:
    try:
        stats = container.stats(stream=False, one_shot=True)
    except TypeError:  # docker SDK < 6.1 has no one_shot
        stats = container.stats(stream=False)
    except Exception:
        return None
    nets = stats.get("networks") or {}
    out = {name: {"tx_bytes": int(v.get("tx_bytes", 0)), "rx_bytes": int(v.get("rx_bytes", 0))}
           for name, v in nets.items()}
    return out or None


def list_containers(client, project: str) -> list[tuple[Any, ContainerInfo]]:
    """The project's containers (docker SDK objects and their ContainerInfo, without live counters)."""
    out = []
    for c in client.containers.list(all=True, filters={"label": f"{PROJECT_LABEL}={project}"}):
        labels = c.labels or {}
        out.append((c, ContainerInfo(
            name=c.name, id=c.id, hostname=(c.attrs.get("Config") or {}).get("Hostname", ""),
            service=labels.get(SERVICE_LABEL, ""), state=c.status, number=_int(labels.get(NUMBER_LABEL)),
        )))
    return out


def _container_env(container, name: str) -> str | None:
    for item in (container.attrs.get("Config") or {}).get("Env") or []:
        key, _, value = item.partition("=")
        if key == name:
            return value
    return None


def _ps_port(container) -> int:
    address = _container_env(container, "GRADWIRE_ADDRESS") or ""
    try:
        return int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return DEFAULT_PORT


# Runs inside the PS container: imports only grpc and the generated protos (~0.3 s), unlike the
# full CLI, so the Status and the interface counters read beside it are close in time.
_STATUS_SNIPPET = (
    "import json, sys, grpc\n"
    "from gradwire.status import fetch_status, status_as_dict\n"
    "with grpc.insecure_channel(sys.argv[1]) as ch:\n"
    "    print(json.dumps(status_as_dict(fetch_status(ch))))\n"
)


def _status_via_exec(container) -> dict | None:
    """The PS's Status, fetched inside the PS container over its loopback."""
    address = f"127.0.0.1:{_ps_port(container)}"
    for cmd in (["python", "-c", _STATUS_SNIPPET, address],
                ["gradwire", "status", "--json", "--address", address]):
        try:
            result = container.exec_run(cmd, demux=True)
        except Exception:
            return None
        stdout = (result.output[0] if isinstance(result.output, tuple) else result.output) or b""
        if result.exit_code == 0:
            try:
                return json.loads(stdout)
            except json.JSONDecodeError:
                continue
    return None


def _summary_via_archive(container) -> dict | None:
    """summary.json copied out of the PS container (which may have stopped)."""
    out = _container_env(container, "GRADWIRE_OUT") or "/runs"
    try:
        stream, _ = container.get_archive(f"{out.rstrip('/')}/summary.json")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = next(m for m in tar.getmembers() if m.isfile())
            return json.load(tar.extractfile(member))  # type: ignore[arg-type]  # a file member has a reader
    except Exception:
        return None


def collect(client, project: str, ps_service: str = DEFAULT_PS_SERVICE,
            worker_service: str = DEFAULT_WORKER_SERVICE) -> dict[str, Any]:
    pairs = list_containers(client, project)
    if not pairs:
        projects = sorted({p for c in client.containers.list(all=True) if (p := (c.labels or {}).get(PROJECT_LABEL))})
        raise ReportError(f"no containers of compose project {project!r}"
                          + (f"; projects found: {', '.join(projects)}" if projects else "; is it up (docker compose up)?"))
    ps = next((c for c, info in pairs if info.service == ps_service), None)
    if ps is None:
        raise ReportError(f"compose project {project!r} has no {ps_service!r} service container")
    # The Status and every running container's counters are read at the same time, so that during
    # training they describe (nearly) the same moment.
    running = [(c, info) for c, info in pairs if c.status == "running"]
    with ThreadPoolExecutor(max_workers=min(16, len(running) + 1)) as pool:
        status = pool.submit(_status_via_exec, ps) if ps.status == "running" else None
        for (_, info), live in zip(running, pool.map(lambda pair: _live_counters(pair[0]), running), strict=True):
            info.live = live
        data = status.result() if status is not None else None
    run = run_from_status(data) if data else None
    if run is None:
        summary = _summary_via_archive(ps)
        if summary is None:
            raise ReportError(f"the PS of project {project!r} ({ps.name}, {ps.status}) answers no Status and has "
                              "written no summary.json yet; try again in a moment")
        run = run_from_summary(summary)
    return build_report(run, [info for _, info in pairs], project=project, ps_service=ps_service,
                        worker_service=worker_service)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradwire bytes",
        description="Payload, protobuf and network-interface bytes per container and per round of a gradwire "
                    "compose project (running or finished).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--project", "-p", default=os.environ.get("COMPOSE_PROJECT_NAME") or DEFAULT_PROJECT,
                     help="compose project name (default: $COMPOSE_PROJECT_NAME or %(default)s)")
    src.add_argument("--summary", metavar="FILE", help="read a run's summary.json instead (no Docker needed)")
    src.add_argument("--status", metavar="FILE", help="read saved `gradwire status --json` output instead")
    p.add_argument("--ps-service", default=DEFAULT_PS_SERVICE)
    p.add_argument("--worker-service", default=DEFAULT_WORKER_SERVICE)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--watch", action="store_true", help="live view, refreshed until the PS stops (Ctrl-C ends it)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    p.add_argument("--rounds", type=int, default=None, metavar="N", help="show only the last N rounds")
    p.add_argument("--wait", action="store_true",
                   help="with --summary: wait for a summary written after this command started (the compose "
                        "'report' service prints the report of the run it started beside)")
    p.add_argument("--ps-host", default=os.environ.get("GRADWIRE_PS_HOST", ""), metavar="HOST",
                   help="with --wait: give up once HOST no longer resolves (the PS container stopped without "
                        "writing a summary); name resolution only, no traffic to the PS")
    p.add_argument("--wait-timeout-s", type=float, default=0.0, help="with --wait: give up after this long (0: never)")
    return p


def _resolves(host: str) -> bool:
    import socket

    try:
        socket.getaddrinfo(host, None)
    except OSError:
        return False
    return True


def wait_for_summary(path: str, since: float, ps_host: str = "", timeout_s: float = 0.0, poll_s: float = 1.0) -> None:
    """Block until ``path`` was (re)written at or after ``since`` (a time.time()).

    Raises ReportError when ``ps_host`` stops resolving for a few polls without a fresh summary (the
    PS is gone), or after ``timeout_s`` (if > 0).
    """
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
    gone = 0
    while True:
        try:
            if os.stat(path).st_mtime >= since - 1.0:
                time.sleep(0.2)  # the PS writes a temporary file and renames it: complete once visible
                return
        except OSError:
            pass
        if ps_host:
            gone = 0 if _resolves(ps_host) else gone + 1
            if gone >= 3:
                raise ReportError(f"{ps_host} stopped without writing {path}: see its log (docker compose logs ps)")
        if time.monotonic() > deadline:
            raise ReportError(f"no fresh {path} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def _from_file(path: str, kind: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path}: {e}") from e
    run = run_from_summary(data) if kind == "summary" else run_from_status(data)
    return build_report(run, project=None)


def _console():
    from rich.console import Console

    # Not a terminal (a pipe, a file, `docker compose up` logs): wide enough that no column is cut.
    return Console(width=None if sys.stdout.isatty() else max(160, int(os.environ.get("COLUMNS", "0") or 0)))


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.interval <= 0:
        print("gradwire bytes: --interval must be > 0", file=sys.stderr)
        return 2
    try:
        if args.summary or args.status:
            if args.wait and args.summary:
                wait_for_summary(args.summary, started, args.ps_host, args.wait_timeout_s)
            report = _from_file(args.summary or args.status, "summary" if args.summary else "status")
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                _console().print(render(report, args.rounds))
            return 0
        client = docker_client()
        if args.json and not args.watch:
            print(json.dumps(collect(client, args.project, args.ps_service, args.worker_service), indent=2))
            return 0
        if not args.watch:
            _console().print(render(collect(client, args.project, args.ps_service, args.worker_service), args.rounds))
            return 0
        return _watch(client, args)
    except ReportError as e:
        print(f"gradwire bytes: {e}", file=sys.stderr)
        return 1


def _watch(client, args) -> int:
    """Refresh until the PS has finished and stopped. With --json: one JSON object per line."""
    from rich.live import Live
    from rich.text import Text

    def done(report: Mapping[str, Any]) -> bool:
        return report["finished"] and report["ps"]["state"] != "running"

    try:
        if args.json:
            while True:
                try:
                    report = collect(client, args.project, args.ps_service, args.worker_service)
                except ReportError as e:
                    print(f"gradwire bytes: {e}", file=sys.stderr)
                else:
                    print(json.dumps(report), flush=True)
                    if done(report):
                        return 0
                time.sleep(args.interval)
        with Live(Text("waiting for the first report…"), console=_console(), refresh_per_second=4) as live:
            while True:
                try:
                    report = collect(client, args.project, args.ps_service, args.worker_service)
                except ReportError as e:
                    live.update(Text(f"{time.strftime('%H:%M:%S')} {e}", style="yellow"))
                else:
                    live.update(render(report, args.rounds or 15))
                    if done(report):
                        return 0
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
