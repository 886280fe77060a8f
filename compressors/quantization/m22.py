"""M22: rate–distortion optimal scalar quantizer for gradients (docs/algorithms.md §4, seed 003).

The distortion is ``d_M(g, ĝ) = |g|^M (g − ĝ)²`` (M = 0 is the mean squared error).
Gradient entries are modelled i.i.d. generalized normal (``dist=gennorm``, shape β) or
double Weibull (``dist=dweibull``, shape c). For a unit-variance model the quantizer with
2^R cells minimizing the expected distortion is Lloyd–Max on the *tilted* density
``|x|^M f(x)``: centers are tilted centroids, thresholds midpoints.

Design (``design_quantizer``)
    Both families reduce the tilted moments over a cell to regularized incomplete gamma
    functions (closed form, vectorized over cells), so a design is a few thousand numpy
    operations and is cached on the rounded key (dist, shape, bits, M). The design is
    symmetric: it runs on the half line with 2^(R−1) cells (threshold 0 is fixed by
    symmetry) and mirrors.

Codec ``m22:bits=R,M=...,dist=gennorm|dweibull,coder=ans|huffman|zstd,ef=1,gamma=0.7,...``
    Per tensor the worker fits the model to the z-scored nonzero entries (exact zeros
    from dead units are a point mass no continuous model describes): the shape by MLE
    (GenNorm: ``compressors.gennorm.fit_gennorm``; double Weibull: Weibull profile
    likelihood on |z|), the location is the mean (the quantizer is symmetric about it;
    a median falls inside one mode of the bimodal inputs error feedback can produce),
    the scale is the closed-form MLE for that shape and location. It quantizes every
    entry with the table designed for the shape and entropy codes the cell indices with
    the model's cell probabilities (ANS via constriction, or canonical Huffman). The PS
    re-runs the identical deterministic design from the float32 side information.
    Error feedback ``v = g + γe`` (γ = ``gamma``, default 0.7, the authors' value).
    Biased. M > 0 moves the levels outward and inflates ||ĝ|| (Laplace, R = 1, M = 2:
    2.12σ against 0.71σ); once the gain ||ĝ||/||v|| exceeds 1 + 1/γ error feedback
    oscillates and diverges, which happened on the default task, so the default is
    ``rescale=norm`` (see below); ``rescale=none`` gives the bare quantizer.

Payload layout (little-endian)::

    byte 0      header: bits 0-1 mode (0 fitted, 1 small-tensor fallback, 2 constant),
                bit 2 indices raw-packed (R bits each) instead of entropy coded,
                bit 3 reserved (0), bits 4-7 format version (1)
    mode 0      f32 shape, f32 mu, f32 level scale L, indices
    mode 1      f32 mu, f32 level scale L, indices
                (no fit on tensors with fewer than ``min_fit`` nonzero entries: the shape
                is ``small_shape``, mu and sigma are the sample moments)
    mode 2      f32 mu (every entry decodes to mu: zero or constant tensor)
    indices     entropy-coded stream (``compressors.entropy`` ANS or canonical Huffman
                with the model's cell pmf, or with ``coder=zstd`` one byte per index through
                zstd level 1, no model), or, when that is not shorter, the indices
                packed R bits each (header bit 2).

Index j decodes to ``mu + L · c_j`` with c_j the unit-variance center. ``L = s·σ``: σ
is the fitted model's standard deviation and s the rescale factor, folded into one
float because the decoder needs nothing else (``rescale=norm``: s makes ||ĝ − μ|| =
||v − μ||; ``ls``: the least-squares s = <v − μ, c>/(σ||c||²); ``model``:
s = 1/sqrt(E[Q(Z)²]) under the model; ``none``: s = 1). The model pmf and the design
depend on the shape alone (the model lives in z-space), so the PS re-derives the
identical tables from the float32 shape.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from gradwire.compressors.base import (
    Codec,
    CodecError,
    CrossWorkerState,
    Decoder,
    Encoded,
    Encoder,
    RoundContext,
    TensorSpec,
    as_bytes,
    check_input,
    expect_payload_size,
)
from gradwire.compressors.feedback import maybe_error_feedback
from gradwire.compressors.quantize import lookup
from gradwire.compressors.registry import register

DISTS = ("gennorm", "dweibull")
MAX_BITS = 8
SHAPE_MIN, SHAPE_MAX = 0.2, 8.0  # shapes are clamped here before a design
SHAPE_DECIMALS = 3  # design cache key: shape rounded to 1e-3
M_DECIMALS = 6
LLOYD_TOL = 1e-12  # stop when no threshold moves by more than this (unit variance)
LLOYD_MAX_ITER = 20_000


# ---------------------------------------------------------------- unit-variance models


@dataclass(frozen=True)
class _Family:
    """``f`` on x ≥ 0 in the form ∫_0^t x^k f = norm·λ^k·Γ(s_k)·P(s_k, (t/λ)^p)."""

    p: float  # power in u = (x/λ)^p
    lam: float  # scale λ of the unit-variance member
    log_norm: float  # log of the factor in front (half of the mass on x ≥ 0)
    kind: str

    def s(self, k: float) -> float:
        return (k + 1.0) / self.p if self.kind == "gennorm" else 1.0 + k / self.p

    def log_moment_const(self, k: float) -> float:
        """log of ∫_0^∞ x^k f(x) dx (half-line moment)."""
        s = self.s(k)
        return self.log_norm + k * math.log(self.lam) + special.gammaln(s)

    def u(self, t: np.ndarray) -> np.ndarray:
        return (np.asarray(t, dtype=np.float64) / self.lam) ** self.p


def _family(dist: str, shape: float) -> _Family:
    if dist == "gennorm":
        beta = shape
        # Var = α² Γ(3/β)/Γ(1/β) = 1
        lam = math.exp(0.5 * (special.gammaln(1.0 / beta) - special.gammaln(3.0 / beta)))
        # ∫_0^t x^k f = α^k Γ((k+1)/β) P(...) / (2 Γ(1/β))
        return _Family(beta, lam, -math.log(2.0) - special.gammaln(1.0 / beta), "gennorm")
    if dist == "dweibull":
        c = shape
        # Var = λ² Γ(1 + 2/c) = 1
        lam = math.exp(-0.5 * special.gammaln(1.0 + 2.0 / c))
        # ∫_0^t x^k f = λ^k Γ(1 + k/c) P(...) / 2
        return _Family(c, lam, -math.log(2.0), "dweibull")
    raise ValueError(f"unknown distribution {dist!r}; choose one of {', '.join(DISTS)}")


def unit_scale(dist: str, shape: float) -> float:
    """Scale parameter (α for GenNorm, λ for double Weibull) of the unit-variance member."""
    return _family(dist, float(shape)).lam


def _tail_moments(fam: _Family, k: float, edges: np.ndarray) -> np.ndarray:
    """∫_{edges[j]}^{edges[j+1]} x^k f dx / ∫_0^∞ x^k f dx for 0 ≤ edges, last may be inf.

    Computed as differences of upper regularized gammas Q, which keeps relative precision
    in the far tail where 1 − P would cancel.
    """
    q = special.gammaincc(fam.s(k), fam.u(edges))
    return q[:-1] - q[1:]


def _clean_key(dist: str, shape: float, bits: int, M: float) -> tuple[str, float, int, float]:
    if dist not in DISTS:
        raise ValueError(f"unknown distribution {dist!r}; choose one of {', '.join(DISTS)}")
    shape = float(shape)
    M = float(M)
    if not math.isfinite(shape) or shape <= 0:
        raise ValueError(f"shape must be a positive finite number, got {shape}")
    if not math.isfinite(M) or M < 0:
        raise ValueError(f"M must be a finite number >= 0, got {M}")
    if int(bits) != bits or not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits}")
    shape = round(min(max(shape, SHAPE_MIN), SHAPE_MAX), SHAPE_DECIMALS)
    return dist, shape, int(bits), round(M, M_DECIMALS)


def design_quantizer(dist: str, shape: float, bits: int, M: float) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd–Max quantizer on ``|x|^M f(x)`` for the unit-variance ``dist`` with ``shape``.

    Returns ``(thresholds, centers)``: 2^bits − 1 increasing interior thresholds and
    2^bits increasing centers, both float64, read-only, symmetric about 0. ``shape`` is
    clamped to [0.2, 8] and rounded to 1e-3, M to 1e-6; the result is cached on that key,
    so equal float32 side information gives bitwise-identical tables at both ends.

    >>> t, c = design_quantizer("gennorm", 1.0, 1, 0.0)   # Laplace, classical Lloyd–Max
    >>> [round(float(v), 4) for v in c]
    [-0.7071, 0.7071]
    """
    return _design_cached(*_clean_key(dist, shape, bits, M))


