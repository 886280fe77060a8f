"""The PS's per-round history in typed arrays: numbers per round, not Python objects per round.

The PS keeps numbers for every round of a run, for the summary, ``Status`` and the metrics: the
byte ledger's counters (``gradwire.counters.RoundCounters``), the round clock's wall-clock split
(``server/timing.py``) and the link sample of each update (``CrossWorkerState.observe_link``).
Kept as a dataclass, a dict and a few lists per round, with boxed floats, that was ~1.25 KB of
heap per round (tracemalloc over 1,500 rounds of a 1-worker run; 227 B now,
tests/server/test_round_history.py); a `gradwire fuzz` campaign closes thousands of rounds and a
long run more. Here a finished round is one row of a :class:`Table`: one slot per number in an
``array.array`` column (8 bytes for an int64 or a float64; the array grows its capacity
geometrically, so an append is amortized O(1)), and the rare per-round lists (updates clipped, the
suspects of a refused round) are kept only for the rounds that have them. The owners keep their last
rounds as objects, which the engine still changes while a round is open.

What is read back is what was written: the same ints, floats, bools and Nones, so every JSON form
(summary, ``gradwire status --json``, the byte report) is unchanged.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

from gradwire.compressors.base import LinkSample
from gradwire.counters import RoundCounters

INT = "q"  # int64
# int32, for round numbers, ranks and worker counts (4 bytes a row less each): ServerConfig bounds the
# rounds below 2^31 (MAX_ROUNDS); ranks and workers count sessions.
SMALL_INT = "i"
FLOAT = "d"  # float64: a Python float, bit for bit
BOOL = "b"  # read back as a bool


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    typecode: str  # INT, SMALL_INT, FLOAT or BOOL
    nullable: bool = False  # None is kept as a bit of the row's mask (the slot holds 0)


def _mask_typecode(columns: int) -> str:
    for code in ("B", "H", "I", "Q"):
        if columns <= 8 * array(code).itemsize:
            return code
    raise ValueError(f"{columns} nullable columns do not fit a 64-bit mask")


class Table:
    """Rows of named, typed columns (one ``array.array`` each), appended and read by index."""

    def __init__(self, columns: Sequence[Column]):
        self.columns = tuple(columns)
        self.names = tuple(c.name for c in self.columns)
        self._arrays = tuple(array(c.typecode) for c in self.columns)
        self._bools = tuple(c.typecode == BOOL for c in self.columns)
        nullable = [i for i, c in enumerate(self.columns) if c.nullable]
        self._nullable = frozenset(nullable)
        # Bit j of a row's mask: column j is None in that row.
        self._mask = array(_mask_typecode(max(nullable) + 1)) if nullable else None

    def __len__(self) -> int:
        return len(self._arrays[0]) if self._arrays else 0

    def append(self, values: Sequence[Any]) -> None:
        """One row, in column order. Checked before anything is appended, so a value that does not
        fit its column (TypeError, OverflowError) leaves the table as it was."""
        if len(values) != len(self._arrays):
            raise ValueError(f"{len(values)} values for {len(self._arrays)} columns")
        mask = 0
        row = []
        for j, (a, v) in enumerate(zip(self._arrays, values, strict=True)):
            if v is None:
                if j not in self._nullable:
                    raise TypeError(f"column {self.names[j]!r} cannot be None")
                mask |= 1 << j
                v = 0
            array(a.typecode, (v,))  # raises as append would, before any column moved
            row.append(v)
        for a, v in zip(self._arrays, row, strict=True):
            a.append(v)
        if self._mask is not None:
            self._mask.append(mask)

    def row(self, i: int) -> dict[str, Any]:
        mask = self._mask[i] if self._mask is not None else 0
        out: dict[str, Any] = {}
        for j, (name, a, is_bool) in enumerate(zip(self.names, self._arrays, self._bools, strict=True)):
            if mask >> j & 1:
                out[name] = None
            else:
                out[name] = bool(a[i]) if is_bool else a[i]
        return out

    def rows(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self.row(i)


# ------------------------------------------------------------------------- the ledger's rounds

_ROUND_LISTS = ("clipped", "suspects")  # kept per round only where not empty
_ROUND_SMALL = ("round", "workers", "stragglers")
_ROUND_TYPES = {"int": Column("", INT), "bool": Column("", BOOL), "float | None": Column("", FLOAT, nullable=True)}


def _round_columns() -> tuple[Column, ...]:
    columns = []
    for f in dataclasses.fields(RoundCounters):
        if f.name in _ROUND_LISTS:
            continue
        kind = _ROUND_TYPES.get(str(f.type))
        if kind is None:  # a new kind of counter needs a column type here, or a place in _ROUND_LISTS
            raise TypeError(f"RoundCounters.{f.name}: no column type for {f.type!r}")
        if f.name in _ROUND_SMALL:
            kind = dataclasses.replace(kind, typecode=SMALL_INT)
        columns.append(dataclasses.replace(kind, name=f.name))
    return tuple(columns)


class RoundLog:
    """The closed rounds' counters, compact; read back as RoundCounters."""

    def __init__(self) -> None:
        self.table = Table(_round_columns())
        self.lists: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}  # row -> (clipped, suspects)

    def __len__(self) -> int:
        return len(self.table)

    def append(self, entry: RoundCounters) -> None:
        if entry.clipped or entry.suspects:
            self.lists[len(self.table)] = (tuple(entry.clipped), tuple(entry.suspects))
        self.table.append([getattr(entry, name) for name in self.table.names])

    def counters(self, i: int) -> RoundCounters:
        clipped, suspects = self.lists.get(i, ((), ()))
        return RoundCounters(**self.table.row(i), clipped=list(clipped), suspects=list(suspects))

    def __iter__(self) -> Iterator[RoundCounters]:
        for i in range(len(self.table)):
            yield self.counters(i)


# ------------------------------------------------------------------------- link samples

_SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(LinkSample))
_SAMPLE_TYPES = {"int": INT, "float": FLOAT}
_SAMPLE_SMALL = ("round",)


class LinkLog:
    """Every link measurement of a run (``CrossWorkerState.observe_link``), with the worker's rank."""

    def __init__(self) -> None:
        self.table = Table([Column("rank", SMALL_INT)] + [
            Column(f.name, SMALL_INT if f.name in _SAMPLE_SMALL else _SAMPLE_TYPES[str(f.type)])
            for f in dataclasses.fields(LinkSample)])

    def __len__(self) -> int:
        return len(self.table)

    def append(self, rank: int, sample: LinkSample) -> None:
        self.table.append([rank, *(getattr(sample, name) for name in _SAMPLE_FIELDS)])

    def dicts(self) -> list[dict[str, Any]]:
        """The summary's form: ``{"rank": ..., **dataclasses.asdict(sample)}`` per sample."""
        return list(self.table.rows())
