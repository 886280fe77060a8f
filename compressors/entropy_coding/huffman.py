"""GenNorm-modelled entropy coding of uniformly quantized gradients: ``huffman`` and ``ans``.

Seed 001 (GenNorm modelling + fixed-to-variable Huffman coding of quantized
gradients), docs/algorithms.md §2; ``ans`` is the "beyond the paper" variant in which a
model drives an ANS coder (constriction) instead.

Per tensor and round:

1. Quantize to a uniform grid (``compressors.quantize.UniformQuantizer``):
   ``grid=midtread`` (2^bits − 1 levels kΔ with an exact zero, bits >= 2) or
   ``midrise`` (2^bits levels ±Δ/2, ±3Δ/2, ...); ``auto`` (default) is midtread
   from 2 bits up and midrise for 1 bit. ``clip`` sets the range:
   ``auto`` (default: the range that minimizes the quantizer's mean squared error
   under the fitted GenNorm, ``compressors.gennorm.optimal_uniform_clip``, computed
   from incomplete-gamma partial moments and cached on β rounded to 0.01), ``max``
   (outermost levels at ± the largest magnitude: nothing saturates) or a number
   k (outermost levels at ±k·σ̂, σ̂ the fitted GenNorm's standard deviation). The
   outermost levels never go beyond the largest magnitude; a degenerate fit
   (constant tensor) falls back to ``max``. ``rounding=nearest`` (default, biased,
   deterministic) or ``stochastic`` (unbiased inside the range, uniforms from
   ``ctx.rng(tensor name)``).
2. Model the symbols: ``model=gennorm`` fits (β, μ, α) by maximum likelihood on a
   subsample (``compressors.gennorm.fit_gennorm``) and takes each cell's
   probability from the GenNorm CDF (the paper's model). ``zgennorm`` (default for
   ``huffman``; zero-inflated GenNorm) also sends the fraction p0 of exactly-zero
   entries and fits the GenNorm to the nonzero ones: pmf = (1 − p0)·GenNorm cells +
   p0·[zero's cell]. ReLU networks have many exact zeros (6–23 % of the digits MLP's
   weight gradients), which drag a plain GenNorm fit to β → 0.1 and cost 5–15 %
   over the entropy; on data without zeros zgennorm is gennorm plus 4 bytes.
   ``normal`` fits (μ, σ). ``empirical`` (default for ``ans``) sends the symbol
   histogram itself (one varint per symbol), which keeps ANS within 1 % of the
   symbols' entropy where the parametric models miss by 1–2 % on real gradients.
   With clip=auto the range always comes from a GenNorm fit (of the nonzero
   entries for zgennorm, normal and empirical).
3. Entropy code with that pmf: ``huffman`` builds a deterministic canonical
   Huffman code from it (``compressors.entropy.huffman_code_lengths``), ``ans``
   drives constriction's ANS coder with it. The model parameters are sent as
   float32 and both ends derive the pmf, hence the code, from those values.
   ``huffman`` codes symbol pairs by default when bits <= 4 (``block=0``: auto;
   ``block=1`` singles, ``block=2`` pairs): the code is built from the product
   pmf p(a)p(b) of the same model, which halves Huffman's up-to-1-bit-per-codeword
   redundancy. Gradients at 4 bits often put >50 % of entries in the zero cell,
   where single-symbol Huffman pays 0.2–0.4 bit/symbol over the entropy; pairs
   bring that to ~0.1 (an odd count pairs its last symbol with symbol 0).

Payload layout (little-endian)::

    kind   u8        0 = coded, 1 = raw float16, 2 = raw float32
    coded: clip      f32   quantizer range c (0 for an all-zero tensor)
           model     gennorm: f32 β, μ, α | zgennorm: f32 p0, β, μ, α | normal: f32 μ, σ
                     empirical: one LEB128 varint count per symbol
           stream    compressors.entropy.huffman_encode / ans_encode output
                     (starts with a varint symbol count)
    raw:   values    numel × f16 or f32

The raw kinds are the small-tensor fallback: the encoder sends a raw payload when
it is strictly smaller than the coded one (float16 when the magnitudes suit it,
else float32), so a tiny bias never costs more than its raw bytes. Every byte is
in the payload and counted.

Biased with ``rounding=nearest`` (and with clipping), unbiased inside the range
with ``rounding=stochastic``. ``ef=1`` adds error feedback (``compressors.feedback``).

Statistics (encoder, accumulated since reset, over coded tensors):
``symbol_entropy_bits`` (empirical entropy of each tensor's symbols: the limit
for a memoryless coder, not a bit count), ``coded_bits_per_symbol`` (bytes of the
entropy stream, its count header and Huffman block table included, per symbol),
``model_cross_entropy_bits`` (what an ideal coder with the model pmf would take),
``huffman_model_bits_per_symbol`` / ``huffman_normal_bits_per_symbol`` /
``huffman_empirical_bits_per_symbol`` (codeword bits of a single-symbol Huffman
code built from the codec's model / a normal fit / the empirical histogram),
``side_info_bits_per_entry`` (every payload bit that is not the entropy stream, over
all entries), ``raw_fraction`` (share of entries sent raw) and ``beta_mean``.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import numpy as np

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
)
from gradwire.compressors.entropy import (
    ans_decode,
    ans_encode,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
    varint_encode,
)
from gradwire.compressors.entropy_coding.symbols import (
    FIT_SAMPLES,
    PMF_FLOOR,
    SymbolStats,
    begin_decode,
    f32,
    fit_model,
    normal_fit,
    read_header_float,
    read_model_pmf,
    smallest_payload,
)
from gradwire.compressors.feedback import maybe_error_feedback
from gradwire.compressors.gennorm import (
    gennorm_cell_pmf,
    gennorm_std,
    normal_cell_pmf,
    optimal_uniform_clip,
    subsample,
)
from gradwire.compressors.quantize import GRIDS, ROUNDINGS, UniformQuantizer, histogram, lookup
from gradwire.compressors.registry import register

KIND_CODED = 0
MODELS = ("gennorm", "zgennorm", "normal", "empirical")
MODEL_PARAMS = {"gennorm": 3, "zgennorm": 4, "normal": 2, "empirical": 0}


# ---------------------------------------------------------------- shared model logic


@dataclass(frozen=True)
class _Model:
    """What both ends know about one coded tensor: quantizer and model pmf."""

    quantizer: UniformQuantizer
    pmf: np.ndarray
    params: tuple[float, ...]  # as sent (float32 values) or the histogram


def _zero_mass(quantizer: UniformQuantizer, rounding: str) -> np.ndarray:
    """Where exact zeros land: one symbol, or two (midrise grid with stochastic rounding)."""
    mass = np.zeros(quantizer.alphabet_size)
    if quantizer.grid == "midrise" and rounding == "stochastic":
        half = quantizer.alphabet_size // 2
        mass[[half - 1, half]] = 0.5
    else:
        mass[int(quantizer.quantize(np.zeros(1, dtype=np.float32))[0])] = 1.0
    return mass


def _model_pmf(
    model: str, quantizer: UniformQuantizer, params: tuple[float, ...] | np.ndarray, rounding: str = "nearest"
) -> np.ndarray:
    """Symbol pmf under the model (both ends call this with the sent parameters)."""
    edges = quantizer.edges()
    if model == "gennorm":
        beta, mu, alpha = params
        return gennorm_cell_pmf(edges, beta, mu, alpha, PMF_FLOOR)
    if model == "zgennorm":
        p0, beta, mu, alpha = params
        if not 0.0 <= p0 <= 1.0:
            raise CodecError(f"zero fraction {p0} outside [0, 1]")
        p = (1.0 - p0) * gennorm_cell_pmf(edges, beta, mu, alpha, 0.0) + p0 * _zero_mass(quantizer, rounding)
        p = np.maximum(p, PMF_FLOOR)
        return p / p.sum()
    if model == "normal":
        mu, sigma = params
        return normal_cell_pmf(edges, mu, sigma, PMF_FLOOR)
    counts = np.asarray(params, dtype=np.float64)
    return counts / max(counts.sum(), 1.0)


@dataclass(frozen=True)
class Quantized:
    """One tensor after quantization: what the encoder then models and entropy codes."""

    quantizer: UniformQuantizer
    symbols: np.ndarray
    params: tuple[float, ...]  # model parameters as sent (float32 values); () for empirical
    gparams: tuple[float, float, float]  # the GenNorm (β, μ, α) behind the range (and the model)
    sample: np.ndarray  # the fitting subsample


@dataclass(frozen=True)
class _EntropyQuantCodec(Codec):
    """Shared implementation of ``huffman`` and ``ans`` (they differ only in the coder)."""

    coder = "huffman"
    bits: int = 4
    model: str = "zgennorm"
    rounding: str = "nearest"
    ef: bool = False
    clip: str = "auto"
    grid: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.grid not in ("auto", *GRIDS):
            raise ValueError(f"grid must be auto or one of {GRIDS}, got {self.grid!r}")
        if self.grid == "midtread" and self.bits < 2:
            raise ValueError("grid=midtread needs bits >= 2; use grid=midrise (or auto) for 1 bit")
        self.clip_mode()  # validates

    def clip_mode(self) -> tuple[str, float]:
        """("max", 0), ("auto", 0) or ("std", k) from the ``clip`` option."""
        if self.clip in ("max", "auto"):
            return self.clip, 0.0
        try:
            k = float(self.clip)
        except ValueError:
            raise ValueError(f"clip must be 'max', 'auto' or a positive number of standard deviations, got {self.clip!r}") from None
        if not (math.isfinite(k) and k > 0):
            raise ValueError(f"clip must be 'max', 'auto' or a positive number, got {self.clip!r}")
        return "std", k

    def quantizer_range(self, peak: float, gparams: tuple[float, float, float]) -> float:
        """The quantizer range c (sent) for a tensor with this peak and GenNorm fit (β, μ, α)."""
        # Range that puts the outermost levels at ±peak (midrise levels sit half a step inside).
        widen = 2**self.bits / (2**self.bits - 1) if self.grid_kind == "midrise" else 1.0
        full = peak * widen
        mode, k = self.clip_mode()
        beta, _, alpha = gparams
        if mode == "max" or alpha <= 0:  # a degenerate fit (constant tensor) falls back to max
            return full
        if mode == "std":
            return min(full, k * gennorm_std(beta, alpha) * widen)
        return min(full, optimal_uniform_clip(beta, alpha, self.bits, self.grid_kind))

    @property
    def alphabet_size(self) -> int:
        return 2**self.bits if self.grid_kind == "midrise" else 2**self.bits - 1

    @property
    def grid_kind(self) -> str:
        """The grid in use: ``auto`` is midtread from 2 bits up, midrise for 1 bit."""
        if self.grid == "auto":
            return "midtread" if self.bits >= 2 else "midrise"
        return self.grid

    def make_encoder(self) -> Encoder:
        return maybe_error_feedback(_Encoder(self), _Decoder(self), self.ef)

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return _Decoder(self)

    def quantize_tensor(self, flat: np.ndarray, rng: np.random.Generator | None = None) -> Quantized:
        """Steps 1–2 of the encoder (fit, range, quantize) for a finite, non-empty float32 vector."""
        sample = subsample(flat, FIT_SAMPLES)
        peak = float(max(flat.max(), -flat.min()))
        params: tuple[float, ...] = ()
        gparams = (2.0, 0.0, 0.0)
        if self.model != "empirical":
            params, gparams = fit_model(self.model, flat, sample)
        if self.clip != "max" and self.model in ("normal", "empirical"):
            _, gparams = fit_model("zgennorm", flat, sample)  # GenNorm of the nonzero entries
        quantizer = UniformQuantizer(self.bits, f32(self.quantizer_range(peak, gparams)), self.grid_kind)
        symbols = quantizer.quantize(flat, self.rounding, rng)
        return Quantized(quantizer, symbols, params, gparams, sample)

    # -- the entropy coder, by name
    def code_for(self, pmf: np.ndarray) -> np.ndarray | None:
        """Huffman code lengths (over symbol pairs when ``block_size`` is 2); None for ANS."""
        if self.coder != "huffman":
            return None
        return huffman_code_lengths(np.outer(pmf, pmf).ravel() if self.block_size == 2 else pmf)

    @property
    def block_size(self) -> int:
        """Symbols per Huffman codeword (1 for ANS)."""
        return 1

    def entropy_encode(self, symbols: np.ndarray, pmf: np.ndarray, lengths) -> bytes:
        if self.coder != "huffman":
            return ans_encode(symbols, pmf)
        if self.block_size == 2:
            n = pmf.size
            pairs = symbols[0::2].astype(np.int32) * n
            pairs[: symbols.size // 2] += symbols[1::2]  # an odd count pairs its last symbol with 0
            return huffman_encode(pairs, lengths)
        return huffman_encode(symbols, lengths)

    def entropy_decode(self, data: bytes, pmf: np.ndarray, lengths, count: int) -> np.ndarray:
        if self.coder != "huffman":
            return ans_decode(data, pmf, count)
        if self.block_size == 2:
            n = pmf.size
            pairs = huffman_decode(data, lengths, (count + 1) // 2)  # uint8 for up to 16 levels
            out = np.empty(2 * pairs.size, dtype=pairs.dtype)
            np.divmod(pairs, pairs.dtype.type(n), out=(out[0::2], out[1::2]))
            if count % 2 and out[-1] != 0:
                raise CodecError("Huffman pair stream pads an odd count with a nonzero symbol")
            return out[:count]
        return huffman_decode(data, lengths, count)


class _Encoder(Encoder):
    def __init__(self, codec: _EntropyQuantCodec):
        self.codec = codec
        self.acc = SymbolStats()
        self._last: tuple[Encoded, UniformQuantizer, np.ndarray] | None = None  # last coded message

    def reset(self) -> None:
        self.acc.reset()

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        c = self.codec
        self._last = None
        if flat.size == 0:
            return Encoded(c.spec, spec, b"")
        q = c.quantize_tensor(flat, ctx.rng(spec.name) if c.rounding == "stochastic" else None)
        quantizer, symbols, params, gparams, sample = q.quantizer, q.symbols, q.params, q.gparams, q.sample
        counts = histogram(symbols, quantizer.alphabet_size)
        if c.model == "empirical":
            head = varint_encode(counts)
            pmf = counts / counts.sum()
        else:
            head = np.asarray(params, dtype="<f4").tobytes()
            pmf = _model_pmf(c.model, quantizer, params, c.rounding)
        lengths = c.code_for(pmf)
        stream = c.entropy_encode(symbols, pmf, lengths)
        payload = smallest_payload(struct.pack("<Bf", KIND_CODED, quantizer.clip) + head + stream, flat)
        if payload[0] != KIND_CODED:
            self.acc.add_raw(flat.size, len(payload))
        else:
            self.acc.add_coded(
                counts, pmf, functools.partial(normal_fit(sample), quantizer.edges()), len(stream), len(payload),
                gparams[0] if c.model in ("gennorm", "zgennorm") else None,
                lengths if lengths is not None and lengths.size == counts.size else None,
            )
        msg = Encoded(c.spec, spec, payload)
        self._last = (msg, quantizer, symbols) if payload[0] == KIND_CODED else None
        return msg

    def reconstruction(self, msg: Encoded) -> np.ndarray | None:
        """The decoder's output for the last coded message, from the symbols the encoder chose."""
        last, self._last = self._last, None
        if last is None or last[0] is not msg:
            return None
        return lookup(last[1].levels(), last[2])

    def stats(self) -> dict[str, float]:
        return self.acc.as_dict()