# Cache sizes: the shape comes from each payload's side information (rounded to 1e-3 in [0.2, 8]),
# so a hostile peer can ask for thousands of designs; 128 recent ones cover an honest model's
# tensors over many rounds and keep the PS's cache memory under 2 MiB even at 8 bits
# (tests/compressors/test_decode_memory.py).
DESIGN_CACHE_SIZE = 128


@functools.lru_cache(maxsize=DESIGN_CACHE_SIZE)
def _design_cached(dist: str, shape: float, bits: int, M: float) -> tuple[np.ndarray, np.ndarray]:
    pos_t, pos_c = _design_half(dist, shape, bits, M)
    thresholds = np.concatenate([-pos_t[::-1], [0.0], pos_t])
    centers = np.concatenate([-pos_c[::-1], pos_c])
    thresholds.setflags(write=False)
    centers.setflags(write=False)
    return thresholds, centers


def design_cache_info():
    """``functools`` cache statistics of the design (hits, misses, currsize)."""
    return _design_cached.cache_info()


def tables_cache_info():
    """``functools`` cache statistics of the tables derived from a design (pmf, code)."""
    return _tables.cache_info()


def _design_half(dist: str, shape: float, bits: int, M: float) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd–Max on [0, ∞) with 2^(bits−1) cells; returns (positive thresholds, centers)."""
    fam = _family(dist, shape)
    n = 2 ** (bits - 1)
    # Tilted centroid of [a, b]: λ·Γ(s_{M+1})/Γ(s_M) · ΔQ(s_{M+1}) / ΔQ(s_M).
    ratio = math.exp(fam.log_moment_const(M + 1.0) - fam.log_moment_const(M))

    def centroids(edges: np.ndarray) -> np.ndarray:
        num = _tail_moments(fam, M + 1.0, edges)
        den = _tail_moments(fam, M, edges)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = ratio * num / den
        bad = ~np.isfinite(c) | (den <= 0)
        if bad.any():  # cell with no representable mass: fall back to its left edge
            c[bad] = edges[:-1][bad]
        return np.clip(c, edges[:-1], edges[1:])

    if n == 1:
        return np.empty(0), centroids(np.array([0.0, np.inf]))
    # Symmetric start: equal-mass cells of the tilted half density (gamma quantiles).
    q = np.arange(1, n) / n
    t = fam.lam * special.gammaincinv(fam.s(M), q) ** (1.0 / fam.p)
    for _ in range(LLOYD_MAX_ITER):
        c = centroids(np.concatenate([[0.0], t, [np.inf]]))
        new_t = 0.5 * (c[:-1] + c[1:])
        moved = float(np.max(np.abs(new_t - t)))
        t = new_t
        if moved <= LLOYD_TOL:
            break
    c = centroids(np.concatenate([[0.0], t, [np.inf]]))
    return t, c


def cell_probabilities(dist: str, shape: float, thresholds: np.ndarray) -> np.ndarray:
    """Probability of each cell under the (untilted) unit-variance model."""
    fam = _family(dist, float(shape))
    t = np.asarray(thresholds, dtype=np.float64)
    # P(X > t) for X symmetric: Q/2 for t ≥ 0, 1 − Q/2 for t < 0.
    upper_half = 0.5 * special.gammaincc(fam.s(0.0), fam.u(np.abs(t)))
    sf = np.where(t >= 0, upper_half, 1.0 - upper_half)
    sf = np.concatenate([[1.0], sf, [0.0]])
    return sf[:-1] - sf[1:]


def expected_distortion(dist: str, shape: float, thresholds: np.ndarray, centers: np.ndarray, M: float) -> float:
    """E[|X|^M (X − Q(X))²] under the unit-variance model, by closed-form cell moments."""
    fam = _family(dist, float(shape))
    t = np.asarray(thresholds, dtype=np.float64)
    c = np.asarray(centers, dtype=np.float64)
    half = len(c) // 2
    pos_edges = np.concatenate([[0.0], t[half:], [np.inf]])
    pos_c = c[half:]
    total = 0.0
    for k, coef in ((M + 2.0, 1.0), (M + 1.0, -2.0 * pos_c), (M, pos_c**2)):
        mom = _tail_moments(fam, k, pos_edges) * math.exp(fam.log_moment_const(k))
        total += float(np.sum(coef * mom))
    return 2.0 * total


# ---------------------------------------------------------------- fitting


def fit_dweibull(z: np.ndarray, max_samples: int = 50_000, rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Double-Weibull MLE with the location fixed at 0: returns (shape c, scale λ).

    The location is not estimated (for c < 1 the likelihood is unbounded at every data
    point); the codec centres the tensor first. The shape solves the Weibull profile
    likelihood equation on |z| by Brent's method, the scale is then closed form.
    """
    from scipy import optimize

    from gradwire.compressors.gennorm import subsample  # the same deterministic subsample as the GenNorm fit

    y = np.abs(subsample(z, max_samples, rng))
    y = y[y > 0]
    if y.size < 2:
        return 1.0, float(y.mean()) if y.size else 1.0
    logs = np.log(y)
    mean_log = float(logs.mean())
    centred = logs - logs.max()

    def profile(c: float) -> float:
        w = np.exp(c * centred)
        return 1.0 / c + mean_log - float(np.dot(w, logs) / w.sum())

    lo, hi = SHAPE_MIN / 2, SHAPE_MAX * 2
    f_lo, f_hi = profile(lo), profile(hi)
    if f_lo <= 0:
        c = lo
    elif f_hi >= 0:
        c = hi
    else:
        c = float(optimize.brentq(profile, lo, hi, xtol=1e-6, rtol=1e-6))  # designs round c to 1e-3
    lam = float(np.mean(np.exp(c * (logs - logs.max()))) ** (1.0 / c) * math.exp(logs.max()))
    return c, lam


