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
    # The baseline is read after the warm-up (a tenth of the messages), between the first Welcome and the end.
    assert report.warmup_messages == 4
    assert report.ps_peak_rss_start_bytes <= report.ps_peak_rss_baseline_bytes <= report.ps_peak_rss_end_bytes
    # What makes 100,000 messages affordable: a refused message ends its session, so most messages come
    # from a fresh session at the same round and share one honest encoding. Encodings are then at most
    # one per accepted update (its session goes on) plus one per round.
    assert 0 < report.encodings <= 2 * report.accepted + 1, report
    assert report.encodings < report.messages


def test_the_fuzz_command_runs_codecs_at_once_and_reports_in_json(tmp_path):
    out = tmp_path / "fuzz.json"
    done = subprocess.run([sys.executable, "-m", "gradwire.cli", "fuzz", "--codecs", "sign,dense", "--messages", "21",
                           "--jobs", "2", "--seconds", "180", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    data = json.loads(out.read_text())
    total = data["total"]
    assert total["messages"] == 21 and total["crashes"] == 0 and total["non_finite_models"] == 0, done.stdout
    assert total["jobs"] == 2 and total["messages_per_second"] > 0
    # exit 1 only for a crash, a non-finite model or RSS growth over the bound (noise after so few messages)
    over = total["codecs_over_rss_bound"]
    assert done.returncode == (1 if over else 0), done.stdout + done.stderr
    assert [c["messages"] for c in data["codecs"]] == [11, 10]
    for c in data["codecs"]:
        assert c["rss_bound_bytes"] == 4 * c["largest_message_bytes"]
        assert c["rss_growth_bytes"] == c["ps_peak_rss_end_bytes"] - c["ps_peak_rss_baseline_bytes"]
    assert "in all: 21 messages" in done.stdout
