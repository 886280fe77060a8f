"""A short `gradwire fuzz` campaign: a real PS process on loopback, mutated messages of two codecs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradwire.fuzz import fuzz_codec


@pytest.mark.parametrize("codec", ["topk", "tpc"])
def test_a_short_fuzz_campaign_finds_no_crash_and_no_non_finite_model(codec):
    report = fuzz_codec(codec, messages=40, seconds=120, seed=3)
    assert report.crashes == []
    assert report.non_finite_models == 0
    assert report.messages >= 20, report  # bounded by time on a loaded machine, but it did send
    assert report.replies.get("INVALID_ARGUMENT", 0) > 0  # the mutations were refused, with reasons
    # the PS's peak RSS does not grow by more than a few times the largest message (plus noise)
    assert report.rss_growth_bytes <= 4 * report.largest_message_bytes + 48 * 2**20, report


def test_the_fuzz_command_reports_in_json(tmp_path):
    out = tmp_path / "fuzz.json"
    done = subprocess.run([sys.executable, "-m", "gradwire.cli", "fuzz", "--codecs", "sign", "--messages", "10",
                           "--seconds", "90", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    total = json.loads(out.read_text())["total"]
    assert total["messages"] == 10 and total["crashes"] == 0
