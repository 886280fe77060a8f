"""Bandwidth-adaptive compression through a real loopback PS: the PS measures each worker's round
trip, feeds it to the codec's state (CrossWorkerState.observe_link), and the rate it then chooses
per worker reaches that worker's encoder and the PS's decoder alike.

Loopback links are all fast, so one worker's measurements are made slow on their way into the hook
(its transfer time × 10,000): the same code path as a real slow link, deterministic on any machine.
"""

from __future__ import annotations

from dataclasses import replace

from gradwire.compressors.base import CrossWorkerState, LinkSample

SLOW_RANK = 0


def test_the_measured_link_chooses_each_workers_rate(make_server, run_workers):
    rounds = 6
    server = make_server(workers=2, rounds=rounds, codec="adaptive:rates=(2,4,8,32),target=20")
    state = server.engine.codec_state
    seen: list[tuple[int, LinkSample]] = []
    measured = state.observe_link

    def slowed(rank: int, sample: LinkSample) -> None:
        seen.append((rank, sample))
        if rank == SLOW_RANK:  # a link 10,000 x slower than loopback: more than 20 s per round
            sample = replace(sample, transfer_seconds=max(sample.transfer_seconds, 0.01) * 1e4)
        measured(rank, sample)

    state.observe_link = slowed
    results = run_workers(server.port, 2, "a")
    server.thread.join(60)
    s = server.summary()
    assert all(r.finished for r in results), [r.rejections for r in results]
    assert s["rounds"] == rounds and s["rejected_messages"] == 0  # both ends agreed on every level
    # one measurement per worker and round, except the round after the Welcome
    assert sorted((rank, x.round) for rank, x in seen) == [(k, r) for k in (0, 1) for r in range(1, rounds)]
    for _, x in seen:
        assert x.downlink_bytes > 4 * 1000 and x.uplink_bytes > 0 and x.transfer_seconds >= 0
    assert len(s["link_samples"]) == 2 * (rounds - 1)
    choices = s["codec_stats"]["adaptive_rounds"]
    assert [c["round"] for c in choices] == list(range(rounds))
    assert choices[0]["rate"] == {"0": 2.0, "1": 2.0}  # nothing measured yet: the start level
    # Measured from round 1 on; from round 2 the choice uses it. The slow worker stays at the
    # lowest level; the fast one climbs one level per round into levels nobody has measured yet
    # (compressors/adaptive.py: a byte count scaled from a neighbouring level is only a guess).
    fast_rates = [4.0, 8.0, 32.0, 32.0]
    for c, fast in zip(choices[2:], fast_rates, strict=True):
        assert c["rate"] == {str(SLOW_RANK): 2.0, str(1 - SLOW_RANK): fast}, c
        assert c["throughput_mbit"][str(SLOW_RANK)] < c["throughput_mbit"][str(1 - SLOW_RANK)]
    # the slow worker sent 2-bit updates, the fast one dense ones (4 bytes per entry) after round 1
    assert choices[-1]["uplink_bytes"][str(1 - SLOW_RANK)] > 4 * s["params"]
    assert choices[-1]["uplink_bytes"][str(SLOW_RANK)] < s["params"]


def test_every_codec_gets_the_link_measurements(make_server, run_workers, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(CrossWorkerState, "observe_link", lambda self, rank, sample: calls.append(sample.round))
    server = make_server(workers=1, rounds=3, codec="dense")
    results = run_workers(server.port, 1, "d")
    server.thread.join(60)
    assert results[0].finished and sorted(calls) == [1, 2]
    samples = server.summary()["link_samples"]
    assert [x["round"] for x in samples] == [1, 2] and all(x["rank"] == 0 for x in samples)
