"""`gradwire bytes`, the sources: a run's counters from the PS's Status or its summary.json.

Part of the bytes report (``gradwire bytes``, docs/algorithms.md §6; overview in
``gradwire/bytes_report.py``). Normalises both formats into ``RunData`` (per worker and per
round ``LinkCounters`` from ``gradwire/counters.py``, interface counters recorded at start and
end); ``ReportError`` is the error a user can act on, shared by every part of the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gradwire.counters import LinkCounters


class ReportError(RuntimeError):
    """Something the user can fix: no engine, no such project, no data yet."""


# ---------------------------------------------------------------------------------------------
# Normalised run data (from Status or from summary.json)


@dataclass
class WorkerRun:
    worker_id: str
    rank: int
    hostname: str
    rounds: int  # updates the PS aggregated
    link: LinkCounters  # uplink message bytes: Update messages only
    uplink_control_bytes: int  # Hello and WorkerReport (0 where the source does not say)
    connected: bool | None = None
    interface_start: dict[str, Any] | None = None
    interface_end: dict[str, Any] | None = None
    downlink_models: int | None = None  # messages that carried a model or delta (None: the source does not say)


@dataclass
class RoundRun:
    round: int
    workers: int
    link: LinkCounters
    train_loss: float | None = None
    test_accuracy: float | None = None
    # A bandwidth-adaptive codec's choice (compressors/adaptive.py): rate by rank, and what the PS
    # measured of each worker's round trip (seconds) and link (bits/s); empty for other codecs.
    rates: dict[int, float] = field(default_factory=dict)
    measured_s: dict[int, float] = field(default_factory=dict)
    throughput_bps: dict[int, float] = field(default_factory=dict)


@dataclass
class RunData:
    source: str  # "status" or "summary"
    codec: str
    params: int
    round: int
    total_rounds: int
    finished: bool
    workers: list[WorkerRun] = field(default_factory=list)
    rounds: list[RoundRun] = field(default_factory=list)
    server_interface_start: dict[str, Any] | None = None
    server_interface_end: dict[str, Any] | None = None
    final_accuracy: float | None = None
    downlink_codec: str = "dense"
    elapsed_s: float | None = None  # the PS's training time (summary only; Status does not carry it)
    rate_target_s: float | None = None  # the adaptive codec's round-time target (summary only)


def json_int(value: Any, default: int = 0) -> int:
    """uint64 fields arrive as strings from protobuf's JSON mapping."""
    if value is None or value == "":
        return default
    return int(value)


def json_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    f = float(value)  # protobuf's JSON writes NaN as the string "NaN"
    return None if math.isnan(f) else f


def _counters(value: Any) -> dict[str, Any] | None:
    """An InterfaceCounters dict, or None where it was not recorded (empty interface name)."""
    if not isinstance(value, Mapping) or not value.get("interface"):
        return None
    return {"interface": str(value["interface"]), "tx_bytes": json_int(value.get("tx_bytes")),
            "rx_bytes": json_int(value.get("rx_bytes"))}


def _worker_run(w: Mapping[str, Any], *, uplink_control_bytes: int, connected: bool) -> WorkerRun:
    """One worker's counters; the two sources name them alike (Status and summary.json)."""
    return WorkerRun(
        worker_id=str(w.get("worker_id", "")), rank=json_int(w.get("rank")), hostname=str(w.get("hostname", "")),
        rounds=json_int(w.get("rounds_aggregated")), link=LinkCounters.from_dict(w, convert=json_int),
        uplink_control_bytes=uplink_control_bytes, connected=connected,
        interface_start=_counters(w.get("interface_start")), interface_end=_counters(w.get("interface_end")),
        downlink_models=json_int(w["downlink_models"]) if "downlink_models" in w else None,
    )


def _round_run(r: Mapping[str, Any], *, workers: int) -> RoundRun:
    return RoundRun(
        round=json_int(r.get("round")), workers=workers, link=LinkCounters.from_dict(r, convert=json_int),
        train_loss=json_float(r.get("train_loss")), test_accuracy=json_float(r.get("test_accuracy")),
    )


