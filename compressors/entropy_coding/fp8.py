"""8-bit floating-point gradients, optionally entropy coded: ``fp8``.

Seed 001 quantizes gradients to the 8-bit formats 1-4-3 and 1-5-2 before
Huffman coding them with a GenNorm model (docs/algorithms.md §2). Per tensor:

1. Scale: s = max|x| / F (F the format's largest finite value, 448 for 1-4-3
   = E4M3FN, 57344 for 1-5-2 = E5M2), rounded to float32.
2. Codes: x/s rounded to nearest-even in the format (subnormals kept; no
   NaN/Inf code and no negative zero is produced), ``compressors.quantize.fp8_quantize``.
3. ``coder=none`` (default): the 256 byte codes as they are (8 bits per entry).
   ``coder=zstd`` (opt-in): the byte codes through zstd level 1, no model
   (``compressors.entropy.zstd_encode``): about 0.1 bit per entry above ANS on
   gradients at 5-20x its speed (ANS decodes 256 symbols at ~40 MB/s of input).
   ``coder=huffman`` / ``ans``: the codes are entropy coded with a model pmf over
   the 256 codes. ``model=zgennorm`` (default) sends the fraction p0 of exact
   zeros and fits (β, μ, α) to the nonzero entries; ``gennorm`` (the paper's) fits
   all entries. Each code gets the model probability of its rounding cell (the
   interval of values that round to it), zeros going to code 0x00.
   ``model=empirical`` sends the code histogram instead. Whenever the coded
   payload would be larger than the plain codes, the plain codes are sent.

Payload layout (little-endian)::

    kind   u8        0 = plain codes, 3 = entropy coded, 1/2 = raw float16/float32
    plain: scale f32, then numel code bytes
    coded: scale f32, model (zgennorm: f32 p0, β, μ, α | gennorm: f32 β, μ, α |
           empirical: 256 LEB128 counts), then the huffman_encode / ans_encode stream;
           coder=zstd: scale f32, then the zstd_encode stream (no model)
    raw:   numel × f16 / f32 (small-tensor fallback, when strictly smaller)

Biased (round to nearest). ``ef=1`` adds error feedback. Statistics as for
``huffman`` (``compressors.entropy_coding.huffman.SymbolStats``).
"""

from __future__ import annotations

import functools
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
    zstd_decode,
    zstd_encode,
)
from gradwire.compressors.entropy_coding.symbols import (
    FIT_SAMPLES,
    KIND_RAW16,
    KIND_RAW32,
    PMF_FLOOR,
    SymbolStats,
    begin_decode,
    fit_model,
    normal_fit,
    read_header_float,
    read_model_pmf,
    smallest_payload,
)
from gradwire.compressors.feedback import maybe_error_feedback
from gradwire.compressors.gennorm import gennorm_cell_pmf, subsample
from gradwire.compressors.quantize import FP8_FORMATS, fp8_cell_edges, fp8_dequantize, fp8_quantize, histogram
from gradwire.compressors.registry import register

KIND_PLAIN = 0
KIND_CODED = 3
CODERS = ("none", "huffman", "ans", "zstd")
MODELS = ("zgennorm", "gennorm", "empirical")
MODEL_PARAMS = {"zgennorm": 4, "gennorm": 3}
ALPHABET = 256


def _code_pmf(fmt: str, scale: float, cell_pmf) -> np.ndarray:
    """pmf over the 256 byte codes from a pmf over the rounding cells (codes never produced: floor)."""
    codes, edges = fp8_cell_edges(fmt)
    pmf = np.full(ALPHABET, PMF_FLOOR)
    if scale > 0:
        pmf[codes] = cell_pmf(edges * scale)
    else:
        pmf[0] = 1.0  # all-zero tensor: every code is 0
    return pmf / pmf.sum()


def gennorm_code_pmf(fmt: str, scale: float, beta: float, mu: float, alpha: float) -> np.ndarray:
    """pmf over the codes when x ~ GenNorm(β, μ, α) and codes = fp8(x / scale)."""
    return _code_pmf(fmt, scale, lambda e: gennorm_cell_pmf(e, beta, mu, alpha, PMF_FLOOR))


def model_code_pmf(model: str, fmt: str, scale: float, params: tuple[float, ...]) -> np.ndarray:
    """pmf over the codes for ``gennorm`` (β, μ, α) or ``zgennorm`` (p0, β, μ, α) parameters."""
    if model == "gennorm":
        return gennorm_code_pmf(fmt, scale, *params)
    p0, beta, mu, alpha = params
    if not 0.0 <= p0 <= 1.0:
        raise CodecError(f"zero fraction {p0} outside [0, 1]")
    continuous = gennorm_code_pmf(fmt, scale, beta, mu, alpha)
    zero = np.zeros(ALPHABET)
    zero[0] = 1.0  # exact zeros are code 0x00 (negative zero is never produced)
    p = np.maximum((1.0 - p0) * continuous + p0 * zero, PMF_FLOOR)
    return p / p.sum()


