"""Running one ``gradwire simulate`` as a subprocess for the experiment scripts.

Each simulation runs in its own process group, so a timeout or a diverged run ends the PS and
every worker with it instead of orphaning them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

DIVERGED_MARKERS = ("contains NaN or Inf", "decodes to NaN or Inf")


def end_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_simulation(cmd: list[str], log: Path, timeout_s: float) -> tuple[str, list[str]]:
    """Run one simulation in its own process group; returns (status, last output lines).

    status is "ok", "diverged" (a worker refused NaN/Inf input: the training blew up,
    after which the PS would wait for workers that died, so the group is ended at
    once), "timeout" or "exit <code>". Ending the group also ends the simulation's PS
    and workers, which a plain subprocess timeout would orphan.
    """
    with open(log.with_suffix(".out"), "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        status = None
        while status is None:
            try:
                proc.wait(timeout=2.0)
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                text = log.read_text(errors="replace") if log.exists() else ""
                if any(marker in text for marker in DIVERGED_MARKERS):
                    status = "diverged"
                elif time.monotonic() > deadline:
                    status = "timeout"
                if status is not None:
                    end_group(proc)
    tail = log.with_suffix(".out").read_text(errors="replace").strip().splitlines()[-2:]
    if status != "ok" and log.exists():
        hits = [ln for ln in log.read_text(errors="replace").splitlines() if any(m in ln for m in DIVERGED_MARKERS)]
        tail = (hits[-1:] or tail)
    return status, tail
