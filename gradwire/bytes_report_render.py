"""`gradwire bytes`, rendering: the report as rich tables (per container, per round, notes).

Part of the bytes report (``gradwire bytes``, docs/algorithms.md §6; overview in
``gradwire/bytes_report.py``). Renders the plain-data report of ``bytes_report_model``;
``--json`` prints that data as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradwire.bytes_report_model import (
    ALLOWANCE_PER_CONNECTION_BYTES,
    ALLOWANCE_PER_MESSAGE_BYTES,
    ALLOWANCE_RELATIVE,
)
from gradwire.counters import LinkCounters


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
