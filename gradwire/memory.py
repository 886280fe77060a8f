"""Model-sized blocks kept in the process's heap (glibc), for the PS and worker processes.

Every round allocates and frees several blocks the size of the model: the serialized Update
and RoundResult, protobuf's parsed copy, a decoded payload, gRPC's send and receive buffers.
glibc serves any block above its mmap threshold (at most 32 MiB, however it adapts) with a
fresh ``mmap`` and returns it with ``munmap`` when freed, so each of them page-faults all of
its pages in again: for a 34 MB model, 8,300 faults and about 17 ms of CPU per block, several
times the copy itself (docs/results/perf/psfast.md). ``keep_large_blocks`` tells glibc to
serve every block from the heap and not to trim it, so the next round reuses pages that are
already mapped. The price: memory freed inside the heap is kept by the process (its peak RSS is
what it was; it no longer drops between rounds). ``GRADWIRE_MALLOC=default`` leaves glibc's
allocator as it is. Not glibc (musl, macOS): nothing to do.

Hand-written (ctypes ``mallopt``): no library exposes glibc's allocator settings, and the
environment variables that would (``MALLOC_MMAP_MAX_``) must be set before the process starts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger("gradwire")

ENV = "GRADWIRE_MALLOC"
# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # trim only when 1 GiB lies free at the heap's top


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt(param, value)`` (1 when the setting took), or None where there is none
    (not Linux, not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


# glibc's M_ARENA_MAX: how many heaps (arenas) malloc may keep. Its default is 8 per core; a
# thread that finds the heaps busy gets a new one, and gRPC's handler and I/O threads end up
# spread over many.
# - The PS under hostile input: each heap keeps the pieces of hostile messages (gRPC's receive
#   buffers, under the mmap threshold) it once held. One hostile 0.8 MB message per stream, 60
#   streams (`gradwire fuzz`'s spec_huge mutation against one PS, 2 cores): peak RSS +10.1 MiB with
#   the default, +7.2 MiB with 4 arenas, +4.0 MiB with 2, +3.7 MiB with 1 (MALLOC_ARENA_MAX, with
#   the oversized spec refused unparsed, gradwire.protocol.update_header_error).
# - Model-sized blocks (``keep_large_blocks``): a secondary heap is at most 64 MiB, and glibc
#   unmaps one as soon as all of it is free, whatever the trim threshold (which governs the main
#   heap). A 34 MB block that gRPC's threads allocate and free every round sat in such a heap and
#   page-faulted in again each time: a worker on the 8.5 M-parameter MLP spent 137-166 ms of CPU
#   per round (26 of them training), 76-81 ms with the cap (`benchmarks.rounds`, docs/results/perf).
#   With 2 heaps the second one still held such blocks: an mlp8m PS page-faulted about 8,000 times
#   per round (a 34 MB block each round) until round 85 of its run, at about 1 GB of RSS, and its
#   workers until round 30. With 1 (the main heap, which glibc never unmaps; only the trim
#   threshold returns its top) the PS stopped faulting by about round 30 and the workers by about
#   round 20 (docs/results/perf/steady.md).
# Fewer heaps mean more waiting on a heap lock; the processes run their Python code under the GIL
# anyway, so few of their threads allocate at once.
M_ARENA_MAX = -8
MALLOC_ARENAS = 1


def cap_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Keep malloc to ``arenas`` heaps (glibc; see MALLOC_ARENAS). True when the setting took.

    It has to run before the process's other threads first allocate: glibc gives each new thread
    a heap of its own (up to 8 before any limit is read) and keeps every heap made before the cap
    in rotation. Set after the PS's gRPC server had started, as it once was, the cap left 8 heaps in
    a PS that had answered 64 Status calls (1 with the cap first;
    `tests/server/test_hostile_message_memory.py`), and a huffman fuzz campaign's peak-RSS growth
    was 2.6 MiB instead of 0.8 MiB."""
    mallopt = glibc_mallopt()
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1


def keep_large_blocks() -> bool:
    """Serve large blocks from the heap and keep them (glibc), in at most MALLOC_ARENAS heaps;
    True when the setting took. Call it before the process starts threads (``cap_malloc_arenas``)."""
    mallopt = glibc_mallopt()
    if os.environ.get(ENV, "").strip().lower() == "default" or mallopt is None:
        return False
    capped = cap_malloc_arenas()
    done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and capped
    log.debug("large blocks kept in the heap: %s", done)
    return done
