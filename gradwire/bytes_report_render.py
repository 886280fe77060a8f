"""`gradwire bytes`, rendering: the report as rich tables (per container, per round, notes).

Part of the bytes report (``gradwire bytes``, docs/algorithms.md §6; overview in
``gradwire/bytes_report.py``). Renders the plain-data report of ``bytes_report_model``;
``--json`` prints that data as it is. Two views: the compact default (``render``), which fits
100 columns and leads with accuracy, time and compression per direction, and the wide one
(``render_wide``, ``--wide``) with every byte count side by side.
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

NA = "n/a"
COMPACT_WIDTH = 100
COMPACT_ROUNDS = 5


def _b(n: int | float | None) -> str:
    return NA if n is None else f"{int(n):,}"


def _si(n: int | float | None, unit: str = "B") -> str:
    """Bytes (or bit/s) with an SI prefix, 3 significant digits: fits a narrow column."""
    if n is None:
        return NA
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def _r(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _x(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:.1f}×" if x < 100 else f"{x:,.0f}×"


_SOURCE = {"docker-stats": "live", "recorded": "rec", "none": NA, "not-on-path": NA}


def _x_na(x: float | None) -> str:
    return NA if x is None else _x(x)


def _where(report: Mapping[str, Any]) -> str:
    """What the report is of: a compose project, a swarm stack, or a file's source."""
    if report.get("stack"):
        return f"stack {report['stack']}"
    return f"project {report['project']}" if report["project"] else f"from {report['source']}"


def _header(report: Mapping[str, Any]):
    """The lines a reader wants first: accuracy, time, rounds, compression per direction."""
    from rich.text import Text

    head = report["headline"]
    state = "finished" if report["finished"] else "running"
    where = _where(report)
    acc = head["final_accuracy"]
    elapsed = head["elapsed_s"]
    t = Text()
    t.append(f"gradwire bytes · {where} · {state}\n", style="bold")
    t.append("accuracy ")
    t.append(NA if acc is None else f"{acc:.4f}", style="bold")
    t.append(" · time ")
    t.append(NA if elapsed is None else f"{elapsed:.1f} s", style="bold")
    t.append(f" · round {head['round']}/{head['total_rounds']} · {head['workers']} workers"
             f" · {report['params']:,} params\n")
    for arrow, name, codec in (("↑", "uplink", report["codec"] or "–"),
                               ("↓", "downlink", report.get("downlink_codec") or "dense")):
        c = head[name]
        t.append(f"{arrow} {name:<8} ")
        t.append(f"{_x_na(c['payload_compression']):>7}", style="bold")
        t.append(f" payload, {_x_na(c['interface_compression']):>7} on the wire vs dense float32 · codec {codec}\n")
    return t


