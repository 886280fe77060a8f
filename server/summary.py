"""The run summary: what was sent, what it bought, per round and per worker."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gradwire.counters import LinkCounters, RoundCounters, total
from gradwire.protocol import PROTOCOL
from gradwire.server.timing import (
    accuracy_vs_time,
    time_to_accuracy,
    time_to_each_accuracy,
    wall_clock_totals,
)


def mean_stats(dicts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each key over the dicts that have it (codec stats of several workers)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, int | float) and math.isfinite(v):
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sorted(sums)}


def accuracy_curve(initial_accuracy: float | None, rounds: list[RoundCounters]) -> list[list[float]]:
    """[cumulative uplink bits of all workers, test accuracy] at every evaluated round."""
    if initial_accuracy is None:
        return []
    curve = [[0.0, float(initial_accuracy)]]
    bits = 0.0
    for e in rounds:
        bits += 8.0 * e.uplink_payload_bytes
        if e.test_accuracy is not None:
            curve.append([bits, float(e.test_accuracy)])
    return curve


def per_bit_accuracy(curve: list[list[float]]) -> float | None:
    """max_t (Acc(t) − Acc(0)) / B(t), docs/algorithms.md §4 (accuracy points per bit)."""
    if not curve:
        return None
    acc0 = curve[0][1]
    gains = [(acc - acc0) / bits for bits, acc in curve[1:] if bits > 0]
    return max(gains) if gains else None


def build_summary(engine) -> dict[str, Any]:
    cfg = engine.config
    snap = engine.snapshot()
    records = snap.records
    log = [e for e in snap.rounds if e.workers > 0]
    updates = sum(e.workers for e in log)
    participating = [r for r in records if r.counters.rounds_aggregated > 0]
    # Uplink: what the closed rounds aggregated; downlink: every message sent, Welcomes included.
    uplink, downlink = total(log), total(r.counters for r in records)
    totals = LinkCounters.uplink_and_downlink(uplink, downlink)
    down_models = sum(r.counters.downlink_models for r in records)
    evaluated = [e for e in log if e.test_loss is not None]
    final = evaluated[-1] if evaluated else None
    curve = accuracy_curve(engine.initial_accuracy, log)
    worker_stats = [r.codec_stats for r in participating if r.codec_stats]
    codec_stats: dict[str, Any] = mean_stats(worker_stats)
    for k, v in mean_stats(r.decoder_stats for r in participating if r.decoder_stats).items():
        codec_stats.setdefault(k, v)
    codec_stats.update(engine.codec_state.stats())
    elapsed = None
    if engine.started_at is not None:
        elapsed = (engine.finished_at or time.monotonic()) - engine.started_at
    with engine.cond:
        splits = engine.clock.rounds_split()
        trained = engine.clock.training_seconds(engine.started_at)
        startup = engine.clock.startup_s()
        link_samples = engine.link_samples.dicts()
    time_curve = accuracy_vs_time(engine.initial_accuracy,
                                  [(trained[e.round], e.test_accuracy) for e in log
                                   if e.test_accuracy is not None and trained.get(e.round) is not None])
    target = cfg.target_accuracy or None
    return {
        "protocol": PROTOCOL,
        "codec": cfg.codec,  # as the user gave it; codec_spec drops options equal to their defaults
        "codec_spec": engine.codec.spec,
        "dataset": engine.task.name or cfg.dataset,
        "task": cfg.task or cfg.dataset,
        "local_steps": cfg.local_steps,
        "model": engine.task.model_name,
        "batch_size": "full" if cfg.batch_size == 0 else cfg.batch_size,
        "partition": cfg.partition,
        "seed": cfg.seed,
        "server_momentum": engine.server_momentum,
        "worker_momentum": engine.codec.worker_momentum,
        "workers": len(participating),
        "rounds": len(log),
        "params": engine.params,
        "aggregated_updates": updates,
        "initial_accuracy": engine.initial_accuracy,
        "initial_loss": engine.initial_loss,
        "final_accuracy": final.test_accuracy if final else None,
        "final_loss": final.test_loss if final else None,
        **totals.to_dict(),
        "downlink_codec": engine.downlink_codec.spec,
        # over every model the workers received: the full ones (welcomes, resyncs) and the deltas
        "downlink_bits_per_entry": (8.0 * totals.downlink_payload_bytes / (engine.params * down_models)
                                    if down_models else None),
        "downlink_codec_stats": engine.downlink.stats() if engine.downlink is not None else {},
        "uplink_bits_per_entry": 8.0 * totals.uplink_payload_bytes / (engine.params * updates) if updates else None,
        "per_bit_accuracy": per_bit_accuracy(curve),
        "accuracy_vs_uplink_bits": curve,
        "codec_stats": codec_stats,
        "stragglers": sum(e.stragglers for e in log),
        # server/robust.py: rounds whose step was not finite (rolled back), updates dropped or scaled down
        "refused_rounds": [e.round for e in log if e.refused],
        "clipped_updates": sum(len(e.clipped) for e in log),
        "rejected_messages": sum(r.counters.rejected_messages for r in records),
        "elapsed_s": elapsed,
        # server/timing.py: per round (rounds_log[i]["timing"]) and in total, the wall-clock split of the
        # round the PS waited for; training seconds exclude the PS's evaluations and the workers' start-up.
        "wall_clock": {**wall_clock_totals([splits[e.round] for e in log if e.round in splits]),
                       "startup_s": startup},
        "accuracy_vs_training_seconds": time_curve,
        "time_to_accuracy": time_to_each_accuracy(time_curve),
        "target_accuracy": target,
        "time_to_target_s": time_to_accuracy(time_curve, target) if target is not None else None,
        "finish_reason": engine.finish_reason,
        "config": json.loads(cfg.to_json()),
        "server_interface": {"start": engine.interface_start, "end": engine.interface_end},
        "per_worker": [
            {
                "worker_id": r.worker_id, "rank": r.rank, "hostname": r.hostname, "sessions": r.sessions,
                **r.counters.to_dict(), "last_rejection": r.last_rejection,
                "interface_start": r.interface_start, "interface_end": r.interface_end,
                "codec_stats": r.codec_stats,
            }
            for r in records
        ],
        "rounds_log": [{**e.to_dict(), "timing": splits.get(e.round), "trained_s": trained.get(e.round)} for e in log],
        # Each worker's round trip as the PS measured it (compute as reported, transfer = the rest):
        # what bandwidth-adaptive codecs choose rates from (CrossWorkerState.observe_link).
        "link_samples": link_samples,
    }


def write_summary(summary: Mapping[str, Any], *paths: str | Path) -> None:
    text = json.dumps(summary, indent=2, sort_keys=False, default=float)
    for p in paths:
        if p:
            path = Path(p)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
