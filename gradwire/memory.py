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

log = logging.getLogger("gradwire")

ENV = "GRADWIRE_MALLOC"
# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # trim only when 1 GiB lies free at the heap's top


def keep_large_blocks() -> bool:
    """Serve large blocks from the heap and keep them (glibc); True when the setting took."""
    if os.environ.get(ENV, "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    log.debug("large blocks kept in the heap: %s", done)
    return done
