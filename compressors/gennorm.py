"""Generalized normal (GenNorm) model of gradient entries (docs/algorithms.md §2, seed 001).

``f(x) = β / (2αΓ(1/β)) · exp(−(|x−μ|/α)^β)``: β = 2 is Gaussian, β = 1 Laplace,
β < 1 heavier tails.

``fit_gennorm`` estimates (β, μ, α) by maximum likelihood on a deterministic
subsample. Default method ``"profile"``: μ is the sample median, α has a closed
form given β (``α^β = β/n · Σ|x−μ|^β``), and β maximizes the profile likelihood
(scipy's bounded Brent search in log β, started from the moment-matching value
that solves the kurtosis equation). ``method="scipy"`` runs the full 3-parameter
``scipy.stats.gennorm.fit`` from the same start (slower, about the same fit).

``gennorm_cell_pmf`` / ``normal_cell_pmf`` give the probability of each
quantizer cell under the model; entropy coders build their code from it, so both
ends derive the identical code from (β, μ, α) alone.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import optimize, special, stats

from gradwire.compressors.base import CodecError

BETA_MIN = 0.1
BETA_MAX = 8.0
DEFAULT_MAX_SAMPLES = 50_000
SUBSAMPLE_SEED = 0x5EED_0001  # fixed: both ends could redraw the same subsample

__all__ = [
    "BETA_MAX",
    "BETA_MIN",
    "fit_gennorm",
    "fit_normal",
    "gennorm_cell_pmf",
    "gennorm_kurtosis",
    "gennorm_partial_moments",
    "gennorm_std",
    "normal_cell_pmf",
    "optimal_uniform_clip",
    "subsample",
    "uniform_quantizer_mse",
]


def _finite_flat(x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size and not np.isfinite(arr).all():
        raise CodecError("cannot fit a distribution to data containing NaN or Inf")
    return arr


def subsample(x: np.ndarray, max_samples: int = DEFAULT_MAX_SAMPLES, rng: np.random.Generator | None = None) -> np.ndarray:
    """At most ``max_samples`` entries of ``x`` (float64), drawn with replacement by a seeded generator.

    Without ``rng`` the generator is seeded with ``SUBSAMPLE_SEED``, so the same input
    always gives the same subsample. Only the subsample is checked for NaN/Inf.
    """
    arr = np.asarray(x).reshape(-1)
    if arr.size > max_samples:
        gen = rng if rng is not None else np.random.default_rng(SUBSAMPLE_SEED)
        arr = arr[gen.integers(0, arr.size, size=max_samples)]
    return _finite_flat(arr)


def gennorm_kurtosis(beta: float | np.ndarray) -> float | np.ndarray:
    """Kurtosis (not excess) of a GenNorm with shape β: Γ(5/β)Γ(1/β)/Γ(3/β)²."""
    b = np.asarray(beta, dtype=np.float64)
    out = np.exp(special.gammaln(5 / b) + special.gammaln(1 / b) - 2 * special.gammaln(3 / b))
    return float(out) if out.ndim == 0 else out


def gennorm_std(beta: float, alpha: float) -> float:
    """Standard deviation of a GenNorm(β, α): α·sqrt(Γ(3/β)/Γ(1/β))."""
    return float(alpha * math.exp(0.5 * (special.gammaln(3 / beta) - special.gammaln(1 / beta))))


def _log_kurtosis(b: float) -> float:
    return math.lgamma(5 / b) + math.lgamma(1 / b) - 2 * math.lgamma(3 / b)


def _moment_beta(centered: np.ndarray) -> float:
    sq = centered * centered
    m2 = float(sq.mean())
    m4 = float(np.einsum("i,i->", sq, sq)) / sq.size  # einsum: no threaded BLAS (stalls on a busy box)
    if m2 <= 0:
        return 2.0
    log_kurt = math.log(m4 / (m2 * m2))
    lo, hi = BETA_MIN, BETA_MAX

    def f(b: float) -> float:  # decreasing in b
        return _log_kurtosis(b) - log_kurt

    if f(hi) >= 0:
        return hi
    if f(lo) <= 0:
        return lo
    return float(optimize.brentq(f, lo, hi, xtol=1e-4))


def _profile_nll(log_beta: float, log_abs: np.ndarray, n_zero: int) -> float:
    """Negative profile log-likelihood per sample (α at its closed-form MLE for this β)."""
    beta = math.exp(log_beta)
    n = log_abs.size + n_zero
    s = float(np.exp(beta * log_abs).sum()) / n  # mean |x−μ|^β
    if s <= 0:
        return math.inf
    log_alpha = (math.log(beta) + math.log(s)) / beta
    return -math.log(beta) + math.log(2.0) + math.lgamma(1 / beta) + log_alpha + 1 / beta


def fit_gennorm(
    x: np.ndarray,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    rng: np.random.Generator | None = None,
    method: str = "profile",
) -> tuple[float, float, float]:
    """Maximum-likelihood (β, μ, α) of a GenNorm on a subsample of ``x``.

    Degenerate input (empty, or constant) returns α = 0 (a point mass at μ) and
    β = 2. β is confined to [BETA_MIN, BETA_MAX].
    """
    sample = subsample(x, max_samples, rng)
    if sample.size == 0:
        return 2.0, 0.0, 0.0
    mu = float(np.median(sample))
    centered = sample - mu
    absdev = np.abs(centered)
    if not (absdev > 0).any():
        return 2.0, mu, 0.0
    beta0 = _moment_beta(centered)
    if method == "scipy":
        alpha0 = float(np.mean(absdev**beta0) * beta0) ** (1 / beta0)
        beta, mu, alpha = stats.gennorm.fit(sample, beta0, loc=mu, scale=alpha0)
        return float(np.clip(beta, BETA_MIN, BETA_MAX)), float(mu), float(alpha)
    if method != "profile":
        raise ValueError(f"unknown GenNorm fit method {method!r} (profile or scipy)")
    nonzero = absdev[absdev > 0]
    log_abs = np.log(nonzero)
    n_zero = absdev.size - nonzero.size
    lo, hi = math.log(BETA_MIN), math.log(BETA_MAX)
    start = math.log(beta0)
    # Bracket around the moment estimate first (fast); fall back to the full range.
    a, b = max(lo, start - 0.7), min(hi, start + 0.7)
    res = optimize.minimize_scalar(_profile_nll, bounds=(a, b), args=(log_abs, n_zero), method="bounded",
                                   options={"xatol": 1e-3})
    log_beta = float(res.x)
    if (log_beta - a < 2e-3 and a > lo) or (b - log_beta < 2e-3 and b < hi):
        res = optimize.minimize_scalar(_profile_nll, bounds=(lo, hi), args=(log_abs, n_zero), method="bounded",
                                       options={"xatol": 1e-3})
        log_beta = float(res.x)
    beta = math.exp(log_beta)
    alpha = (beta * float(np.exp(beta * log_abs).sum()) / absdev.size) ** (1 / beta)
    return float(beta), mu, float(alpha)


def fit_normal(x: np.ndarray) -> tuple[float, float]:
    """(μ, σ) of a normal fit: sample mean and standard deviation (ddof 0); (0, 0) when empty."""
    arr = _finite_flat(x)
    if arr.size == 0:
        return 0.0, 0.0
    return float(arr.mean()), float(arr.std())


def _check_edges(edges: np.ndarray) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64).reshape(-1)
    if e.size < 2:
        raise ValueError("need at least 2 edges (1 cell)")
    inner = e[1:-1]
    if np.isnan(inner).any() or (np.diff(inner) < 0).any():
        raise ValueError("cell edges must be sorted and not NaN")
    return inner


def _cell_pmf(inner: np.ndarray, cdf, sf, center: float, floor: float) -> np.ndarray:
    lo = np.concatenate([[-np.inf], inner])
    hi = np.concatenate([inner, [np.inf]])
    upper = lo >= center  # cells right of the center: difference of survival functions (tail precision)
    p = np.where(upper, sf(lo) - sf(hi), cdf(hi) - cdf(lo))
    return _floor_normalize(p, floor)


def _floor_normalize(p: np.ndarray, floor: float) -> np.ndarray:
    p = np.maximum(np.nan_to_num(p, nan=0.0), floor)
    return p / p.sum()


def _point_mass(inner: np.ndarray, mu: float, floor: float) -> np.ndarray:
    p = np.zeros(inner.size + 1)
    p[int(np.searchsorted(inner, mu, side="left"))] = 1.0
    return _floor_normalize(p, floor)


def gennorm_cell_pmf(
    edges: np.ndarray, beta: float, mu: float, alpha: float, floor: float = 1e-12
) -> np.ndarray:
    """Probability of each quantizer cell under GenNorm(β, μ, α), floored and renormalized.

    ``edges`` has K+1 entries for K cells: cell k is (edges[k], edges[k+1]]. The
    first and last entries are taken as −∞ and +∞ whatever their value, so the
    cells cover the real line (pass ``[-inf, t_1, ..., t_{K-1}, inf]``). α = 0
    puts all the mass in the cell holding μ.
    """
    inner = _check_edges(edges)
    if not (np.isfinite(beta) and np.isfinite(mu) and np.isfinite(alpha)) or beta <= 0 or alpha < 0:
        raise CodecError(f"invalid GenNorm parameters beta={beta}, mu={mu}, alpha={alpha}")
    if alpha == 0:
        return _point_mass(inner, mu, floor)
    a = 1.0 / beta

    def sf(t: np.ndarray) -> np.ndarray:  # P(X > t), exact in both tails
        z = (t - mu) / alpha
        upper = 0.5 * special.gammaincc(a, np.abs(z) ** beta)
        return np.where(z >= 0, upper, 1.0 - upper)

    def cdf(t: np.ndarray) -> np.ndarray:
        z = (t - mu) / alpha
        lower = 0.5 * special.gammaincc(a, np.abs(z) ** beta)
        return np.where(z <= 0, lower, 1.0 - lower)

    with np.errstate(invalid="ignore"):
        return _cell_pmf(inner, cdf, sf, mu, floor)


def normal_cell_pmf(edges: np.ndarray, mu: float, sigma: float, floor: float = 1e-12) -> np.ndarray:
    """Like ``gennorm_cell_pmf`` for a normal N(μ, σ²)."""
    inner = _check_edges(edges)
    if not (np.isfinite(mu) and np.isfinite(sigma)) or sigma < 0:
        raise CodecError(f"invalid normal parameters mu={mu}, sigma={sigma}")
    if sigma == 0:
        return _point_mass(inner, mu, floor)
    return _cell_pmf(
        inner,
        lambda t: special.ndtr((t - mu) / sigma),
        lambda t: special.ndtr(-(t - mu) / sigma),
        mu,
        floor,
    )


def gennorm_partial_moments(lo: np.ndarray, hi: np.ndarray, beta: float, k: int) -> np.ndarray:
    """∫_lo^hi x^k f(x) dx for a standard GenNorm(β, μ=0, α=1), with 0 <= lo <= hi <= inf."""
    a = (k + 1) / beta
    coef = math.exp(math.lgamma(a) - math.lgamma(1 / beta)) / 2
    return coef * (special.gammainc(a, np.asarray(hi) ** beta) - special.gammainc(a, np.asarray(lo) ** beta))


def uniform_quantizer_mse(clip: float, bits: int, grid: str, beta: float) -> float:
    """Expected squared error of the uniform quantizer (``compressors.quantize`` grids, round to
    nearest, range ±clip) on a standard GenNorm(β, 0, 1)."""
    if grid == "midrise":
        half = 2 ** (bits - 1)
        step = 2 * clip / 2**bits
        levels = (np.arange(half) + 0.5) * step
        lo = np.arange(half) * step
    else:
        half = 2 ** (bits - 1) - 1
        step = clip / half
        levels = np.arange(half + 1) * step
        lo = np.maximum(np.arange(half + 1) - 0.5, 0.0) * step
    hi = np.append(lo[1:], np.inf)
    m0, m1, m2 = (gennorm_partial_moments(lo, hi, beta, k) for k in (0, 1, 2))
    return float(2 * np.sum(m2 - 2 * levels * m1 + levels**2 * m0))


@functools.lru_cache(maxsize=4096)
def _optimal_clip_cached(beta_key: float, bits: int, grid: str) -> float:
    std = math.exp(0.5 * (math.lgamma(3 / beta_key) - math.lgamma(1 / beta_key)))
    res = optimize.minimize_scalar(
        uniform_quantizer_mse, bounds=(0.1 * std, 60 * std), args=(bits, grid, beta_key), method="bounded",
        options={"xatol": 1e-4 * std},
    )
    return float(res.x)


def optimal_uniform_clip(beta: float, alpha: float, bits: int, grid: str = "midtread") -> float:
    """The range c that minimizes the quantizer's MSE for GenNorm(β, ·, α) (β rounded to 0.01, cached)."""
    beta_key = round(min(max(float(beta), BETA_MIN), BETA_MAX), 2)
    return alpha * _optimal_clip_cached(beta_key, int(bits), grid)
