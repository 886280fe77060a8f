"""The installed console script, end to end: PS and workers as separate processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

# The console script of the environment running the tests (beside its python), not whichever
# `gradwire` PATH finds first: on a machine with several installs that was another checkout's.
_SCRIPT = shutil.which("gradwire", path=os.path.dirname(sys.executable))
GRADWIRE = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "gradwire.cli"]


def simulate(tmp_path, *extra: str, name: str = "run") -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [*GRADWIRE, "simulate", "--quiet", "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_dense_default_task_done_when(tmp_path):
    """Issue 2's figures: accuracy ≥ 0.85, exact payload, framing < 1 % + 200 B per message."""
    s = simulate(tmp_path, "--workers", "2", "--rounds", "60", "--codec", "dense")
    assert s["final_accuracy"] >= 0.85
    assert s["uplink_payload_bytes"] == 4 * s["params"] * s["workers"] * s["rounds"]
    messages = s["workers"] * s["rounds"]
    assert s["uplink_payload_bytes"] < s["uplink_message_bytes"] < 1.01 * s["uplink_payload_bytes"] + 200 * messages
    assert s["uplink_bits_per_entry"] == 32.0
    for key in ("codec", "workers", "rounds", "params", "final_accuracy", "uplink_payload_bytes",
                "uplink_message_bytes", "downlink_message_bytes", "uplink_bits_per_entry", "codec_stats", "rounds_log"):
        assert key in s
    assert len(s["rounds_log"]) == 60
    assert {"round", "uplink_payload_bytes", "train_loss", "test_accuracy"} <= set(s["rounds_log"][-1])


@pytest.mark.slow
def test_same_seed_same_result_and_full_batch_regression(tmp_path):
    args = ["--workers", "3", "--rounds", "8", "--codec", "fp16", "--dataset", "diabetes", "--batch-size", "full", "--lr", "0.1"]
    a = simulate(tmp_path, *args, name="a")
    b = simulate(tmp_path, *args, name="b")
    assert a["final_accuracy"] is None and a["final_loss"] is not None
    assert a["final_loss"] == b["final_loss"]
    assert [e["train_loss"] for e in a["rounds_log"]] == [e["train_loss"] for e in b["rounds_log"]]
    assert a["rounds_log"][-1]["train_loss"] < a["rounds_log"][0]["train_loss"]
    assert a["uplink_bits_per_entry"] == 16.0 and a["batch_size"] == "full"


@pytest.mark.slow
def test_server_entry_point_prints_address(tmp_path):
    proc = subprocess.Popen([*GRADWIRE, "server", "--address", "127.0.0.1:0", "--workers", "1", "--rounds", "1",
                             "--start-timeout-s", "300", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:")
        port = int(line.strip().rsplit(":", 1)[1])
        assert port > 0
        status = subprocess.run([*GRADWIRE, "health", "--address", f"127.0.0.1:{port}"], timeout=30)
        assert status.returncode == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_codecs_lists_every_codec_with_its_options():
    proc = subprocess.run([*GRADWIRE, "codecs", "--options"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    names = {line.split()[0] for line in lines if line and not line[0].isspace()}
    assert {"dense", "fp16", "huffman", "ans", "fp8", "m22", "tpc", "lag", "lgc", "topk", "randk", "qsgd", "sign",
            "powersgd"} <= names
    topk_options = lines[[i for i, line in enumerate(lines) if line.startswith("topk ")][0] + 1]
    assert "ratio=0.01" in topk_options and "momentum=0" in topk_options and "masking=1" in topk_options
