"""compressors/finite.py: exact finiteness and squared norms from one dot product."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwire.compressors.base import RoundContext, TensorSpec
from gradwire.compressors.finite import all_finite, squared_norm, tensor_all_finite
from gradwire.compressors.registry import create_codec
from gradwire.compressors.update import InvalidUpdate, UpdateDecoder, UpdateEncoder

CASES = [
    (np.zeros(0, np.float32), True),
    (np.ones((3, 4), np.float32), True),
    (np.full(1000, 1e30, np.float32), True),  # finite, but its squares overflow float32: the exact check decides
    (np.full(10, 3.4e38, np.float32), True),
    (np.array([1.0, np.nan], np.float32), False),
    (np.array([1.0, np.inf], np.float32), False),
    (np.array([-np.inf, 1.0], np.float32), False),
    (np.array([1e30, np.nan], np.float32), False),
    (np.array([1e300, -np.inf], np.float64), False),
    (np.array([1e300, 1.0], np.float64), True),
    (np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2], True),  # not contiguous
    (np.array([1.0, np.nan, 2.0, 3.0], np.float32)[::2], True),  # the NaN is not in the view
    (np.array([1.0, np.nan], np.float16), False),
    (np.arange(5, dtype=np.int64), True),
]


@pytest.mark.parametrize(("array", "finite"), CASES)
def test_all_finite_is_exact(array, finite):
    assert all_finite(array) is finite
    assert all_finite(array) == bool(np.isfinite(array).all())
    if array.dtype in (np.float32, np.float64):
        assert tensor_all_finite(torch.from_numpy(np.ascontiguousarray(array))) is finite


def test_squared_norm_matches_float64_and_overflows_to_float64():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(1_000_003) * 1e-3).astype(np.float32)
    exact = float(np.sum(a.astype(np.float64) ** 2))
    assert squared_norm(a) == pytest.approx(exact, rel=1e-5)
    huge = np.full(1000, 3e38, np.float32)
    assert squared_norm(huge) == pytest.approx(1000 * 3e38 ** 2, rel=1e-6)  # float64: no overflow
    assert squared_norm(np.array([1.0, np.nan], np.float32)) is None
    assert squared_norm(np.array([np.inf], np.float32)) is None
    assert squared_norm(np.zeros(0, np.float32)) == 0.0
    assert math.isfinite(squared_norm(np.arange(10, dtype=np.int32)))


def test_the_decoder_accepts_huge_finite_updates_and_refuses_a_single_nan():
    codec = create_codec("dense")
    specs = [TensorSpec("w", (4096,))]
    ctx = RoundContext(round=0, rank=0, seed=0, num_workers=1)
    huge = np.full(4096, 1e30, np.float32)
    encoded = UpdateEncoder(codec, specs).encode({"w": huge}, ctx)
    out = UpdateDecoder(codec, specs).decode(encoded, ctx)
    assert np.array_equal(out["w"], huge)
    bad = huge.copy()
    bad[-1] = np.nan
    payload = bad.tobytes()
    forged = [type(encoded[0])(encoded[0].codec, encoded[0].spec, payload)]
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        UpdateDecoder(codec, specs).decode(forged, ctx)


def _unaligned(values: np.ndarray) -> np.ndarray:
    """float32 values at an odd offset of a bytes object, as a received payload can be."""
    raw = b"\x00" + values.astype(np.float32).tobytes()
    view = np.frombuffer(raw, dtype=np.float32, count=values.size, offset=1)
    assert not view.flags.aligned
    return view


def test_unaligned_arrays_are_read_in_aligned_chunks_with_the_same_answers(monkeypatch):
    from gradwire.compressors import finite

    real_dot = np.dot

    def blas_dot(a, b):  # numpy's dot of an unaligned array is its own loop, 10x slower than BLAS
        assert a.flags.aligned and b.flags.aligned, "an unaligned array reached np.dot"
        return real_dot(a, b)

    monkeypatch.setattr(finite.np, "dot", blas_dot)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(3 * finite._CHUNK + 17).astype(np.float32)
    u = _unaligned(x)
    assert finite.squared_norm(u) == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-5)
    assert finite.all_finite(u)
    for where in (0, finite._CHUNK - 1, finite._CHUNK, x.size - 1):  # a bad entry in any chunk
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[where] = bad
            assert finite.squared_norm(_unaligned(y)) is None and not finite.all_finite(_unaligned(y))
    huge = np.full(2 * finite._CHUNK, 3e38, np.float32)  # each chunk's float32 dot overflows: exact fallback
    assert finite.squared_norm(_unaligned(huge)) == pytest.approx(huge.size * float(np.float32(3e38)) ** 2)
    assert finite.all_finite(_unaligned(huge))