def _by_rank(value: Any, scale: float = 1.0) -> dict[int, float]:
    if not isinstance(value, Mapping):
        return {}
    out = {}
    for k, v in value.items():
        f = json_float(v)
        if f is not None:
            out[json_int(k)] = f * scale
    return out


def _add_rate_choices(rounds: list[RoundRun], codec_stats: Any) -> None:
    """The adaptive codec's per-round choices from the summary's codec statistics, onto the rounds."""
    choices = codec_stats.get("adaptive_rounds") if isinstance(codec_stats, Mapping) else None
    if not isinstance(choices, list):
        return
    by_round = {json_int(c.get("round")): c for c in choices if isinstance(c, Mapping)}
    for r in rounds:
        c = by_round.get(r.round)
        if c is not None:
            r.rates = _by_rank(c.get("rate"))
            r.measured_s = _by_rank(c.get("measured_s"))
            r.throughput_bps = _by_rank(c.get("throughput_mbit"), 1e6)


def run_from_status(d: Mapping[str, Any]) -> RunData:
    """From ``gradwire status --json`` (protobuf JSON, snake_case field names)."""
    # Status does not carry the Hello/WorkerReport bytes; they are counted in the summary only.
    workers = [_worker_run(w, uplink_control_bytes=0, connected=bool(w.get("connected", False)))
               for w in d.get("workers", [])]
    rounds = [_round_run(r, workers=json_int(r.get("workers_aggregated"))) for r in d.get("rounds", [])]
    accs = [r.test_accuracy for r in rounds if r.test_accuracy is not None]
    return RunData(
        source="status", codec=str(d.get("codec_spec", "")), params=json_int(d.get("params")), round=json_int(d.get("round")),
        total_rounds=json_int(d.get("total_rounds")), finished=bool(d.get("finished", False)), workers=workers, rounds=rounds,
        server_interface_start=_counters(d.get("server_interface_start")),
        server_interface_end=_counters(d.get("server_interface_now")), final_accuracy=accs[-1] if accs else None,
        downlink_codec=str(d.get("downlink_codec_spec") or "dense"),
    )


def run_from_summary(d: Mapping[str, Any]) -> RunData:
    """From the PS's ``summary.json``."""
    workers = [_worker_run(w, uplink_control_bytes=json_int(w.get("uplink_control_bytes")), connected=False)
               for w in d.get("per_worker", [])]
    rounds = [_round_run(r, workers=json_int(r.get("workers"))) for r in d.get("rounds_log", [])]
    codec_stats = d.get("codec_stats") or {}
    _add_rate_choices(rounds, codec_stats)
    server = d.get("server_interface") or {}
    config = d.get("config") or {}
    n_rounds = json_int(d.get("rounds"), len(rounds))
    return RunData(
        source="summary", codec=str(d.get("codec", "")), params=json_int(d.get("params")), round=n_rounds,
        total_rounds=json_int(config.get("rounds"), n_rounds), finished=True, workers=workers, rounds=rounds,
        server_interface_start=_counters(server.get("start")), server_interface_end=_counters(server.get("end")),
        final_accuracy=json_float(d.get("final_accuracy")), downlink_codec=str(d.get("downlink_codec") or "dense"),
        elapsed_s=json_float(d.get("elapsed_s")),
        rate_target_s=json_float(codec_stats.get("adaptive_target_s")) if isinstance(codec_stats, Mapping) else None,
    )


def run_from_json(d: Mapping[str, Any]) -> RunData:
    """Either format, told apart by its keys."""
    if "per_worker" in d or "rounds_log" in d:
        return run_from_summary(d)
    if "workers" in d and isinstance(d["workers"], list) or "codec_spec" in d:
        return run_from_status(d)
    raise ReportError("neither a gradwire summary.json nor a `gradwire status --json` output")

