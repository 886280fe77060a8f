"""The byte counters of a run: one typed definition that every writer and reader uses.

The PS's ledger (``server/ledger.py``) writes them, the Status RPC and the run summary carry
them, and the metrics, the byte report and ``gradwire simulate`` read them. Each counter is a
dataclass field here and nowhere else: its name is the key in every JSON form (summary.json,
``gradwire status --json``, the byte report), the protobuf field name in ``WorkerStatus`` /
``RoundStatus``, and, prefixed, the Prometheus metric name; its ``doc`` is the metric's help.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

C = TypeVar("C", bound="Counters")


def _counter(doc: str) -> Any:
    return field(default=0, metadata={"doc": doc})


class Counters:
    """Dict forms shared by the counter dataclasses below.

    The counter classes keep their fields in slots (no per-instance ``__dict__``): the PS keeps a
    RoundCounters for every round of a run, and a dict per round was a third of its per-round
    memory (`gradwire fuzz` runs thousands of rounds; docs/results/fuzz/).
    """

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: one key per field, in declaration order."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any], convert: Callable[[Any], Any] | None = None) -> C:
        """Read back a dict form; missing keys keep their defaults, ``convert`` maps each value read
        (protobuf JSON writes uint64 as strings)."""
        values = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}  # type: ignore[arg-type]
        if convert is not None:
            values = {k: convert(v) for k, v in values.items()}
        return cls(**values)

    @classmethod
    def docs(cls) -> dict[str, str]:
        """Each counter with its meaning (fields without a ``doc`` are not counters)."""
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls) if "doc" in f.metadata}  # type: ignore[arg-type]


@dataclass(slots=True)
class LinkCounters(Counters):
    """Bytes on the two links of a worker (or of all workers in a round)."""

    uplink_payload_bytes: int = _counter("Codec payload bytes received (what the codec claims to send)")
    uplink_message_bytes: int = _counter("Serialized protobuf bytes of update messages received")
    downlink_message_bytes: int = _counter("Serialized protobuf bytes sent to the worker")
    downlink_payload_bytes: int = _counter(
        "Model payload bytes sent to the worker (float32 models or downlink-codec deltas)")

    def link(self) -> LinkCounters:
        """Just the link counters (of a worker's or a round's)."""
        return LinkCounters(**{name: getattr(self, name) for name in link_fields()})

    @classmethod
    def uplink_and_downlink(cls, uplink: LinkCounters, downlink: LinkCounters) -> LinkCounters:
        """The uplink counters of ``uplink`` with the downlink counters of ``downlink``."""
        return cls(**{name: getattr(uplink if name.startswith("uplink_") else downlink, name) for name in link_fields()})

    def add(self, other: LinkCounters) -> None:
        for name in link_fields():
            setattr(self, name, getattr(self, name) + getattr(other, name))


def link_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(LinkCounters))


def total(items: Iterable[LinkCounters]) -> LinkCounters:
    out = LinkCounters()
    for item in items:
        out.add(item)
    return out


@dataclass(slots=True)
class WorkerCounters(LinkCounters):
    """What the PS counts for one worker id, across its sessions."""

    uplink_control_bytes: int = _counter("Serialized protobuf bytes of Hello and WorkerReport messages received")
    downlink_models: int = _counter("Messages sent to the worker that carried a model or a model delta")
    rejected_messages: int = _counter("Messages refused with a gRPC status")
    rejected_message_bytes: int = _counter("Serialized protobuf bytes of refused messages")
    rounds_aggregated: int = _counter("Rounds in which the worker's update was aggregated")


@dataclass(slots=True)
class RoundCounters(LinkCounters):
    """One round: bytes of every worker, who took part, and what the model did."""

    round: int = 0
    workers: int = 0  # updates aggregated
    stragglers: int = 0
    train_loss: float | None = None  # mean over the aggregated workers
    test_accuracy: float | None = None  # None where the round was not evaluated
    test_loss: float | None = None
    lr: float | None = None
    # server/robust.py: the step was not finite and was rolled back (the model did not move);
    # the workers whose updates were dropped or scaled down (above the clip norm); when refused,
    # the largest updates, named with their norms
    refused: bool = False
    clipped: list[str] = field(default_factory=list)
    suspects: list[str] = field(default_factory=list)
