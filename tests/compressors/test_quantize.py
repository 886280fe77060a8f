"""compressors.quantize: uniform 2^R-level quantizer and fp8 (1-5-2, 1-4-3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradwire.compressors.base import CodecError
from gradwire.compressors.quantize import (
    FP8_FORMATS,
    UniformQuantizer,
    fp8_cell_edges,
    fp8_dequantize,
    fp8_max,
    fp8_quantize,
    fp8_values,
    uniform_quantize,
)

TORCH_FP8 = {"152": torch.float8_e5m2, "143": torch.float8_e4m3fn}


# ------------------------------------------------------------------ uniform


@pytest.mark.parametrize("grid, bits, size", [("midrise", 1, 2), ("midrise", 4, 16), ("midtread", 2, 3), ("midtread", 4, 15), ("midtread", 8, 255)])
def test_grid_shapes(grid, bits, size):
    q = UniformQuantizer(bits, 2.0, grid)
    lv = q.levels()
    assert q.alphabet_size == size == lv.size
    np.testing.assert_allclose(lv, -lv[::-1], atol=1e-6)  # symmetric
    np.testing.assert_allclose(np.diff(lv), q.step, rtol=1e-5)
    assert (0.0 in lv) == (grid == "midtread")
    if grid == "midtread":
        assert lv[-1] == pytest.approx(2.0)
    else:
        assert lv[-1] == pytest.approx(2.0 - q.step / 2)
    assert q.edges().size == size + 1 and np.isinf(q.edges()[[0, -1]]).all()


def test_nearest_is_the_closest_level_and_saturates():
    q = UniformQuantizer(4, 1.0, "midtread")
    x = np.random.default_rng(0).uniform(-1.5, 1.5, 5000).astype(np.float32)
    sym = q.quantize(x)
    assert sym.dtype == np.uint8
    dist = np.abs(x[:, None] - q.levels()[None, :])
    np.testing.assert_allclose(dist[np.arange(x.size), sym], dist.min(axis=1), atol=1e-6)
    assert (q.dequantize(q.quantize(np.float32([5.0, -5.0]))) == [1.0, -1.0]).all()


def test_stochastic_rounding_unbiased_and_reproducible():
    q = UniformQuantizer(3, 1.0, "midrise")
    x = np.full(200_000, 0.3, dtype=np.float32)
    a = q.quantize(x, "stochastic", np.random.default_rng(7))
    b = q.quantize(x, "stochastic", np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert set(np.unique(a).tolist()) == {4, 5}  # the two neighbouring levels 0.125 and 0.375 only
    assert q.dequantize(a).mean() == pytest.approx(0.3, abs=2e-3)
    with pytest.raises(ValueError, match="Generator"):
        q.quantize(x, "stochastic")
    with pytest.raises(ValueError):
        q.quantize(x, "floor")


def test_zero_clip_and_validation():
    q = UniformQuantizer(4, 0.0, "midtread")
    assert (q.dequantize(q.quantize(np.zeros(5, np.float32))) == 0).all()
    with pytest.raises(CodecError, match="NaN"):
        UniformQuantizer(4, 1.0).quantize(np.float32([np.nan]))
    with pytest.raises(ValueError):
        UniformQuantizer(0, 1.0)
    with pytest.raises(ValueError):
        UniformQuantizer(1, 1.0, "midtread")
    with pytest.raises(ValueError):
        UniformQuantizer(4, -1.0)
    with pytest.raises(CodecError):
        UniformQuantizer(2, 1.0).dequantize(np.array([4]))


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, st.integers(0, 300), elements=st.floats(float(np.float32(-1e30)), float(np.float32(1e30)), width=32)),
    st.sampled_from([(2, "midtread"), (4, "midtread"), (4, "midrise"), (8, "midtread"), (1, "midrise")]),
)
def test_error_bound_property(x, cfg):
    bits, grid = cfg
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    sym, rec = uniform_quantize(x, bits, peak, grid=grid)
    q = UniformQuantizer(bits, peak, grid)
    assert sym.size == x.size and rec.dtype == np.float32 and np.isfinite(rec).all()
    if x.size:
        assert int(sym.max()) < q.alphabet_size
        bound = q.step / 2 * (1 + 1e-5) + 1e-6 * peak
        assert np.max(np.abs(rec.astype(np.float64) - x)) <= bound


# ------------------------------------------------------------------ fp8


@pytest.mark.parametrize("fmt", FP8_FORMATS)
def test_fp8_value_table_matches_torch(fmt):
    ref = torch.arange(256, dtype=torch.uint8).view(TORCH_FP8[fmt]).double().numpy()
    ours = fp8_values(fmt)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(ours[finite], ref[finite])
    assert np.isnan(ours[~finite]).all()
    assert fp8_max(fmt) == {"152": 57344.0, "143": 448.0}[fmt]


@pytest.mark.parametrize("fmt", FP8_FORMATS)
def test_fp8_rounds_to_nearest_and_maps_peak_to_max(fmt):
    x = np.random.default_rng(1).standard_t(2, 4000).astype(np.float32) * 1e-3
    codes, scale = fp8_quantize(x, fmt)
    assert codes.dtype == np.uint8
    values = fp8_values(fmt)
    assert not np.isnan(values[codes]).any() and not (codes == 0x80).any()
    assert np.abs(values[codes]).max() == fp8_max(fmt)
    usable, _ = fp8_cell_edges(fmt)
    target = x.astype(np.float64) / float(scale)
    dist = np.abs(target[:, None] - values[usable][None, :])
    np.testing.assert_allclose(np.abs(target - values[codes]), dist.min(axis=1), rtol=0, atol=1e-12)
    rec = fp8_dequantize(codes, fmt, scale)
    mbits = 2 if fmt == "152" else 3
    tiny = np.nanmin(np.abs(values[values != 0])) * float(scale)  # subnormal spacing
    assert (np.abs(rec - x) <= np.abs(x) * 2.0 ** -(mbits + 1) * 1.0001 + tiny).all()


@pytest.mark.parametrize("fmt", FP8_FORMATS)
def test_fp8_edge_inputs(fmt):
    codes, scale = fp8_quantize(np.zeros(4, np.float32), fmt)
    assert scale == 0 and (codes == 0).all() and (fp8_dequantize(codes, fmt, scale) == 0).all()
    for magnitude in (1e-30, 1e30, 1e-40):
        x = np.float32([magnitude, -magnitude / 3, 0.0])
        codes, scale = fp8_quantize(x, fmt)
        rec = fp8_dequantize(codes, fmt, scale)
        assert np.isfinite(rec).all()
        assert rec[0] == pytest.approx(x[0], rel=0.02)
        assert rec[2] == 0
    with pytest.raises(CodecError, match="NaN"):
        fp8_quantize(np.float32([1.0, np.inf]), fmt)
    nan_code = int(np.flatnonzero(np.isnan(fp8_values(fmt)))[0])
    with pytest.raises(CodecError, match="NaN"):
        fp8_dequantize(np.array([nan_code]), fmt, 1.0)
    with pytest.raises(ValueError):
        fp8_quantize(np.zeros(1), "134")


@pytest.mark.parametrize("fmt", FP8_FORMATS)
def test_fp8_cell_edges(fmt):
    codes, edges = fp8_cell_edges(fmt)
    values = fp8_values(fmt)[codes]
    assert codes.size == {"152": 247, "143": 253}[fmt] and edges.size == codes.size + 1
    assert (np.diff(values) > 0).all() and (values[:-1] < edges[1:-1]).all() and (edges[1:-1] < values[1:]).all()
