"""The PS's byte ledger: what it counts per worker id (across sessions) and per round.

The counters themselves are defined once, in ``gradwire/counters.py``; this module keeps them
for a run. The round engine calls it under its own lock, so the ledger takes none.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradwire.counters import RoundCounters, WorkerCounters
from gradwire.server.admission import next_rank, prune_records
from gradwire.server.history import RoundLog


@dataclass
class WorkerRecord:
    """What the PS keeps about a worker id across its sessions."""

    worker_id: str
    rank: int
    hostname: str = ""
    connected: bool = False
    sessions: int = 0
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    last_rejection: str = ""
    interface_start: dict | None = None
    interface_end: dict | None = None
    codec_stats: dict[str, float] = field(default_factory=dict)
    decoder_stats: dict[str, float] = field(default_factory=dict)
    shard_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint form: plain values only."""
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if k != "counters"}
        out["counters"] = self.counters.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkerRecord:
        plain = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "counters"}
        return cls(**plain, counters=WorkerCounters.from_dict(d["counters"]))


@dataclass(frozen=True)
class LedgerSnapshot:
    """A consistent copy of the ledger, taken under the engine's lock."""

    round: int
    phase: str
    records: tuple[WorkerRecord, ...]  # by rank
    rounds: tuple[RoundCounters, ...]


# Rounds kept as RoundCounters objects: the open round and the one before (the engine fills in a
# round's results after closing it); older rounds are rows of the compact history.
RECENT_ROUNDS = 2
# The record that sums the counters of departed workers whose own records were dropped (admission.
# prune_records: more than MAX_RECORDS worker ids); a worker id has no spaces, so none can be this.
DEPARTED_ID = "(departed workers)"
DEPARTED_RANK = 2**32 - 1  # above any worker's (Status carries ranks as uint32)


class Ledger:
    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self.departed: WorkerRecord | None = None  # the sums of dropped records (DEPARTED_ID)
        self.rank_floor = 0  # above every rank a dropped record had: ranks of contributors never come back
        self.history = RoundLog()  # rounds before the recent ones, in order (server/history.py)
        self.recent: list[RoundCounters] = []

    def round_count(self) -> int:
        """Rounds opened and kept (after a resume: the checkpoint's closed rounds, then the new ones)."""
        return len(self.history) + len(self.recent)

    def all_rounds(self) -> list[RoundCounters]:
        """Every round in order, as new RoundCounters objects (a copy: O(rounds) objects)."""
        return [*self.history, *(copy.copy(e) for e in self.recent)]

    # ---------------------------------------------------------------- workers

    def record_for(self, worker_id: str, keep: Collection[str] = ()) -> WorkerRecord:
        """The record of ``worker_id``; a new id gets a rank no kept record has. Before a new record
        is made, records of departed ids may be dropped, those that never contributed first, and the
        others' counters summed into the ``departed`` record (server/admission.py: an attacker cycling
        worker ids must not grow the PS's memory); ``keep``: ids whose update waits in the open round."""
        record = self.records.get(worker_id)
        if record is None:
            for gone in prune_records(self.records, keep=keep):
                self._sum_departed(gone)
            record = WorkerRecord(worker_id, rank=max(next_rank(self.records), self.rank_floor))
            self.records[worker_id] = record
        return record

    def _sum_departed(self, gone: WorkerRecord) -> None:
        if self.departed is None:
            self.departed = WorkerRecord(DEPARTED_ID, rank=DEPARTED_RANK)
        d = self.departed
        d.sessions += gone.sessions
        for f in dataclasses.fields(WorkerCounters):
            setattr(d.counters, f.name, getattr(d.counters, f.name) + getattr(gone.counters, f.name))
        self.rank_floor = max(self.rank_floor, gone.rank + 1)

    def all_records(self) -> list[WorkerRecord]:
        """The kept records by rank, then the departed workers' sums (if any were dropped)."""
        kept = sorted(self.records.values(), key=lambda r: r.rank)
        return kept + ([self.departed] if self.departed is not None else [])

    def count_control(self, record: WorkerRecord, message_bytes: int) -> None:
        """A Hello or a WorkerReport."""
        record.counters.uplink_control_bytes += message_bytes

    def count_update(self, record: WorkerRecord, payload_bytes: int, message_bytes: int) -> None:
        record.counters.uplink_payload_bytes += payload_bytes
        record.counters.uplink_message_bytes += message_bytes

    def count_rejection(self, record: WorkerRecord, reason: str, message_bytes: int) -> None:
        record.counters.rejected_messages += 1
        record.counters.rejected_message_bytes += message_bytes
        record.last_rejection = reason

    def count_downlink(self, record: WorkerRecord, message_bytes: int, payload_bytes: int, models: int,
                       in_round: bool) -> None:
        """A message to a worker; ``in_round``: the rounds have started, so the open round counts it too."""
        record.counters.downlink_message_bytes += message_bytes
        record.counters.downlink_payload_bytes += payload_bytes
        record.counters.downlink_models += models
        if in_round and self.recent:
            entry = self.recent[-1]
            entry.downlink_message_bytes += message_bytes
            entry.downlink_payload_bytes += payload_bytes

    # ---------------------------------------------------------------- rounds

    def open_round(self, round_: int, lr: float) -> None:
        self.recent.append(RoundCounters(round=round_, lr=lr))
        while len(self.recent) > RECENT_ROUNDS:
            self.history.append(self.recent.pop(0))

    def current_round(self) -> RoundCounters:
        return self.recent[-1]

    def drop_open_round(self) -> None:
        """The run ended before the open round closed."""
        self.recent.pop()

    def close_round(self, updates: Mapping[str, tuple[int, int]], stragglers: int, train_loss: float) -> RoundCounters:
        """``updates``: worker id -> (payload bytes, message bytes) of each aggregated update."""
        entry = self.recent[-1]
        entry.uplink_payload_bytes = sum(p for p, _ in updates.values())
        entry.uplink_message_bytes = sum(m for _, m in updates.values())
        entry.workers = len(updates)
        entry.stragglers = stragglers
        entry.train_loss = train_loss
        for worker_id in updates:
            self.records[worker_id].counters.rounds_aggregated += 1
        return entry

    def closed_rounds(self) -> list[RoundCounters]:
        """Rounds in which some update was aggregated."""
        return [e for e in self.all_rounds() if e.workers > 0]

    # ---------------------------------------------------------------- copies

    def snapshot(self, round_: int, phase: str) -> LedgerSnapshot:
        return LedgerSnapshot(
            round=round_, phase=phase,
            records=tuple(copy.deepcopy(r) for r in self.all_records()),
            rounds=tuple(self.all_rounds()),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "records": {w: r.to_dict() for w, r in self.records.items()},
            "departed": self.departed.to_dict() if self.departed is not None else None,
            "rank_floor": self.rank_floor,
            "rounds": [e.to_dict() for e in self.all_rounds()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Back to a checkpoint's ledger; every worker is disconnected until it reconnects."""
        self.history, self.recent = RoundLog(), []
        for e in (RoundCounters.from_dict(d) for d in state["rounds"]):
            if e.workers > 0:
                self.history.append(e)
        self.records = {}
        for w, d in state["records"].items():
            record = WorkerRecord.from_dict(d)
            record.connected = False
            self.records[w] = record
        departed = state.get("departed")
        self.departed = WorkerRecord.from_dict(departed) if departed else None
        self.rank_floor = int(state.get("rank_floor", 0))
