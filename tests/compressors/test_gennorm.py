"""compressors.gennorm: GenNorm fitting and cell probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gradwire.compressors.base import CodecError
from gradwire.compressors.gennorm import (
    BETA_MIN,
    fit_gennorm,
    fit_normal,
    gennorm_cell_pmf,
    gennorm_kurtosis,
    gennorm_std,
    normal_cell_pmf,
    subsample,
)


def _samples(beta: float, n: int = 200_000, loc: float = 0.002, scale: float = 0.01, seed: int = 0) -> np.ndarray:
    return stats.gennorm.rvs(beta, loc=loc, scale=scale, size=n, random_state=np.random.default_rng(seed)).astype(np.float32)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_fit_recovers_parameters(beta):
    x = _samples(beta)
    b, mu, alpha = fit_gennorm(x)
    assert b == pytest.approx(beta, rel=0.05)
    assert alpha == pytest.approx(0.01, rel=0.05)
    assert abs(mu - 0.002) < 0.05 * 0.01


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_profile_fit_matches_scipy_mle(beta):
    x = _samples(beta, n=30_000, seed=1)
    b1, _, a1 = fit_gennorm(x)
    b2, _, a2 = fit_gennorm(x, method="scipy")
    assert b1 == pytest.approx(b2, rel=0.03)
    assert a1 == pytest.approx(a2, rel=0.03)


def test_fit_is_deterministic_and_scale_equivariant():
    x = _samples(1.0, n=300_000)
    assert fit_gennorm(x) == fit_gennorm(x.copy())
    assert np.array_equal(subsample(x), subsample(x))
    assert subsample(x, 1000).size == 1000
    b, _, a = fit_gennorm(x)
    for factor in (1e-30, 1e30):
        bs, _, as_ = fit_gennorm(x.astype(np.float64) * factor)
        assert bs == pytest.approx(b, rel=1e-6)
        assert as_ == pytest.approx(a * factor, rel=1e-6)


def test_fit_degenerate_inputs():
    assert fit_gennorm(np.zeros(0)) == (2.0, 0.0, 0.0)
    assert fit_gennorm(np.full(10, 3.0)) == (2.0, 3.0, 0.0)
    assert fit_gennorm(np.array([1.5]))[2] == 0.0
    b, _, a = fit_gennorm(np.array([0.0, 1.0]))
    assert BETA_MIN <= b and a > 0
    with pytest.raises(CodecError, match="NaN"):
        fit_gennorm(np.array([0.0, np.nan, 1.0]))
    assert fit_normal(np.zeros(0)) == (0.0, 0.0)
    assert fit_normal(np.array([1.0, 3.0])) == (2.0, 1.0)


def test_fit_is_fast_on_a_large_tensor():
    import time

    x = np.random.default_rng(0).laplace(size=2_000_000).astype(np.float32)
    start = time.perf_counter()
    fit_gennorm(x)
    assert time.perf_counter() - start < 2.0  # a subsample, not the whole tensor (typically ~30 ms)


def test_moments():
    assert gennorm_kurtosis(2.0) == pytest.approx(3.0)
    assert gennorm_kurtosis(1.0) == pytest.approx(6.0)
    assert gennorm_std(2.0, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert gennorm_std(1.0, 1.0) == pytest.approx(math.sqrt(2))


def test_cell_pmf_matches_cdf_and_covers_the_line():
    edges = np.array([-5.0, -1.0, -0.2, 0.3, 1.0, 5.0])  # outer entries act as -inf / +inf
    p = gennorm_cell_pmf(edges, 0.8, 0.1, 0.5, floor=0.0)
    cdf = stats.gennorm(0.8, loc=0.1, scale=0.5).cdf
    want = np.diff(np.concatenate([[0.0], cdf(edges[1:-1]), [1.0]]))
    assert p.shape == (5,)
    assert p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p, want, rtol=1e-9, atol=1e-15)


def test_cell_pmf_floor_and_tail_precision():
    edges = np.concatenate([[-np.inf], np.linspace(-40, 40, 15), [np.inf]])
    p = gennorm_cell_pmf(edges, 2.0, 0.0, 1.0, floor=1e-12)
    assert (p >= 1e-12 * 0.99).all() and p.sum() == pytest.approx(1.0)
    # The far right tail comes from survival functions, not 1 - cdf: far below 1e-16.
    tail = gennorm_cell_pmf(np.array([-np.inf, 6.0, np.inf]), 2.0, 0.0, 1.0, floor=0.0)[1]
    assert 0 < tail < 1e-15


def test_normal_is_gennorm_beta_2():
    edges = np.concatenate([[-np.inf], np.linspace(-3, 3, 9), [np.inf]])
    sigma = 0.7
    np.testing.assert_allclose(
        normal_cell_pmf(edges, 0.2, sigma), gennorm_cell_pmf(edges, 2.0, 0.2, sigma * math.sqrt(2)), rtol=1e-9
    )


def test_point_mass_and_bad_parameters():
    edges = np.array([-np.inf, -1.0, 1.0, np.inf])
    p = gennorm_cell_pmf(edges, 2.0, 0.0, 0.0, floor=1e-12)
    assert p.argmax() == 1 and p[1] == pytest.approx(1.0)
    assert normal_cell_pmf(edges, 5.0, 0.0).argmax() == 2
    for bad in [(np.nan, 0.0, 1.0), (1.0, 0.0, -1.0), (0.0, 0.0, 1.0), (1.0, np.inf, 1.0)]:
        with pytest.raises(CodecError):
            gennorm_cell_pmf(edges, *bad)
    with pytest.raises(ValueError):
        gennorm_cell_pmf(np.array([0.0]), 1.0, 0.0, 1.0)
