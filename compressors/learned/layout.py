"""LGC vectors: the flat model vector's exempt/compressed split, top-k selection, supports.

Part of learned gradient compression (``lgc``, docs/algorithms.md §3; overview in
``compressors/learned/lgc.py``). ``Layout`` splits the flat model vector into entries sent
as float32 (``exempt=1``: first layer and classifier) and compressed entries; the helpers
pick the top-k / innovation entries (``top_indices``), restrict a sparse vector to the
leader's support (``restrict``) and give the RMS scale the autoencoder sees values in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from gradwire.compressors.base import CodecError, TensorSpec


def exempt_positions(specs: Sequence[TensorSpec]) -> np.ndarray:
    """Flat positions of the first and last module's tensors (first layer, classifier)."""
    if not specs:
        return np.zeros(0, dtype=np.int64)

    def module(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else name

    first, last = module(specs[0].name), module(specs[-1].name)
    out, offset = [], 0
    for s in specs:
        if module(s.name) in (first, last):
            out.append(np.arange(offset, offset + s.numel, dtype=np.int64))
        offset += s.numel
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class Layout:
    """How the flat model vector splits into exempt (dense) and compressed entries."""

    def __init__(self, numel: int, exempt: np.ndarray):
        self.numel = int(numel)
        self.exempt = np.asarray(exempt, dtype=np.int64)
        mask = np.ones(self.numel, dtype=bool)
        mask[self.exempt] = False
        self.compressed = np.flatnonzero(mask)

    @property
    def m(self) -> int:
        return int(self.exempt.size)

    @property
    def dc(self) -> int:
        return int(self.compressed.size)

    def assemble(self, exempt_values: np.ndarray, c: np.ndarray) -> np.ndarray:
        out = np.zeros(self.numel, dtype=np.float32)
        out[self.exempt] = exempt_values
        out[self.compressed] = c
        return out


def top_indices(v: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of the ``count`` largest |v|, nonzero entries only."""
    n = v.size
    if count <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if count < n:
        idx = np.argpartition(np.abs(v), n - count)[n - count :]
    else:
        idx = np.arange(n)
    idx = np.sort(idx)
    return idx[v[idx] != 0]



def rms_scale(x: np.ndarray) -> float:
    s = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return s if np.isfinite(s) and s > 0 else 1.0


def restrict(indices: np.ndarray, values: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Values of the sparse vector (indices, values) at the sorted ``support`` positions."""
    out = np.zeros(support.size, dtype=np.float32)
    if indices.size == 0 or support.size == 0:
        return out
    pos = np.searchsorted(support, indices)
    pos_c = np.minimum(pos, support.size - 1)
    hit = support[pos_c] == indices
    out[pos_c[hit]] = values[hit]
    return out


def layout_for(spec: TensorSpec, layout: Layout | None, exempt: bool) -> Layout:
    if layout is not None:
        if layout.numel != spec.numel:
            raise CodecError(f"lgc layout has {layout.numel} entries, tensor {spec.name!r} has {spec.numel}")
        return layout
    if exempt:
        raise CodecError("lgc exempt=1 needs the model layout (set_layout), which this caller did not give")
    return Layout(spec.numel, np.zeros(0, dtype=np.int64))


def split_like(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, a in like.items():
        n = int(np.asarray(a).size)
        out[name] = flat[offset : offset + n].reshape(np.shape(a))
        offset += n
    if offset != flat.size:
        raise CodecError(f"lgc: decoded update has {flat.size} entries, the model {offset}")
    return out


def layout_from_update(update: Mapping[str, np.ndarray], exempt: bool) -> Layout:
    """The layout from a decoded update's tensor names and shapes (when no decoder set it)."""
    specs = [TensorSpec(name, tuple(np.shape(a))) for name, a in update.items()]
    positions = exempt_positions(specs) if exempt else np.zeros(0, dtype=np.int64)
    return Layout(sum(s.numel for s in specs), positions)
