"""The shell scripts' process hygiene: what once hung CI for 30 minutes.

bootstrap.sh holds a flock on fd 9 while it runs. When it had to start dockerd itself, the daemon
inherited that descriptor and held the lock for its whole life, so the container test's own
bootstrap waited on it until the CI timeout. These tests need no Docker engine.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")


def _open_fds(pid: int) -> dict[int, str]:
    fds = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            fds[int(entry.name)] = os.readlink(entry)
        except OSError:
            pass
    return fds


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs util-linux flock")
def test_detach_gives_the_daemon_none_of_the_callers_descriptors(tmp_path):
    lock = tmp_path / "held.lock"
    log = tmp_path / "daemon.log"
    # The caller holds a lock on fd 9, as bootstrap.sh does, then starts a daemon through detach.sh.
    caller = f'exec 9>"{lock}" && flock 9 && bash "{SCRIPTS / "detach.sh"}" "{log}" sleep 30'
    out = subprocess.run(["bash", "-c", caller], capture_output=True, text=True, timeout=30, check=True)
    pid = int(out.stdout.strip())
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:        # until the exec has happened
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep"):
                break
            time.sleep(0.05)
        fds = _open_fds(pid)
        assert str(lock) not in fds.values(), fds
        assert set(fds) <= {0, 1, 2}, fds
        assert fds[0] == "/dev/null" and fds[1] == fds[2] == str(log)
        assert os.getsid(pid) == pid, "the daemon should lead its own session"
        with lock.open("w") as again:           # the caller has exited, so the lock is free now
            fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(pid, 9)


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs util-linux flock")
def test_bootstrap_waits_a_bounded_time_for_its_lock_and_says_who_holds_it(tmp_path):
    lock = tmp_path / f"gradwire-bootstrap-{os.getuid()}.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        env = dict(os.environ, TMPDIR=str(tmp_path), GRADWIRE_BOOTSTRAP_LOCK_WAIT_S="1")
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(SCRIPTS / "bootstrap.sh")], env=env, capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode != 0
    assert "another bootstrap holds" in proc.stderr and "still held after 1 s" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 30


def test_bootstrap_passes_its_lock_to_no_child():
    text = (SCRIPTS / "bootstrap.sh").read_text()
    assert 'install_docker.sh" 9>&-' in text
    assert "detach.sh" in (SCRIPTS / "install_docker.sh").read_text()