def scale_given_shape(dist: str, shape: float, x: np.ndarray) -> float:
    """Closed-form MLE of the standard deviation of centred ``x`` for a fixed shape."""
    a = np.abs(np.asarray(x, dtype=np.float64).reshape(-1))
    if dist == "gennorm":  # α = (β/n Σ|x|^β)^(1/β)
        alpha = (shape * float(np.mean(a**shape))) ** (1.0 / shape)
    else:  # λ = (1/n Σ|x|^c)^(1/c)
        alpha = float(np.mean(a**shape)) ** (1.0 / shape)
    return alpha / unit_scale(dist, shape)


# ---------------------------------------------------------------- codec

FORMAT_VERSION = 1
MODE_FIT, MODE_SMALL, MODE_CONST = 0, 1, 2
FLAG_RAW = 0x04
PMF_FLOOR = 1e-12  # every cell keeps a code, even where the model puts ~no mass
RESCALES = ("norm", "ls", "model", "none")
CODERS = ("ans", "huffman", "zstd")


def cell_indices(z: np.ndarray, thresholds: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Cell of every entry (uint8: at most 2^8 cells): the number of thresholds strictly
    below it (cell j is (t_{j−1}, t_j]). Comparisons for small tables, binary search for large ones."""
    if thresholds.size > 15:
        cells = np.searchsorted(thresholds, z, side="left").astype(np.uint8)
        if out is None:
            return cells
        out[...] = cells
        return out
    idx = np.zeros(z.shape, dtype=np.uint8) if out is None else out
    if out is not None:
        idx.fill(0)
    above = np.empty(z.shape, dtype=bool)
    for t in thresholds:
        np.greater(z, t, out=above)
        idx += above
    return idx


# Entries per chunk of the encoder's float64 pass: the float64 temporaries of one chunk stay in
# the CPU cache instead of making 11 M-entry float64 copies (the per-entry arithmetic is unchanged).
CHUNK = 1 << 16


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(start + CHUNK, n))


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of float32 ``x`` with float64 arithmetic, in cache-sized chunks."""
    n = x.size
    mean = sum(float(x[c].sum(dtype=np.float64)) for c in _chunks(n)) / n
    sq = 0.0
    for c in _chunks(n):
        d = x[c].astype(np.float64)
        d -= mean
        sq += float(np.dot(d, d))
    return mean, math.sqrt(sq / n)


def level_table(mu: float, level_scale: float, centers: np.ndarray) -> np.ndarray:
    """float32 value of every cell index: what the decoder returns for it (both ends use this)."""
    return (mu + level_scale * centers).astype(np.float32)


def pack_indices(idx: np.ndarray, bits: int) -> bytes:
    """Indices packed ``bits`` bits each, most significant bit first."""
    idx = np.asarray(idx, dtype=np.uint8).reshape(-1, 1)
    planes = np.unpackbits(idx, axis=1)[:, 8 - bits :]
    return np.packbits(planes.reshape(-1)).tobytes()


def unpack_indices(data: bytes, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return planes.astype(np.int64) @ weights


def model_pmf(dist: str, shape: float, thresholds: np.ndarray) -> np.ndarray:
    """Cell probabilities under the unit-variance model, floored and renormalized.

    GenNorm goes through ``compressors.gennorm.gennorm_cell_pmf`` (the same pmf the
    GenNorm/Huffman codec uses); double Weibull through the closed form above.
    """
    if dist == "gennorm":
        from gradwire.compressors.gennorm import gennorm_cell_pmf

        edges = np.concatenate([[-np.inf], thresholds, [np.inf]])
        return np.asarray(gennorm_cell_pmf(edges, shape, 0.0, unit_scale(dist, shape), PMF_FLOOR), dtype=np.float64)
    p = np.maximum(cell_probabilities(dist, shape, thresholds), PMF_FLOOR)
    return p / p.sum()


@functools.lru_cache(maxsize=DESIGN_CACHE_SIZE)
def _tables(dist: str, shape: float, bits: int, M: float, coder: str):
    """Everything both ends derive from (dist, shape, bits, M): design, pmf, code."""
    thresholds, centers = design_quantizer(dist, shape, bits, M)
    pmf = model_pmf(dist, shape, thresholds)
    pmf.setflags(write=False)
    code = None
    if coder == "huffman":
        from gradwire.compressors.entropy import huffman_code_lengths

        code = huffman_code_lengths(pmf)
    # E[Q(Z)²] under the model: the rescale=model factor is 1/sqrt of it.
    second_moment = float(np.dot(cell_probabilities(dist, shape, thresholds), centers**2))
    return thresholds, centers, pmf, code, second_moment


@dataclass
class _Side:
    mode: int
    shape: float = 1.0
    mu: float = 0.0
    sigma: float = 0.0
    scale: float = 1.0  # rescale factor s


class M22Encoder(Encoder):
    """Worker side: fit, design (cached), quantize, entropy code. Keeps the fitted shape
    of each tensor between refits and running statistics."""

    def __init__(self, codec: M22Codec):
        self.codec = codec
        self.shapes: dict[str, float] = {}
        self._stats: dict[str, float] = {}
        self._last: tuple | None = None  # (message, level table, indices) of the last encode
        self.reset_stats()

    # -- state
    def reset(self) -> None:
        self.shapes.clear()
        self.reset_stats()

    def reset_stats(self) -> None:
        self._stats = dict.fromkeys(_STAT_KEYS, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"shapes": dict(self.shapes)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.shapes = {str(k): float(v) for k, v in state.get("shapes", {}).items()}

    # -- fitting
    def _fit(self, x: np.ndarray, mean: float, std: float, spec: TensorSpec, ctx: RoundContext) -> tuple[float, float, float]:
        codec = self.codec

        def standardized(sample: np.ndarray) -> np.ndarray:  # z of the sampled entries only
            return (sample.astype(np.float64) - mean) / std

        refit = spec.name not in self.shapes or ctx.round % codec.refit == 0
        if refit:
            rng = ctx.rng(spec.name, salt=22)
            # The fits subsample first (the same draws as on the full z): standardize the sample only.
            z = standardized(x[rng.integers(0, x.size, size=codec.max_samples)] if x.size > codec.max_samples else x)
            if codec.dist == "gennorm":
                from gradwire.compressors.gennorm import fit_gennorm

                fitted = fit_gennorm(z, max_samples=codec.max_samples, rng=rng)[0]
            else:
                fitted = fit_dweibull(z, max_samples=codec.max_samples, rng=rng)[0]
            shape = min(max(float(fitted), SHAPE_MIN), SHAPE_MAX)
            if shape != float(fitted):
                self._stats["clamped_fits"] += 1
            self.shapes[spec.name] = shape
            self._stats["refits"] += 1
        else:
            shape = self.shapes[spec.name]
        # Location: the mean (the quantizer is symmetric about it; a median sits inside
        # one mode of the bimodal inputs error feedback can produce). Scale: the MLE
        # for this shape and location, in closed form.
        if x.size > codec.max_samples:
            z = standardized(x[ctx.rng(spec.name, salt=23).integers(0, x.size, size=codec.max_samples)])
        else:
            z = standardized(x)
        return shape, mean, std * scale_given_shape(codec.dist, shape, z)

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        codec = self.codec
        self._last = None
        flat = check_input(x, spec)  # float32; float64 only chunk by chunk (see CHUNK)
        n = flat.size
        st = self._stats
        st["tensors"] += 1
        st["entries"] += n
        if n == 0 or flat.min() == flat.max():  # every entry equal (all finite)
            side = _Side(MODE_CONST, mu=float(flat[0]) if n else 0.0)
        else:
            # Exact zeros (dead units, inputs that are always 0) are a point mass the
            # continuous model cannot describe: the model is fitted to the nonzero
            # entries; every entry, zeros included, is then quantized.
            nnz = int(np.count_nonzero(flat))
            nonzero = flat if nnz == n else flat[flat != 0]
            st["zero_fraction_sum"] += 1.0 - nnz / n
            moments = _mean_std(nonzero) if nnz >= codec.min_fit else None
            sq_in = nnz * (moments[0] ** 2 + moments[1] ** 2) if moments else float(np.dot(nonzero, nonzero.astype(np.float64)))
            if moments is None or moments[1] == 0.0:
                nz64 = nonzero.astype(np.float64)
                sample = nz64 if nz64.size >= 2 and float(nz64.std()) > 0 else flat.astype(np.float64)
                shape, mu, sigma = codec.small_shape, float(sample.mean()), float(sample.std())
                mode = MODE_SMALL
                st["small_tensors"] += 1
            else:
                shape, mu, sigma = self._fit(nonzero, *moments, spec, ctx)
                mode = MODE_FIT
            del nonzero
            shape, mu, sigma = (float(np.float32(v)) for v in (shape, mu, sigma))
            if not (sigma > 0 and math.isfinite(sigma) and math.isfinite(mu) and math.isfinite(shape)):
                side = _Side(MODE_CONST, mu=float(np.float32(_mean_std(flat)[0])))
            else:
                side = _Side(mode, shape, mu, sigma)
        if side.mode == MODE_CONST:
            st["const_tensors"] += 1
            payload = _HEADER.pack(MODE_CONST | (FORMAT_VERSION << 4)) + struct.pack("<f", side.mu)
            st["side_bits"] += 8 * len(payload)
            st["bits"] += 8 * len(payload)
            msg = Encoded(codec.spec, spec, payload)
            self._last = (msg, np.full(n, side.mu, dtype=np.float32), None)
            return msg

        thresholds, centers, pmf, code, second = codec.tables(side.shape)
        # One pass in cache-sized float64 chunks: z = (v − μ)/σ exactly as a whole-array pass
        # would compute it, its cell, and the sums every norm below needs.
        idx = np.empty(n, dtype=np.uint8)
        counts = np.zeros(centers.size, dtype=np.int64)
        zc = zz = 0.0
        for c in _chunks(n):
            v = flat[c].astype(np.float64)
            v -= side.mu
            v /= side.sigma
            cells = cell_indices(v, thresholds, out=idx[c])
            counts += np.bincount(cells, minlength=centers.size)
            zz += float(np.dot(v, v))  # ||v − μ||² / σ²
            zc += float(np.dot(v, centers.take(cells)))  # <z, c[idx]>
        cc = float(np.dot(counts, centers * centers))  # ||c[idx]||²
        if codec.rescale == "norm":  # ||ĝ − μ|| = ||v − μ||
            scale = math.sqrt(zz / cc) if cc > 0 else 1.0
        elif codec.rescale == "ls":  # least squares: s = <v − μ, ĝ − μ> / ||ĝ − μ||²
            scale = zc / cc if cc > 0 else 1.0
        elif codec.rescale == "model":
            scale = 1.0 / math.sqrt(second)
        else:
            scale = 1.0
        # Only the product s·σ (the spacing of the levels) goes on the wire.
        level_scale = float(np.float32(scale * side.sigma)) if math.isfinite(scale) and scale > 0 else side.sigma
        if not (level_scale > 0 and math.isfinite(level_scale)):
            level_scale = side.sigma
        s_eff = level_scale / side.sigma
        coded = codec.entropy_encode(idx, pmf, code)
        flags = 0
        if (n * codec.bits + 7) // 8 <= len(coded):
            coded, flags = pack_indices(idx, codec.bits), FLAG_RAW
            st["raw_tensors"] += 1
        header = _HEADER.pack(side.mode | flags | (FORMAT_VERSION << 4))
        floats = [side.shape] if side.mode == MODE_FIT else []
        floats += [side.mu, level_scale]
        side_bytes = header + struct.pack(f"<{len(floats)}f", *floats)
        payload = side_bytes + coded

        # statistics (encoder only; nothing here goes on the wire)
        from gradwire.compressors.entropy import entropy_from_counts

        st["side_bits"] += 8 * len(side_bytes)
        st["index_bits"] += 8 * len(coded)
        st["bits"] += 8 * len(payload)
        st["empirical_entropy_bits"] += n * entropy_from_counts(counts)
        st["model_cross_entropy_bits"] += float(-np.dot(counts, np.log2(pmf)))
        if side.mode == MODE_FIT:
            st["shape_sum"] += side.shape
            st["fitted_tensors"] += 1
        if zz > 0:
            st["norm_ratio_sum"] += s_eff * math.sqrt(cc / zz)
            st["norm_ratio_count"] += 1
        st["scale_sum"] += s_eff
        st["quantized_tensors"] += 1
        st["sq_err"] += side.sigma**2 * max(zz - 2 * s_eff * zc + s_eff**2 * cc, 0.0)
        st["sq_in"] += sq_in  # Σv² from the moments of the nonzero entries (zeros add nothing)
        msg = Encoded(codec.spec, spec, payload)
        self._last = (msg, level_table(side.mu, level_scale, centers), idx)
        return msg

    def reconstruction(self, msg: Encoded) -> np.ndarray | None:
        """What ``M22Decoder`` returns for ``msg`` (flat float32), from the indices this encoder
        just chose: error feedback needs no second (entropy) decode of its own message."""
        last, self._last = self._last, None
        if last is None or last[0] is not msg:
            return None
        _, table, idx = last
        return table if idx is None else lookup(table, idx)

    def stats(self) -> dict[str, float]:
        st = self._stats
        n = st["entries"]
        if not n:
            return {}
        q = max(st["quantized_tensors"], 1.0)
        out = {
            "side_bits_per_entry": st["side_bits"] / n,
            "index_bits_per_entry": st["index_bits"] / n,
            "empirical_entropy_bits": st["empirical_entropy_bits"] / n,
            "model_cross_entropy_bits": st["model_cross_entropy_bits"] / n,
            "small_tensor_fraction": st["small_tensors"] / st["tensors"],
            "const_tensor_fraction": st["const_tensors"] / st["tensors"],
            "raw_packed_fraction": st["raw_tensors"] / q,
            "refits": st["refits"],
            "clamped_fit_fraction": st["clamped_fits"] / st["refits"] if st["refits"] else 0.0,
            "mean_shape": st["shape_sum"] / st["fitted_tensors"] if st["fitted_tensors"] else float("nan"),
            "mean_rescale_factor": st["scale_sum"] / q,
            "norm_ratio": st["norm_ratio_sum"] / st["norm_ratio_count"] if st["norm_ratio_count"] else 1.0,
            "zero_fraction": st["zero_fraction_sum"] / st["tensors"],
            "relative_sq_error": st["sq_err"] / st["sq_in"] if st["sq_in"] > 0 else 0.0,
            "rescale_" + self.codec.rescale: 1.0,
        }
        return out


_STAT_KEYS = (
    "tensors entries bits side_bits index_bits empirical_entropy_bits model_cross_entropy_bits "
    "small_tensors const_tensors raw_tensors refits shape_sum fitted_tensors scale_sum "
    "norm_ratio_sum norm_ratio_count quantized_tensors sq_err sq_in zero_fraction_sum clamped_fits"
).split()
_HEADER = struct.Struct("<B")


class M22Decoder(Decoder):
    """PS side: parse the side information, re-run the design, decode indices.

    Stateless between rounds: every payload carries (shape, mu, sigma)."""

    def __init__(self, codec: M22Codec):
        self.codec = codec

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        codec, spec, payload = self.codec, msg.spec, as_bytes(msg.payload)
        n = spec.numel
        if len(payload) < 1:
            raise CodecError(f"m22 payload for {spec.name!r} is empty")
        (head,) = _HEADER.unpack_from(payload)
        version, mode, raw = head >> 4, head & 0x03, bool(head & FLAG_RAW)
        if version != FORMAT_VERSION or head & 0x08:
            raise CodecError(f"m22 payload for {spec.name!r}: unknown format header 0x{head:02x}")
        if mode == MODE_CONST:
            expect_payload_size(payload, 5, spec, "m22")
            (mu,) = struct.unpack_from("<f", payload, 1)
            if not math.isfinite(mu):
                raise CodecError(f"m22 payload for {spec.name!r}: non-finite mean")
            return np.full(spec.shape, mu, dtype=np.float32)
        if mode not in (MODE_FIT, MODE_SMALL):
            raise CodecError(f"m22 payload for {spec.name!r}: unknown mode {mode}")
        nfloats = (1 if mode == MODE_FIT else 0) + 2
        offset = 1 + 4 * nfloats
        if len(payload) < offset:
            raise CodecError(f"m22 payload for {spec.name!r} is {len(payload)} bytes, shorter than its {offset}-byte header")
        floats = list(struct.unpack_from(f"<{nfloats}f", payload, 1))
        shape = floats.pop(0) if mode == MODE_FIT else codec.small_shape
        mu, level_scale = floats
        if not all(math.isfinite(v) for v in (shape, mu, level_scale)) or shape <= 0 or level_scale <= 0:
            raise CodecError(f"m22 payload for {spec.name!r}: invalid side information {(shape, mu, level_scale)}")
        thresholds, centers, pmf, code, _ = codec.tables(shape)
        body = payload[offset:]
        if raw:
            expect_payload_size(body, (n * codec.bits + 7) // 8, spec, "m22 raw-packed indices")
            idx = unpack_indices(body, codec.bits, n)
        else:
            idx = codec.entropy_decode(body, pmf, code, n, spec)
        if idx.size != n or (n and (idx.min() < 0 or idx.max() >= centers.size)):
            raise CodecError(f"m22 payload for {spec.name!r} decodes to invalid indices")
        return lookup(level_table(mu, level_scale, centers), idx).reshape(spec.shape)


@register
@dataclass(frozen=True)
class M22Codec(Codec):
    """M22 quantizer + model-driven entropy coding + error feedback. See the module docstring.

    Options: ``bits`` R (2^R cells, 1..8), ``M`` distortion exponent (real ≥ 0),
    ``dist`` (gennorm | dweibull), ``coder`` (ans | huffman | zstd), ``ef`` / ``gamma`` (error
    feedback and its decay γ), ``rescale`` (norm | ls | model | none, see the module
    docstring), ``refit`` (re-run the shape MLE every this many rounds; in between the
    kept shape is used, location and scale are re-estimated every round), ``min_fit``
    (tensors with fewer nonzero entries skip the fit and use ``small_shape``),
    ``max_samples`` (MLE subsample size).
    """

    name = "m22"

    bits: int = 2
    M: float = 2.0
    dist: str = "gennorm"
    coder: str = "ans"
    ef: bool = True
    gamma: float = 0.7
    rescale: str = "norm"
    refit: int = 1
    min_fit: int = 256
    small_shape: float = 1.0
    max_samples: int = 50_000

    def __post_init__(self) -> None:
        _clean_key(self.dist, 1.0, self.bits, self.M)  # validates dist, bits, M
        if self.coder not in CODERS:
            raise ValueError(f"coder must be one of {', '.join(CODERS)}, got {self.coder!r}")
        if self.rescale not in RESCALES:
            raise ValueError(f"rescale must be one of {', '.join(RESCALES)}, got {self.rescale!r}")
        if not (0.0 <= self.gamma <= 1.0):
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.refit < 1:
            raise ValueError(f"refit must be >= 1 round, got {self.refit}")
        if self.min_fit < 2:
            raise ValueError(f"min_fit must be >= 2 entries, got {self.min_fit}")
        if not (SHAPE_MIN <= self.small_shape <= SHAPE_MAX):
            raise ValueError(f"small_shape must be in [{SHAPE_MIN}, {SHAPE_MAX}], got {self.small_shape}")
        if self.max_samples < 100:
            raise ValueError(f"max_samples must be >= 100, got {self.max_samples}")

    def tables(self, shape: float):
        dist, shape, bits, M = _clean_key(self.dist, shape, self.bits, self.M)
        return _tables(dist, shape, bits, M, self.coder)

    def entropy_encode(self, idx: np.ndarray, pmf: np.ndarray, code) -> bytes:
        from gradwire.compressors import entropy

        if self.coder == "ans":
            return entropy.ans_encode(idx, pmf)
        if self.coder == "zstd":
            return entropy.zstd_encode(idx, 2**self.bits)
        return entropy.huffman_encode(idx, code)

    def entropy_decode(self, data: bytes, pmf: np.ndarray, code, count: int, spec: TensorSpec) -> np.ndarray:
        from gradwire.compressors import entropy

        try:
            if self.coder == "ans":
                out = entropy.ans_decode(data, pmf, count)
            elif self.coder == "zstd":
                out = entropy.zstd_decode(data, 2**self.bits, count)
            else:
                out = entropy.huffman_decode(data, code, count)
        except CodecError:
            raise
        except Exception as exc:  # the coder library's own error types
            raise CodecError(f"m22 {self.coder} stream for {spec.name!r} does not decode: {exc}") from None
        return np.asarray(out).reshape(-1)

    def make_encoder(self) -> Encoder:
        return maybe_error_feedback(M22Encoder(self), M22Decoder(self), self.ef, self.gamma)

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return M22Decoder(self)