class _Decoder(Decoder):
    def __init__(self, codec: _EntropyQuantCodec):
        self.codec = codec

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        c = self.codec
        spec, payload = msg.spec, as_bytes(msg.payload)
        numel = spec.numel
        where = f"{c.name} payload for {spec.name!r}"
        kind = begin_decode(payload, spec, where)
        if isinstance(kind, np.ndarray):
            return kind
        if kind != KIND_CODED:
            raise CodecError(f"{where}: unknown payload kind {kind}")
        clip = read_header_float(payload, where, "clip value")
        try:
            quantizer = UniformQuantizer(c.bits, clip, c.grid_kind)
        except ValueError as exc:
            raise CodecError(f"{where}: {exc}") from None
        pmf, counts, offset = read_model_pmf(
            payload, 5, MODEL_PARAMS[c.model], quantizer.alphabet_size, numel, where,
            lambda params: _model_pmf(c.model, quantizer, params, c.rounding),
        )
        lengths = c.code_for(pmf)
        symbols = c.entropy_decode(payload[offset:], pmf, lengths, numel)
        if counts is not None and not np.array_equal(histogram(symbols, counts.size), counts):
            raise CodecError(f"{where}: decoded symbols do not match the sent histogram")
        return quantizer.dequantize(symbols).reshape(spec.shape)


@register
@dataclass(frozen=True)
class HuffmanCodec(_EntropyQuantCodec):
    """Uniform quantizer + canonical Huffman code from a GenNorm fit (seed 001). Biased (nearest)."""

    name = "huffman"
    coder = "huffman"
    block: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block not in (0, 1, 2):
            raise ValueError(f"block must be 0 (auto), 1 or 2 symbols per codeword, got {self.block}")
        if self.block == 2 and self.bits > 4:
            raise ValueError("block=2 (pairs) needs bits <= 4 (at most 256 pairs)")

    @property
    def block_size(self) -> int:
        if self.block == 0:
            return 2 if self.bits <= 4 else 1
        return self.block


@register
@dataclass(frozen=True)
class ANSCodec(_EntropyQuantCodec):
    """Uniform quantizer + ANS (constriction) driven by the model pmf. Biased (nearest)."""

    name = "ans"
    coder = "ans"
    model: str = "empirical"
