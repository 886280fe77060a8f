"""The `gradwire` command: server, worker, simulate, status, health, bytes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and names the GRADWIRE_* variable
    a bad value came from."""

    def error(self, message: str):
        match = re.search(r"argument (--[a-z0-9-]+)", message)
        if match:
            var = "GRADWIRE_" + match.group(1)[2:].replace("-", "_").upper()
            if os.environ.get(var):
                message += f" (from {var}={os.environ[var]!r})"
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(command: str, exc: BaseException) -> int:
    """A configuration, task or dataset error: one line on stderr, no traceback, exit code 2."""
    text = str(exc).strip().splitlines()
    print(f"gradwire {command}: error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
    return 2


def _logging(verbose: bool, command: str) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    # Under compose, GRADWIRE_LOG_DIR is a folder on the runs volume: every
    # process also logs to a file there, so the logs outlive the containers.
    log_dir = os.environ.get("GRADWIRE_LOG_DIR")
    if log_dir and command in ("server", "worker"):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(log_dir) / f"{command}-{socket.gethostname()}.log")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)


def build_parser() -> argparse.ArgumentParser:
    from gradwire.envvars import env
    from gradwire.server.config import add_server_flags, add_task_flags
    from gradwire.worker.config import add_client_security_flags, add_worker_flags

    p = OneLineParser(prog="gradwire", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("server", help="run the parameter server")
    add_server_flags(s)

    w = sub.add_parser("worker", help="run one worker")
    add_worker_flags(w)

    sim = sub.add_parser("simulate", help="PS + N workers as local processes on loopback")
    sim.add_argument("--workers", type=int, default=2)
    add_task_flags(sim)
    sim.add_argument("--json", default="", help="write the run summary here")
    sim.add_argument("--log", default="", help="write the processes' logs here")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.add_argument("--link", default="", help="shape every worker's link, RATE or UP/DOWN (e.g. 10mbit): "
                     "each worker then runs in a network namespace of its own (needs root and iproute2)")
    sim.add_argument("--links", default="", help="profiles by rank, e.g. 10mbit,10mbit,100mbit")
    sim.add_argument("--stale-updates", action="store_true",
                     help="workers compute the next gradient while their update is in flight (one round stale)")

    st = sub.add_parser("status", help="print a running PS's Status")
    st.add_argument("--address", default=env("STATUS_ADDRESS", "127.0.0.1:50051"))
    st.add_argument("--json", action="store_true")
    add_client_security_flags(st)

    h = sub.add_parser("health", help="exit 0 when the PS's gRPC health service says SERVING")
    h.add_argument("--address", default=env("STATUS_ADDRESS", "127.0.0.1:50051"))
    h.add_argument("--service", default="")
    add_client_security_flags(h)

    b = sub.add_parser("bytes", help="wire bytes per container and round of a compose project", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)

    fz = sub.add_parser("fuzz", help="mutation campaign against a PS of its own on loopback (gradwire/fuzz.py)")
    add_fuzz_flags(fz)

    codecs = sub.add_parser("codecs", help="list the registered codecs")
    codecs.add_argument("--options", action="store_true", help="also list every spec option with its default")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bytes":  # its own parser lives in gradwire.bytes_report
        from gradwire.bytes_report import main as bytes_main

        return bytes_main(argv[1:])
    args = build_parser().parse_args(argv)
    _logging(args.verbose, args.command)
    if args.command == "worker":
        from gradwire.memory import keep_large_blocks

        # model-sized blocks every round: reuse mapped pages (gradwire/memory.py); the PS decides
        # from its model's size (server/app.py serve)
        keep_large_blocks()
    if args.command == "server":
        from gradwire.memory import cap_malloc_arenas

        cap_malloc_arenas()  # first: glibc keeps every heap a thread made before the cap (memory.py)
        from gradwire.server.config import config_from_args
        from gradwire.taskref import resolve_factory

        try:  # bad settings, an unknown task, a missing data folder: one line, before any socket
            resolve_factory(args.task or args.dataset)  # an unknown task fails before torch is imported
            config = config_from_args(args)
            from gradwire.task import load_task

            task = load_task(config.task_ref, config.seed, config.data_dir or None, config.model or None)
        except (ValueError, OSError) as exc:
            if args.verbose:
                raise
            return fail("server", exc)
        from gradwire.server.app import serve

        return serve(config, task)
    if args.command == "worker":
        from gradwire.taskref import TaskError, resolve_factory
        from gradwire.worker.config import config_from_args as worker_config_from_args
        from gradwire.worker.loop import WorkerFailed, run_worker

        try:
            worker_config = worker_config_from_args(args)
            if worker_config.task:
                resolve_factory(worker_config.task)
            return run_worker(worker_config)
        except (ValueError, OSError, TaskError, WorkerFailed) as exc:
            if args.verbose:
                raise
            return fail("worker", exc)
    if args.command == "simulate":
        from gradwire.simulate import check_simulation, run_simulation

        try:
            check_simulation(args)
        except (ValueError, OSError) as exc:
            if args.verbose:
                raise
            return fail("simulate", exc)
        return run_simulation(args)
    if args.command == "status":
        from gradwire.channel import client_channel
        from gradwire.protocol import status_to_text
        from gradwire.status import fetch_status, status_as_dict

        with client_channel(args.address, [], args.tls_ca, args.tls_cert, args.tls_key, args.token,
                            args.tls_server_name) as channel:
            st = fetch_status(channel)
        print(json.dumps(status_as_dict(st), indent=2) if args.json else status_to_text(st))
        return 0
    if args.command == "health":
        from gradwire.channel import client_channel
        from gradwire.status import is_serving

        with client_channel(args.address, [], args.tls_ca, args.tls_cert, args.tls_key, args.token,
                            args.tls_server_name) as channel:
            return 0 if is_serving(args.address, args.service, channel=channel) else 1
    if args.command == "fuzz":
        from gradwire.fuzz import run_fuzz

        return run_fuzz(args)
    if args.command == "codecs":
        from gradwire.compressors.registry import CODECS, available_codecs

        for name in available_codecs():
            doc = (CODECS[name].__doc__ or "").strip().splitlines()
            print(f"{name:12s} {doc[0] if doc else ''}")
            if args.options:
                print(f"{'':12s} options: {codec_options(CODECS[name]) or '(none)'}")
        return 0
    return 2


# Every codec family; the slowest to fuzz (entropy coders: their PS builds a code per distinct
# parameter set) first, so that with --jobs the fast ones fill in behind them.
FUZZ_CODECS = ("huffman:bits=4", "fp8", "m22", "ans", "lag", "qsgd", "tpc", "powersgd", "dense", "topk", "randk",
               "sign")


def add_fuzz_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codecs", default=",".join(FUZZ_CODECS), help="semicolon- or comma-separated codec specs")
    p.add_argument("--messages", type=int, default=1000, help="messages in all, shared among the codecs")
    p.add_argument("--seconds", type=float, default=300.0, help="time budget in all, shared among the codecs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="codecs fuzzed at once, each against its own PS")
    p.add_argument("--dataset", default="digits", help="the fuzzed PS's task (a small one keeps messages cheap)")
    p.add_argument("--model", default="linear")
    p.add_argument("--json", default="", help="write the report here")


def codec_options(cls) -> str:
    """``key=default`` for every spec option of a codec class, in declaration order."""
    import dataclasses

    from gradwire.compressors.base import format_option, option_defaults

    return ",".join(name if default is dataclasses.MISSING else f"{name}={format_option(default)}"
                    for name, default in option_defaults(cls).items())


if __name__ == "__main__":
    sys.exit(main())
