"""`gradwire bytes`: what a compose project (or swarm stack) put on the wire, per container and per round.

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
``--stack NAME`` reads a ``docker stack deploy`` stack the same way (its containers by their swarm
labels, named ``STACK_SERVICE.SLOT``).
``--summary FILE`` or ``--status FILE`` read a saved summary / ``gradwire status --json`` output
instead and need no Docker engine.
Parts: ``bytes_report_run`` (the sources: Status / summary.json into ``RunData``),
``bytes_report_model`` (the report: rows, totals, allowance), ``bytes_report_render`` (rich
tables), ``bytes_report_docker`` (containers and counters via the docker SDK); this module is
the command line (``--summary`` / ``--status`` / ``--project``, ``--json``, ``--wide``, ``--watch``,
``--wait``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

# Names imported ``X as X`` are re-exported: callers and tests use gradwire.bytes_report as the report's entry.
from gradwire.bytes_report_docker import DEFAULT_PROJECT, collect, docker_client
from gradwire.bytes_report_model import DEFAULT_PS_SERVICE, DEFAULT_WORKER_SERVICE, build_report
from gradwire.bytes_report_model import ContainerInfo as ContainerInfo
from gradwire.bytes_report_model import allowance_bytes as allowance_bytes
from gradwire.bytes_report_model import interface_bytes as interface_bytes
from gradwire.bytes_report_model import within_allowance as within_allowance
from gradwire.bytes_report_render import COMPACT_WIDTH, render
from gradwire.bytes_report_run import ReportError, run_from_status, run_from_summary
from gradwire.bytes_report_run import _counters as _counters
from gradwire.bytes_report_run import run_from_json as run_from_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradwire bytes",
        description="Payload, protobuf and network-interface bytes per container and per round of a gradwire "
                    "compose project or swarm stack (running or finished).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--project", "-p", default=os.environ.get("COMPOSE_PROJECT_NAME") or DEFAULT_PROJECT,
                     help="compose project name (default: $COMPOSE_PROJECT_NAME or %(default)s)")
    src.add_argument("--stack", "-s", default=None, metavar="NAME",
                     help="a swarm stack (`docker stack deploy -c docker-compose.yml NAME`) instead of a compose "
                          "project; a --project name with no compose containers is looked up as a stack too")
    src.add_argument("--summary", metavar="FILE", help="read a run's summary.json instead (no Docker needed)")
    src.add_argument("--status", metavar="FILE", help="read saved `gradwire status --json` output instead")
    p.add_argument("--ps-service", default=DEFAULT_PS_SERVICE)
    p.add_argument("--worker-service", default=DEFAULT_WORKER_SERVICE)
    p.add_argument("--json", action="store_true", help="print the report as JSON (every figure the tables show)")
    p.add_argument("--wide", action="store_true",
                   help="every byte count side by side (about 170 columns) instead of the compact 100-column view")
    p.add_argument("--link", default=None, metavar="PROFILE",
                   help="the run's GRADWIRE_LINK, where the source does not say it (a summary of `simulate --link`)")
    p.add_argument("--links", default=None, metavar="LIST",
                   help="the run's GRADWIRE_LINKS (by rank), where the source does not say it")
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


# How long --ps-host may not resolve before it first does: a swarm starts the report beside the PS,
# and the PS's name resolves only once its task runs (compose starts the PS first).
PS_HOST_APPEAR_S = 300.0


def wait_for_summary(path: str, since: float, ps_host: str = "", timeout_s: float = 0.0, poll_s: float = 1.0,
                     appear_s: float = PS_HOST_APPEAR_S) -> None:
    """Block until ``path`` was (re)written at or after ``since`` (a time.time()).

    Raises ReportError when ``ps_host``, once it resolved, stops resolving for a few polls without a
    fresh summary (the PS is gone), or never resolves within ``appear_s``, or after ``timeout_s`` (if > 0).
    """
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
    appear_deadline = time.monotonic() + appear_s
    gone = 0
    seen = False
    while True:
        try:
            if os.stat(path).st_mtime >= since - 1.0:
                time.sleep(0.2)  # the PS writes a temporary file and renames it: complete once visible
                return
        except OSError:
            pass
        if ps_host:
            resolves = _resolves(ps_host)
            seen = seen or resolves
            if not seen and time.monotonic() > appear_deadline:
                raise ReportError(f"{ps_host} did not resolve within {appear_s:.0f} s: is the PS running?")
            gone = 0 if resolves or not seen else gone + 1
            if gone >= 3:
                raise ReportError(f"{ps_host} stopped without writing {path}: see its log (docker compose logs ps)")
        if time.monotonic() > deadline:
            raise ReportError(f"no fresh {path} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def _from_file(path: str, kind: str, link: str | None = None, links: str | None = None) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path}: {e}") from e
    run = run_from_summary(data) if kind == "summary" else run_from_status(data)
    return build_report(run, project=None, link_env=link, links_env=links)


def _console(wide: bool = False):
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    # Not a terminal (a pipe, a file, `docker compose up` logs): the compact view's 100 columns, or
    # for --wide as wide as the table needs (set in _print) so that no column is cut.
    return Console(width=max(COMPACT_WIDTH, int(os.environ.get("COLUMNS", "0") or 0)))


def _print(console, report: Mapping[str, Any], rounds: int | None, wide: bool) -> None:
    renderable = render(report, rounds, wide)
    if wide:
        from rich.measure import Measurement
        from rich.table import Table

        # The widest table decides: rich would otherwise cut its columns to the terminal (`↑ protob…`);
        # a terminal narrower than that wraps the lines instead, with every figure whole.
        options = console.options.update_width(10_000)
        need = max(Measurement.get(console, options, part).maximum for part in renderable.renderables
                   if isinstance(part, Table))
        console.width = max(console.width, need)
    console.print(renderable)


def _line(report: Mapping[str, Any]) -> str:
    """One line per refresh for --watch without a terminal (logs keep every one)."""
    head, tot = report["headline"], report["totals"]
    acc = head["final_accuracy"]

    def si(n: float | None) -> str:
        return "n/a" if n is None else f"{n:,.0f}"

    return (f"{time.strftime('%H:%M:%S')} round {head['round']}/{head['total_rounds']} · "
            f"{head['workers']} workers · accuracy {'n/a' if acc is None else f'{acc:.4f}'} · "
            f"↑ payload {si(tot['uplink_payload_bytes'])} B wire {si(tot['interface_tx_bytes'])} B · "
            f"↓ payload {si(tot['downlink_payload_bytes'])} B wire {si(tot['interface_rx_bytes'])} B")


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
            report = _from_file(args.summary or args.status, "summary" if args.summary else "status",
                                args.link, args.links)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                _print(_console(), report, args.rounds, args.wide)
            return 0
        client = docker_client()
        if args.json and not args.watch:
            print(json.dumps(_collect(client, args), indent=2))
            return 0
        if not args.watch:
            _print(_console(), _collect(client, args), args.rounds, args.wide)
            return 0
        return _watch(client, args)
    except ReportError as e:
        print(f"gradwire bytes: {e}", file=sys.stderr)
        return 1


def _collect(client, args) -> dict[str, Any]:
    return collect(client, args.project, args.ps_service, args.worker_service, link=args.link, links=args.links,
                   stack=args.stack)


def _watch(client, args) -> int:
    """Refresh until the PS has finished and stopped. With --json: one JSON object per line; without
    a terminal: one line per refresh, then the whole report once the run is done."""
    from rich.live import Live
    from rich.text import Text

    def done(report: Mapping[str, Any]) -> bool:
        return report["finished"] and report["ps"]["state"] != "running"

    try:
        if args.json:
            while True:
                try:
                    report = _collect(client, args)
                except ReportError as e:
                    print(f"gradwire bytes: {e}", file=sys.stderr)
                else:
                    print(json.dumps(report), flush=True)
                    if done(report):
                        return 0
                time.sleep(args.interval)
        if not sys.stdout.isatty():
            # rich's Live draws only the last frame into a pipe or a log: print a line per refresh.
            while True:
                try:
                    report = _collect(client, args)
                except ReportError as e:
                    print(f"{time.strftime('%H:%M:%S')} gradwire bytes: {e}", flush=True)
                else:
                    print(_line(report), flush=True)
                    if done(report):
                        _print(_console(), report, args.rounds, args.wide)
                        return 0
                time.sleep(args.interval)
        with Live(Text("waiting for the first report…"), console=_console(), refresh_per_second=4) as live:
            while True:
                try:
                    report = _collect(client, args)
                except ReportError as e:
                    live.update(Text(f"{time.strftime('%H:%M:%S')} {e}", style="yellow"))
                else:
                    live.update(render(report, args.rounds or (15 if args.wide else None), args.wide))
                    if done(report):
                        return 0
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
