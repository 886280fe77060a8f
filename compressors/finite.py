"""Finiteness checks and squared norms of large arrays in one read, without a temporary.

``np.isfinite(a).all()`` writes a bool array as large as ``a`` and reads it again, and
``torch.isfinite(t).all()`` is slower still (on one thread, 8.5 M float32 entries: 4 ms and
53 ms, against 1.4 ms for a BLAS dot product; docs/results/perf/psfast.md). The dot product of
an array with itself is NaN or Inf when any entry is, so a finite result proves every entry
finite. It can also overflow for finite entries (above ~1.8e19 in float32): then the exact
element-wise check decides, so the answer is always exact, and only the rare huge array pays
for two reads. Hand-written because neither numpy nor torch has an allocation-free
"all finite" reduction.
"""

from __future__ import annotations

import math

import numpy as np

_BLAS_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)  # a view for contiguous arrays (every array gradwire decodes)


# Entries of an unaligned array dotted at a time (256 KiB of float32: the scratch stays in cache).
_CHUNK = 65536


def _self_dot(flat: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow or a NaN is an answer here
        if flat.flags.aligned:
            return float(np.dot(flat, flat))
        # An unaligned array (a view of received bytes at an odd offset: protocol.worker_message_
        # from_wire) gets numpy's own dot loop, 10x slower than BLAS (21 ms against 2 for 8.5 M
        # entries); copied chunk by chunk into an aligned scratch that stays in cache, it takes
        # 5 ms, with no model-sized copy. A chunk's NaN, Inf or float32 overflow makes the total
        # non-finite, as one dot's would.
        scratch = np.empty(min(flat.size, _CHUNK), dtype=flat.dtype)
        total = 0.0
        for start in range(0, flat.size, _CHUNK):
            part = scratch[: min(_CHUNK, flat.size - start)]
            np.copyto(part, flat[start : start + _CHUNK])
            total += float(np.dot(part, part))
        return total


def squared_norm(a: np.ndarray) -> float | None:
    """Σ a², or None when ``a`` has a NaN or Inf entry.

    float32 arrays are summed in float32 by BLAS (relative error about 1e-5 at 8.5 M entries: the
    terms are all positive, so nothing cancels); when that overflows, the sum is redone in float64,
    where no float32 entry overflows. Other dtypes are summed in float64.
    """
    a = np.asarray(a)
    if a.dtype in _BLAS_DTYPES:
        s = _self_dot(_flat(a))
        if math.isfinite(s):
            return s
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        return None
    flat = _flat(a)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


def all_finite(a: np.ndarray) -> bool:
    """Whether every entry of ``a`` is finite (exact; see the module's docstring for how)."""
    a = np.asarray(a)
    if a.dtype in _BLAS_DTYPES:
        if math.isfinite(_self_dot(_flat(a))):
            return True
    if a.dtype.kind not in "fc":
        return True  # integers and booleans have no NaN or Inf
    return bool(np.isfinite(a).all())


def tensor_all_finite(t) -> bool:
    """``all_finite`` for a torch tensor (same idea: ``torch.dot``; exact fallback when it overflows)."""
    import torch  # a project dependency; kept out of this module's import for the pure codecs

    if t.dtype in (torch.float32, torch.float64):
        flat = t.detach().reshape(-1)
        if math.isfinite(float(torch.dot(flat, flat))):
            return True
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t).all())
