"""Admission control: how many streams the PS holds, for how long, and what it keeps of their strings.

The gRPC server is synchronous: each open Train stream holds one executor thread for its whole
life. So the PS

* holds at most ``max_streams`` Train streams; one more is refused at once (RESOURCE_EXHAUSTED)
  before anything is read from it;
* sizes its executor to ``max_streams`` plus ``RESERVED_THREADS`` and caps gRPC's concurrent RPCs
  at that size, so Status and health always find a thread and a flood is refused by gRPC instead
  of queued without end;
* cancels a stream that has not sent its Hello within ``hello_timeout_s`` (an idle connection
  neither holds a thread nor a place in the rounds);
* bounds the strings a worker sends (ids, hostnames) before they reach logs, Status or summaries;
* receives no message larger than an honest worker can send for the run's model
  (``receive_limit_bytes``), so gRPC refuses a larger one from its length prefix;
* gives large message buffers back to the OS when they are freed (``return_large_buffers_to_the_os``).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence

import grpc

from gradwire.compressors.base import TensorSpec
from gradwire.compressors.bounds import max_payload_bytes
from gradwire.memory import cap_malloc_arenas, glibc_mallopt
from gradwire.protocol import MAX_TENSOR_HEADER_BYTES

# Threads beyond the Train streams: Status, health checks and refusals always get one.
RESERVED_THREADS = 16
MAX_WORKER_ID_CHARS = 128
MAX_HOSTNAME_CHARS = 255
# Reasons quoted back from attacker-chosen content (decoder messages) are cut to this length.
MAX_REASON_CHARS = 1024
# A WorkerReport's codec statistics are kept in the worker's ledger record until the run ends (for the
# summary): at most this many, with names of at most this many characters. Honest workers send up to
# 17 (m22), none longer than 33 characters; without a bound a report as large as the message limit
# was kept whole, for each of up to MAX_RECORDS worker ids.
MAX_CODEC_STATS = 64
MAX_CODEC_STAT_CHARS = 64


# What a WorkerMessage carries beside its tensors: the Update's scalars and timing, a Hello's id,
# hostname and codec spec, a Leave's reason (each bounded far below this; see the MAX_* above).
MESSAGE_SLACK_BYTES = 64 * 1024
# A buffer travels as float32 (gradwire.buffers); 8 bytes an entry leaves room to spare.
BUFFER_BYTES_PER_ENTRY = 8


def receive_limit_bytes(specs: Sequence[TensorSpec], buffer_specs: Sequence[TensorSpec],
                        configured_bytes: int) -> int:
    """The largest WorkerMessage the PS accepts: what an honest worker can send for this model, or
    ``configured_bytes`` (``--max-message-mb``) when that is smaller.

    gRPC checks a message's length prefix against ``grpc.max_receive_message_length`` and refuses
    it (RESOURCE_EXHAUSTED) before buffering its body. A fixed 64 MiB limit let a peer of a small
    model's run make the PS buffer, copy and frame-check megabytes it would refuse anyway
    (`gradwire fuzz`: peak RSS +3.9 MiB for 0.8 MiB messages to a 650-parameter model). Each tensor
    may carry ``max_payload_bytes`` (what the decoder's size check admits) plus a header of at most
    ``MAX_TENSOR_HEADER_BYTES`` (what ``protocol.update_header_error`` admits).
    """
    tensors = sum(max_payload_bytes(s) + MAX_TENSOR_HEADER_BYTES for s in specs)
    buffers = sum(BUFFER_BYTES_PER_ENTRY * s.numel + MAX_TENSOR_HEADER_BYTES for s in buffer_specs)
    return min(configured_bytes, tensors + buffers + MESSAGE_SLACK_BYTES)


def default_max_streams(workers: int) -> int:
    """Room for every expected worker, its reconnects and a few spares."""
    return 2 * workers + 8


def executor_threads(max_streams: int) -> int:
    return max_streams + RESERVED_THREADS


def printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with control and non-printable characters escaped."""
    cut = text[:limit]
    out = cut if cut.isprintable() else cut.encode("unicode_escape").decode("ascii")[:limit]
    return out + ("…" if len(text) > limit else "")


def check_worker_id(worker_id: str) -> str | None:
    """Why a requested worker id is refused, or None."""
    if len(worker_id) > MAX_WORKER_ID_CHARS:
        return f"worker id of {len(worker_id)} characters (at most {MAX_WORKER_ID_CHARS})"
    if not worker_id.isprintable() or any(c.isspace() for c in worker_id):
        return f"worker id {printable(worker_id, 40)!r} has control or space characters"
    return None


def check_codec_stats(stats: Mapping[str, float]) -> str | None:
    """Why a WorkerReport's codec statistics are refused, or None."""
    if len(stats) > MAX_CODEC_STATS:
        return f"{len(stats)} codec statistics in a report (at most {MAX_CODEC_STATS})"
    longest = max(map(len, stats), default=0)
    if longest > MAX_CODEC_STAT_CHARS:
        return f"a codec statistic named with {longest} characters (at most {MAX_CODEC_STAT_CHARS})"
    return None


class StreamGate:
    """Counts open Train streams; arms the Hello deadline of each."""

    def __init__(self, max_streams: int, hello_timeout_s: float):
        self.max_streams = max_streams
        self.hello_timeout_s = hello_timeout_s
        self._lock = threading.Lock()
        self.open = 0
        self.refused = 0

    def enter(self, context: grpc.ServicerContext) -> bool:
        with self._lock:
            if self.open >= self.max_streams:
                self.refused += 1
                return False
            self.open += 1
        context.add_callback(self._leave)
        return True

    def _leave(self) -> None:
        with self._lock:
            self.open -= 1

    def hello_deadline(self, context: grpc.ServicerContext) -> threading.Timer:
        """Cancels the stream unless ``.cancel()`` is called on the returned timer in time."""
        timer = threading.Timer(self.hello_timeout_s, context.cancel)
        timer.daemon = True
        timer.start()
        return timer


# Ledger records the PS keeps at most; beyond, departed workers that never had an update
# aggregated are forgotten first, then departed workers that had (the ledger sums their counters
# into one record): an attacker cycling worker ids must not grow the PS's memory.
MAX_RECORDS = 1024


def prune_records(records: dict, limit: int = MAX_RECORDS, *, keep: Collection[str] = ()) -> list:
    """Drop the oldest disconnected records until ``len(records) < limit``: those with no aggregated
    update first, then those with one. A record in ``keep`` stays (its update waits in the open round,
    which needs the record when it closes). ``records`` maps worker id -> record (insertion order =
    age); returns the dropped records that had an update aggregated, for the caller to keep their sums."""
    contributors: list = []
    for contributed in (False, True):
        for worker_id in list(records):
            if len(records) < limit:
                return contributors
            record = records[worker_id]
            if record.connected or worker_id in keep or (record.counters.rounds_aggregated > 0) != contributed:
                continue
            del records[worker_id]
            if contributed:
                contributors.append(record)
    return contributors


def next_rank(records: dict) -> int:
    """A rank no kept record has (ranks of pruned records, which never contributed, may come back)."""
    return max((r.rank for r in records.values()), default=-1) + 1


# glibc's mallopt parameter M_MMAP_THRESHOLD (malloc.h): from this size on, malloc serves a request
# with its own mmap, and free returns it to the OS at once.
_M_MMAP_THRESHOLD = -3
LARGE_BUFFER_BYTES = 128 * 1024
def return_large_buffers_to_the_os() -> bool:
    """Serve every allocation of 128 KiB or more with mmap (glibc), so that freeing it returns it,
    and keep malloc to MALLOC_ARENAS heaps (``gradwire.memory.cap_malloc_arenas``, which takes only
    where nothing but the main thread has allocated yet: the server command calls it first).

    glibc's default raises that threshold to the size of the largest buffer freed so far (up to
    32 MiB); from then on message-sized buffers come from the per-thread heaps, and freed ones that
    are not at a heap's top stay resident. Under a stream of hostile ~0.8 MiB messages (`gradwire
    fuzz`, 4,000 messages per codec) the PS's peak RSS crept up 2.7-4.1 MiB after the warm-up that
    way, 0.8-1.4 MiB with the threshold fixed (setting it turns the dynamic adjustment off). The cost
    is an mmap and its page faults per large buffer: ~1 ms per 5 MB model, nothing next to a round.
    Returns False, and changes nothing, off glibc.
    """
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    arenas_capped = cap_malloc_arenas()
    return mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES) == 1 and arenas_capped
