"""What the entropy-coded quantizers share: fitted symbol models, payload preamble and raw
fallbacks, symbol statistics. Used by huffman/ans and fp8."""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable

import numpy as np

from gradwire.compressors.base import (
    CodecError,
    TensorSpec,
)
from gradwire.compressors.entropy import (
    entropy_from_counts,
    huffman_bits_from_counts,
    huffman_code_lengths,
    varint_decode,
)
from gradwire.compressors.gennorm import (
    fit_gennorm,
    fit_normal,
    normal_cell_pmf,
)

KIND_RAW16 = 1


KIND_RAW32 = 2


PMF_FLOOR = 1e-12


FLOAT16_MAX = 65504.0


FLOAT16_MIN_NORMAL = 2.0**-14


FIT_SAMPLES = 50_000


def f32(v: float) -> float:
    return float(np.float32(v))


def fit_model(model: str, flat: np.ndarray, sample: np.ndarray) -> tuple[tuple[float, ...], tuple[float, float, float]]:
    """(parameters as sent, float32-rounded; the GenNorm (β, μ, α) behind them) for a parametric model.

    ``zgennorm`` fits the GenNorm to the nonzero entries and sends the exact
    fraction of zeros p0 (computed over the whole tensor) in front.
    """
    if model == "zgennorm":
        nonzero = sample[sample != 0]
        g = tuple(f32(v) for v in fit_gennorm(nonzero, FIT_SAMPLES)) if nonzero.size else (2.0, 0.0, 0.0)
        p0 = f32(1.0 - np.count_nonzero(flat) / flat.size)
        return (p0, *g), g  # type: ignore[return-value]
    g = tuple(f32(v) for v in fit_gennorm(sample, FIT_SAMPLES))
    if model == "normal":
        return tuple(f32(v) for v in fit_normal(sample)), g  # type: ignore[return-value]
    return g, g  # type: ignore[return-value]


def smallest_payload(coded: bytes, flat: np.ndarray) -> bytes:
    """The coded payload, or a raw float16/float32 one when that is strictly smaller.

    float16 only when it suits the magnitudes (peak within [2^-14, 65504], or all
    zero); otherwise float32 (exact).
    """
    n = flat.size
    if len(coded) <= 1 + 2 * n:
        return coded
    peak = float(np.max(np.abs(flat))) if n else 0.0
    if peak <= FLOAT16_MAX and (peak >= FLOAT16_MIN_NORMAL or peak == 0.0):
        return struct.pack("<B", KIND_RAW16) + flat.astype("<f2").tobytes()
    if len(coded) > 1 + 4 * n:
        return struct.pack("<B", KIND_RAW32) + flat.astype("<f4").tobytes()
    return coded


class SymbolStats:
    """Statistics of entropy-coded symbols, accumulated over tensors and rounds (see module doc).

    The three Huffman diagnostics of a coded tensor (codes built from the model pmf, a normal fit and
    the histogram) cost more CPU than coding the tensor: three code constructions, ~1–2 ms per
    LeNet-5 update at 63 symbols. They are not needed to encode, so ``add_coded`` keeps what they need
    (histogram, pmfs; at most ``PENDING_LIMIT`` tensors, ~8 KB each at 256 symbols) and ``as_dict``
    computes them: off the round's critical path in runs of up to that many coded tensors, and never
    more work than before in longer ones. The figures are the same either way.
    """

    PENDING_LIMIT = 2048

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.entries = 0
        self.raw_entries = 0
        self.symbols = 0
        self.entropy = 0.0
        self.stream_bits = 0
        self.cross = 0.0
        self.h_model = 0
        self.h_normal = 0
        self.h_emp = 0
        self.side_bits = 0
        self.beta_sum = 0.0
        self.fits = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray | Callable[[], np.ndarray], np.ndarray | None]] = []

    def add_raw(self, numel: int, payload_len: int) -> None:
        self.entries += numel
        self.raw_entries += numel
        self.side_bits += 8  # the kind byte; the values themselves are the message

    def add_coded(
        self,
        counts: np.ndarray,
        pmf: np.ndarray,
        normal_pmf: np.ndarray | Callable[[], np.ndarray],
        stream_len: int,
        payload_len: int,
        beta: float | None,
        model_lengths: np.ndarray | None = None,
    ) -> None:
        """One coded tensor: symbol histogram, the model pmf that coded it, a normal-fit pmf (or a
        function computing it when the statistics are read)."""
        n = int(counts.sum())
        h = entropy_from_counts(counts)
        self.entries += n
        self.symbols += n
        self.entropy += n * h
        self.stream_bits += 8 * stream_len
        self.side_bits += 8 * (payload_len - stream_len)
        present = counts > 0
        self.cross += float(-(counts[present] * np.log2(pmf[present])).sum())
        if beta is not None:
            self.beta_sum += beta
            self.fits += 1
        self._pending.append((counts, pmf, normal_pmf, model_lengths))
        if len(self._pending) >= self.PENDING_LIMIT:
            self._settle()

    def _settle(self) -> None:
        """The Huffman diagnostics of the tensors added since the last call."""
        for counts, pmf, normal_pmf, model_lengths in self._pending:
            n = int(counts.sum())
            if model_lengths is None:
                model_lengths = huffman_code_lengths(pmf)
            normal = normal_pmf() if callable(normal_pmf) else normal_pmf
            self.h_model += huffman_bits_from_counts(counts, model_lengths)
            self.h_normal += huffman_bits_from_counts(counts, huffman_code_lengths(normal))
            self.h_emp += huffman_bits_from_counts(counts, huffman_code_lengths(counts / max(n, 1)))
        self._pending.clear()

    def as_dict(self) -> dict[str, float]:
        self._settle()
        out: dict[str, float] = {}
        if self.entries:
            out["side_info_bits_per_entry"] = self.side_bits / self.entries
            out["raw_fraction"] = self.raw_entries / self.entries
        if self.symbols:
            n = self.symbols
            out.update(
                symbol_entropy_bits=self.entropy / n,
                coded_bits_per_symbol=self.stream_bits / n,
                model_cross_entropy_bits=self.cross / n,
                huffman_model_bits_per_symbol=self.h_model / n,
                huffman_normal_bits_per_symbol=self.h_normal / n,
                huffman_empirical_bits_per_symbol=self.h_emp / n,
            )
        if self.fits:
            out["beta_mean"] = self.beta_sum / self.fits
        return out