@register
@dataclass(frozen=True)
class FP8Codec(Codec):
    """8-bit float (1-4-3 or 1-5-2) with a per-tensor scale, optionally Huffman/ANS coded."""

    name = "fp8"
    format: str = "143"
    coder: str = "none"
    model: str = "zgennorm"
    ef: bool = False

    def __post_init__(self) -> None:
        if self.format not in FP8_FORMATS:
            raise ValueError(f"format must be one of {FP8_FORMATS} (1-4-3 = E4M3FN, 1-5-2 = E5M2), got {self.format!r}")
        if self.coder not in CODERS:
            raise ValueError(f"coder must be one of {CODERS}, got {self.coder!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")

    def make_encoder(self) -> Encoder:
        return maybe_error_feedback(_FP8Encoder(self), _FP8Decoder(self), self.ef)

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return _FP8Decoder(self)


class _FP8Encoder(Encoder):
    def __init__(self, codec: FP8Codec):
        self.codec = codec
        self.acc = SymbolStats()

    def reset(self) -> None:
        self.acc.reset()

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        c = self.codec
        if flat.size == 0:
            return Encoded(c.spec, spec, b"")
        codes, scale = fp8_quantize(flat, c.format)
        s = float(scale)
        counts = histogram(codes, ALPHABET)
        sample = subsample(flat, FIT_SAMPLES)
        beta = None
        lengths = None
        if c.coder == "none":
            head, stream = struct.pack("<Bf", KIND_PLAIN, s), codes.tobytes()
            pmf = counts / counts.sum()
        elif c.coder == "zstd":  # no model: zstd learns the byte statistics itself
            head, stream = struct.pack("<Bf", KIND_CODED, s), zstd_encode(codes, ALPHABET)
            pmf = counts / counts.sum()
        else:
            if c.model in MODEL_PARAMS:
                params, gparams = fit_model(c.model, flat, sample)
                beta = gparams[0]
                pmf = model_code_pmf(c.model, c.format, s, params)
                model_bytes = np.asarray(params, dtype="<f4").tobytes()
            else:
                pmf = counts / counts.sum()
                model_bytes = varint_encode(counts)
            head = struct.pack("<Bf", KIND_CODED, s) + model_bytes
            if c.coder == "huffman":
                lengths = huffman_code_lengths(pmf)
                stream = huffman_encode(codes, lengths)
            else:
                stream = ans_encode(codes, pmf)
        if len(head) + len(stream) > 5 + flat.size:  # never worse than the plain codes
            head, stream = struct.pack("<Bf", KIND_PLAIN, s), codes.tobytes()
        payload = smallest_payload(head + stream, flat)
        if payload[0] in (KIND_RAW16, KIND_RAW32):
            self.acc.add_raw(flat.size, len(payload))
        else:
            normal = functools.partial(_code_pmf, c.format, s, normal_fit(sample))
            self.acc.add_coded(counts, pmf, normal, len(stream), len(payload), beta, lengths)
        return Encoded(c.spec, spec, payload)

    def stats(self) -> dict[str, float]:
        return self.acc.as_dict()


class _FP8Decoder(Decoder):
    def __init__(self, codec: FP8Codec):
        self.codec = codec

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        c = self.codec
        spec, payload = msg.spec, as_bytes(msg.payload)
        numel = spec.numel
        where = f"{c.name} payload for {spec.name!r}"
        kind = begin_decode(payload, spec, where)
        if isinstance(kind, np.ndarray):
            return kind
        if kind not in (KIND_PLAIN, KIND_CODED):
            raise CodecError(f"{where}: unknown payload kind {kind}")
        if kind == KIND_CODED and c.coder == "none":
            raise CodecError(f"{where}: entropy-coded payload (kind {kind}) but coder=none")
        scale = read_header_float(payload, where, "scale")
        if kind == KIND_PLAIN:
            if len(payload) != 5 + numel:
                raise CodecError(f"{where} is {len(payload)} bytes, expected {5 + numel}")
            codes = np.frombuffer(payload, dtype=np.uint8, offset=5)
        elif c.coder == "zstd":
            codes = zstd_decode(payload[5:], ALPHABET, numel)
        else:
            pmf, counts, offset = read_model_pmf(
                payload, 5, MODEL_PARAMS.get(c.model, 0), ALPHABET, numel, where,
                lambda params: model_code_pmf(c.model, c.format, scale, params),
            )
            data = payload[offset:]
            if c.coder == "huffman":
                codes = huffman_decode(data, huffman_code_lengths(pmf), numel)
            else:
                codes = ans_decode(data, pmf, numel)
            if counts is not None and not np.array_equal(histogram(codes, ALPHABET), counts):
                raise CodecError(f"{where}: decoded codes do not match the sent histogram")
        try:
            out = fp8_dequantize(codes, c.format, scale)
        except CodecError as exc:
            raise CodecError(f"{where}: {exc}") from None
        return out.reshape(spec.shape)