def render(report: Mapping[str, Any], max_rounds: int | None = None, wide: bool = False):
    """The compact view (fits 100 columns), or with ``wide`` every count side by side."""
    if wide:
        return render_wide(report, max_rounds)
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False, collapse_padding=True)
    for name in ("worker", "rank", "link", "↑ payload", "↑ wire", "↑ achieved", "↓ payload", "↓ wire",
                 "↓ achieved"):
        # An UP/DOWN profile folds onto a second line where 100 columns are short; nothing is cut with "…".
        t.add_column(name, justify="left" if name in ("worker", "link") else "right",
                     no_wrap=name != "link", overflow="fold")
    for r in report["workers"]:
        ok = r["uplink_within_allowance"]
        # The honest-accounting check colours the uplink wire bytes (the ratio itself: --wide, --json).
        up_wire = Text(_si(r["interface_tx_bytes"]), style="" if ok is None else "green" if ok else "bold red")
        t.add_row(r["name"] or "?", "–" if r["rank"] is None else str(r["rank"]), r["link_profile"] or NA,
                  _si(r["uplink_payload_bytes"]), up_wire, _si(r["achieved_up_bps"], "b/s"),
                  _si(r["downlink_payload_bytes"]), _si(r["interface_rx_bytes"]), _si(r["achieved_down_bps"], "b/s"))
    tot = report["totals"]
    t.add_section()
    t.add_row(Text("all", style="bold"), "", "", _si(tot["uplink_payload_bytes"]), _si(tot["interface_tx_bytes"]),
              _si(tot["achieved_up_bps"], "b/s"), _si(tot["downlink_payload_bytes"]), _si(tot["interface_rx_bytes"]),
              _si(tot["achieved_down_bps"], "b/s"))
    ps = report["ps"]
    # The PS's side of the same traffic: it receives the uplink (rx) and sends the downlink (tx).
    t.add_row(Text(f"{ps['name']} (PS)", style="bold"), "", "", _si(ps["uplink_payload_bytes"]),
              _si(ps["interface_rx_bytes"]), _si(ps["achieved_up_bps"], "b/s"), _si(ps["downlink_payload_bytes"]),
              _si(ps["interface_tx_bytes"]), _si(ps["achieved_down_bps"], "b/s"))
    rounds = report["rounds"]
    limit = COMPACT_ROUNDS if max_rounds is None else max_rounds
    shown = rounds[-limit:] if limit else rounds
    rt = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False, collapse_padding=True,
               title=f"rounds{'' if len(shown) == len(rounds) else f' (last {len(shown)} of {len(rounds)})'}",
               title_justify="left")
    adaptive = any(r.get("rates") for r in rounds)
    for name in ("round", "workers", "↑ payload", "↓ payload", "↑ b/entry", "train loss", "test acc",
                 *(("rate by rank",) if adaptive else ())):
        rt.add_column(name, justify="right", no_wrap=True)
    for r in shown:
        rt.add_row(str(r["round"]), str(r["workers"]), _si(r["uplink_payload_bytes"]), _si(r["downlink_payload_bytes"]),
                   _r(r["payload_bits_per_entry"], 2), _r(r["train_loss"], 4), _r(r["test_accuracy"], 4),
                   *((_rates(r.get("rates")),) if adaptive else ()))
    notes = Text(
        "payload = codec bytes the PS counted; wire = the worker's own interface (tx up, rx down) over the "
        "session, with all framing (green: within the allowance over the protobuf bytes); achieved = wire "
        f"bits / the PS's training time; {NA} = no counter for it. --wide: every count.",
        style="dim")
    return Group(_header(report), *_worker_tables(t, report, adaptive), rt, notes)


def _g(x: float | None) -> str:
    return NA if x is None else f"{x:.3g}"


def _rates(rates: Mapping[str, float] | None) -> str:
    """A round's rates by rank, e.g. ``8/8/32`` for ranks 0, 1, 2 (bits, ratio or rank of the ladder)."""
    if not rates:
        return NA
    return "/".join(f"{v:g}" for _, v in sorted(rates.items(), key=lambda kv: int(kv[0])))


def _worker_tables(workers: Any, report: Mapping[str, Any], adaptive: bool) -> list[Any]:
    """The per-worker table, and beside it the adaptive codec's rates when the run used it."""
    return [workers, _rate_table(report)] if adaptive else [workers]


def _rate_table(report: Mapping[str, Any]):
    """The adaptive codec's choices per worker: rate, how often it changed, the link the PS measured."""
    from rich import box
    from rich.table import Table

    target = report.get("rate_target_s")
    t = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False, collapse_padding=True,
              title="adaptive rate" + (f" (round-trip target {target:g} s)" if target else ""), title_justify="left")
    for name in ("worker", "rank", "last rate", "mean rate", "changes", "measured link", "within target"):
        t.add_column(name, justify="left" if name == "worker" else "right", no_wrap=True)
    for r in report["workers"]:
        within = r.get("round_trips_within_target")
        t.add_row(r["name"] or "?", "–" if r["rank"] is None else str(r["rank"]), _g(r.get("rate_last")),
                  _g(r.get("rate_mean")), NA if r.get("rate_changes") is None else str(r["rate_changes"]),
                  _si(r.get("measured_link_bps"), "b/s"), NA if within is None else f"{within:.0%}")
    return t