def normal_fit(sample: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """For statistics: the cell pmf (a function of the edges) of a normal fitted to ``sample`` now, with
    float32-rounded parameters. It holds two floats, not the sample, so ``SymbolStats`` can keep it
    until the statistics are read."""
    mu, sigma = fit_normal(sample)
    return functools.partial(_normal_cells, mu=f32(mu), sigma=f32(sigma))


def _normal_cells(edges: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return normal_cell_pmf(edges, mu, sigma, PMF_FLOOR)


def begin_decode(payload: bytes, spec: TensorSpec, where: str) -> np.ndarray | int:
    """The start every quantizer payload shares: the decoded array when the
    payload is complete on its own (empty tensor, raw fallback), else its kind byte."""
    if spec.numel == 0:
        if payload:
            raise CodecError(f"{where}: {len(payload)} bytes for an empty tensor")
        return np.zeros(spec.shape, dtype=np.float32)
    if not payload:
        raise CodecError(f"{where} is empty")
    kind = payload[0]
    if kind in (KIND_RAW16, KIND_RAW32):
        return decode_raw(payload, spec, where)
    return kind


def read_header_float(payload: bytes, where: str, what: str) -> float:
    """The float32 after the kind byte (range or scale): finite and non-negative."""
    if len(payload) < 5:
        raise CodecError(f"{where}: payload too short for its header")
    (value,) = struct.unpack_from("<f", payload, 1)
    if not (math.isfinite(value) and value >= 0):
        raise CodecError(f"{where}: invalid {what} {value}")
    return value


def read_model_pmf(
    payload: bytes, offset: int, nparams: int, alphabet: int, numel: int, where: str, pmf_from_params
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(pmf, sent histogram or None, offset after them): ``nparams`` float32 model
    parameters turned into a pmf by ``pmf_from_params``, or, with no parameters, a
    histogram of ``alphabet`` counts that must sum to ``numel``."""
    if nparams:
        if len(payload) < offset + 4 * nparams:
            raise CodecError(f"{where}: payload too short for the model parameters")
        params = tuple(float(v) for v in np.frombuffer(payload, dtype="<f4", count=nparams, offset=offset))
        try:
            pmf = pmf_from_params(params)
        except (CodecError, ValueError) as exc:
            raise CodecError(f"{where}: bad model parameters {params}: {exc}") from None
        return pmf, None, offset + 4 * nparams
    counts, offset = varint_decode(payload, offset, alphabet, where, "symbol histogram")
    if int(counts.sum()) != numel:
        raise CodecError(f"{where}: histogram sums to {int(counts.sum())}, tensor has {numel}")
    return counts / numel, counts, offset


def decode_raw(payload: bytes, spec: TensorSpec, where: str) -> np.ndarray:
    """Decode a raw-fallback payload (kind byte KIND_RAW16 or KIND_RAW32)."""
    width = 2 if payload[0] == KIND_RAW16 else 4
    numel = spec.numel
    if len(payload) != 1 + width * numel:
        raise CodecError(f"{where}: raw payload is {len(payload)} bytes, expected {1 + width * numel}")
    out = np.frombuffer(payload, dtype="<f2" if width == 2 else "<f4", offset=1).astype(np.float32)
    if not np.isfinite(out).all():
        raise CodecError(f"{where}: raw values contain NaN or Inf")
    return out.reshape(spec.shape)