def render_wide(report: Mapping[str, Any], max_rounds: int | None = None):
    """A rich renderable: the per-container table, then the per-round table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state = "finished" if report["finished"] else "running"
    where = _where(report)
    downlink = report.get("downlink_codec") or "dense"
    title = (f"gradwire bytes · {where} · codec {report['codec'] or '–'}"
             f"{'' if downlink == 'dense' else f' · downlink {downlink}'} · "
             f"{report['params']:,} params · round {report['round']}/{report['total_rounds']} ({state})")
    t = Table(title=title, title_justify="left", header_style="bold")
    for name in ("container", "rank", "rounds", "link", "↑ payload\nB", "↑ protobuf\nB", "↑ iface\nB", "↑ iface\n/proto",
                 "↓ payload\nB", "↓ protobuf\nB", "↓ iface\nB", "↓ iface\n/proto", "payload\nb/entry", "iface\nb/entry",
                 "vs dense\n(iface)", "src"):
        t.add_column(name, justify="left" if name in ("container", "link", "src") else "right", no_wrap=True)
    for r in report["workers"]:
        ok = r["uplink_within_allowance"]
        ratio_text = Text(_r(r["tx_over_message"]), style="" if ok is None else "green" if ok else "bold red")
        link = LinkCounters.from_dict(r)
        t.add_row(
            r["name"] or "?", "–" if r["rank"] is None else str(r["rank"]),
            str(r["rounds"]), r["link_profile"] or NA, _b(link.uplink_payload_bytes), _b(r["uplink_protobuf_bytes"]),
            _b(r["interface_tx_bytes"]), ratio_text, _b(link.downlink_payload_bytes),
            _b(link.downlink_message_bytes), _b(r["interface_rx_bytes"]),
            _r(r["rx_over_downlink"]), _r(r["payload_bits_per_entry"], 2), _r(r["interface_bits_per_entry"], 2),
            _x(r["interface_compression"]), _SOURCE.get(r["interface_source"], r["interface_source"]),
        )
    tot = report["totals"]
    links = LinkCounters.from_dict(tot)
    t.add_section()
    t.add_row(
        Text("workers", style="bold"), "", str(tot["updates"]), "", _b(links.uplink_payload_bytes),
        _b(links.uplink_message_bytes), _b(tot["interface_tx_bytes"]), _r(tot["tx_over_message"]),
        _b(links.downlink_payload_bytes), _b(links.downlink_message_bytes), _b(tot["interface_rx_bytes"]), _r(tot["rx_over_downlink"]),
        _r(tot["payload_bits_per_entry"], 2), _r(tot["interface_bits_per_entry"], 2), _x(tot["interface_compression"]), "",
    )
    ps = report["ps"]
    ps_links = LinkCounters.from_dict(ps)
    # The PS's side of the same traffic: it receives the uplink (rx) and sends the downlink (tx).
    t.add_row(
        Text(f"{ps['name']} (PS)", style="bold"), "", "", "", _b(ps_links.uplink_payload_bytes),
        _b(ps_links.uplink_message_bytes), _b(ps["interface_rx_bytes"]), _r(ps["rx_over_uplink_message"]),
        "", _b(ps_links.downlink_message_bytes), _b(ps["interface_tx_bytes"]), _r(ps["tx_over_downlink"]), "", "", "",
        _SOURCE.get(ps["interface_source"], ps["interface_source"]),
    )
    rounds = report["rounds"]
    shown = rounds[-max_rounds:] if max_rounds else rounds
    rt = Table(title=f"per round (PS counts){'' if len(shown) == len(rounds) else f', last {len(shown)} of {len(rounds)}'}",
               title_justify="left", header_style="bold")
    adaptive = any(r.get("rates") for r in rounds)
    for name in ("round", "workers", "↑ payload B", "↑ protobuf B", "↓ payload B", "↓ protobuf B", "payload b/entry",
                 "train loss", "test acc", *(("rate by rank",) if adaptive else ())):
        rt.add_column(name, justify="right", no_wrap=True)
    for r in shown:
        link = LinkCounters.from_dict(r)
        rt.add_row(str(r["round"]), str(r["workers"]), _b(link.uplink_payload_bytes), _b(link.uplink_message_bytes),
                   _b(link.downlink_payload_bytes), _b(link.downlink_message_bytes), _r(r["payload_bits_per_entry"], 2), _r(r["train_loss"], 4),
                   _r(r["test_accuracy"], 4), *((_rates(r.get("rates")),) if adaptive else ()))
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
    return Group(_header(report), *_worker_tables(t, report, adaptive), rt, notes)
