"""QSGD: unbiased stochastic quantization with entropy-coded levels (``qsgd``).

Alistarh et al., 2017, "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding". Per tensor (or per bucket of ``bucket`` consecutive
entries), with ``s = levels`` and ``ν = ||v||₂`` (float32, as sent)::

    x_i = s·|v_i|/ν;   ℓ_i = floor(x_i) + [u_i < x_i − floor(x_i)],  u_i ~ U[0, 1)
    decoded_i = sign(v_i) · ν · ℓ_i / s

so ``E[decoded] = v`` (**unbiased**) with ``Var[decoded_i] ≤ (ν/s)²/4``. The
uniforms ``u`` come from ``ctx.rng(spec.name)``, so runs are reproducible (the PS
does not need them). No error feedback.

The signed levels are sent as sign–magnitude: magnitudes ``ℓ_i ∈ [0, s]`` for
every entry, one sign bit per *nonzero* level. Per tensor, the cheaper of two
magnitude codes is used and flagged in the header (``coder=auto``, default):

* **fixed**: ``w = ceil(log2(s + 1))`` bits per magnitude, bit-packed;
* **ANS**: the empirical histogram of the magnitudes (``s + 1`` counts as LEB128
  varints: the side information that makes the code exact) and the magnitudes
  ANS-coded with that histogram as the model (``compressors.entropy.ans_encode``,
  constriction; no stream when a single magnitude occurs). This is the practical stand-in for the paper's Elias coding:
  it lands within ~0.01 bit of the empirical entropy plus the table.

Payload layout (little-endian)::

    mode    u8            0 = fixed-width magnitudes, 1 = ANS
    norms   nb × float32  one per bucket (nb = 1 when bucket = 0)
    fixed:  magnitudes    ceil(d·w/8) bytes, w bits each, MSB first
            signs         ceil(nnz/8) bytes, np.packbits(level < 0) over nonzero levels
    ANS:    counts        s + 1 LEB128 varints, summing to d
            signs         ceil(nnz/8) bytes (nnz = d − counts[0])
            magnitudes    ANS words (u32) to the end of the payload

An empty tensor has an empty payload. Options: ``levels`` (s, default 16),
``bucket`` (entries per norm, 0 = whole tensor; default 0), ``coder``
(``auto``, ``ans`` or ``fixed``).
"""

from __future__ import annotations

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
    entropy_from_counts,
    varint_decode,
    varint_encode,
)
from gradwire.compressors.quantize import histogram, lookup
from gradwire.compressors.registry import register

MODE_FIXED = 0
MODE_ANS = 1
MAX_LEVELS = 2**16 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
CODERS = ("auto", "ans", "fixed")


# ---------------------------------------------------------------- bit helpers


def _uint_container(width: int) -> np.dtype:
    return np.dtype(np.uint8) if width <= 8 else np.dtype(">u2") if width <= 16 else np.dtype(">u4")


def pack_uint(values: np.ndarray, width: int) -> bytes:
    """Non-negative integers < 2^width, ``width`` bits each, MSB first, zero-padded to a byte."""
    if width == 0 or values.size == 0:
        return b""
    container = _uint_container(width)
    raw = values.astype(container).view(np.uint8).reshape(values.size, container.itemsize)
    bits = np.unpackbits(raw, axis=1)[:, 8 * container.itemsize - width :]
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_uint(data: bytes, width: int, count: int, where: str) -> np.ndarray:
    """Inverse of ``pack_uint``; padding bits must be zero."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[count * width :].any():
        raise CodecError(f"{where}: nonzero padding bits after the magnitudes")
    container = _uint_container(width)
    full = np.zeros((count, 8 * container.itemsize), dtype=np.uint8)
    full[:, 8 * container.itemsize - width :] = bits[: count * width].reshape(count, width)
    return np.packbits(full, axis=1).view(container).reshape(count).astype(np.int64)


def level_width(levels: int) -> int:
    """Bits of a fixed-width magnitude in [0, levels]."""
    return max(1, int(levels).bit_length())


def bucket_starts(numel: int, bucket: int) -> np.ndarray:
    return np.arange(0, numel, bucket if bucket else max(numel, 1), dtype=np.int64)


# ---------------------------------------------------------------- quantizer


def _per_entry(values: np.ndarray, numel: int, bucket: int) -> np.ndarray:
    """A per-bucket value (scalar when there is one bucket) broadcastable over the entries."""
    if values.size == 1:
        return values[0]
    return np.repeat(values, np.diff(np.append(bucket_starts(numel, bucket), numel)))


_CHUNK = 1 << 16  # entries per float64 chunk of the norm (cache-sized temporaries)


def _magnitude_dtype(levels: int) -> type[np.unsignedinteger]:
    return np.uint8 if levels <= 255 else np.uint16 if levels <= 65535 else np.uint32


def _sum_of_squares(flat: np.ndarray) -> float:
    """Σ v² in float64 (no overflow or underflow for any float32), chunk by chunk."""
    total = 0.0
    for start in range(0, flat.size, _CHUNK):
        v = flat[start : start + _CHUNK].astype(np.float64)
        total += float(np.dot(v, v))
    return total


def quantize(flat: np.ndarray, levels: int, bucket: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(float32 norms per bucket, signed int32 levels) of the QSGD stochastic quantizer."""
    norms, mags, negative = quantize_magnitudes(flat, levels, bucket, rng)
    signed = mags.astype(np.int32)
    np.negative(signed, out=signed, where=negative)
    return norms, signed


def quantize_magnitudes(
    flat: np.ndarray, levels: int, bucket: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 norms per bucket, magnitudes in the smallest unsigned dtype, sign mask v < 0).

    The probabilities use the float32 norm that is sent, so the estimate is
    unbiased with respect to what the PS multiplies by. float32 arithmetic (no
    float64 temporaries: memory traffic dominates on large tensors); the
    uniforms are float32 multiples of 2^-24, a bias below 6e-8 per level.
    """
    numel = flat.size
    starts = bucket_starts(numel, bucket)
    if starts.size == 1:
        sq = np.array([_sum_of_squares(flat)])
    else:
        v64 = flat.astype(np.float64)
        sq = np.add.reduceat(v64 * v64, starts)
        del v64
    norms = np.minimum(np.sqrt(sq), FLOAT32_MAX).astype(np.float32)
    x = np.abs(flat)
    x /= _per_entry(np.where(norms > 0, norms, np.float32(1)), numel, bucket)
    x *= np.float32(levels)
    np.minimum(x, np.float32(levels), out=x)  # float32 rounding of ν can push x a hair past s
    floor = np.floor(x)
    x -= floor
    mags = floor.astype(_magnitude_dtype(levels))
    del floor
    mags += rng.random(numel, dtype=np.float32) < x
    return norms, mags, flat < 0


def dequantize(norms: np.ndarray, signed: np.ndarray, levels: int, bucket: int) -> np.ndarray:
    steps = (norms.astype(np.float64) / levels).astype(np.float32)
    out = signed.astype(np.float32)
    out *= _per_entry(steps, signed.size, bucket)
    return out


# ---------------------------------------------------------------- payload


def encode_levels(signed: np.ndarray, levels: int, coder: str) -> tuple[int, bytes]:
    """(mode, bytes after the norms) for the signed levels."""
    mags = np.abs(signed)
    return encode_magnitudes(mags, signed < 0, levels, coder)


def encode_magnitudes(
    mags: np.ndarray, negative: np.ndarray, levels: int, coder: str, counts: np.ndarray | None = None
) -> tuple[int, bytes]:
    """(mode, bytes after the norms) for magnitudes and their sign mask (``counts``: their histogram)."""
    signs = np.packbits(negative[mags != 0]).tobytes()
    width = level_width(levels)
    fixed_len = (mags.size * width + 7) // 8
    if coder == "fixed":
        return MODE_FIXED, pack_uint(mags, width) + signs
    if counts is None:
        counts = np.bincount(mags, minlength=levels + 1)
    table = varint_encode(counts)
    if coder == "auto":
        # The ANS stream is never shorter than the entropy: skip it when that cannot win.
        bound = len(table) + math.ceil(mags.size * entropy_from_counts(counts) / 8)
        if bound >= fixed_len:
            return MODE_FIXED, pack_uint(mags, width) + signs
    # A histogram with a single symbol determines every magnitude: no ANS stream at all.
    stream = ans_encode(mags, counts) if np.count_nonzero(counts) > 1 else b""
    if coder == "auto" and len(table) + len(stream) >= fixed_len:
        return MODE_FIXED, pack_uint(mags, width) + signs
    return MODE_ANS, table + signs + stream


def decode_levels(payload: bytes, offset: int, mode: int, numel: int, levels: int, where: str) -> np.ndarray:
    """Signed levels (int64) of a payload."""
    mags, sign_bytes, nnz = _decode_magnitudes(payload, offset, mode, numel, levels, where)
    mags, negative_at = decode_magnitudes_and_signs(mags, sign_bytes, nnz, where)
    signed = mags.astype(np.int64)
    signed[negative_at] *= -1
    return signed


def _decode_magnitudes(
    payload: bytes, offset: int, mode: int, numel: int, levels: int, where: str
) -> tuple[np.ndarray, bytes, int]:
    """(magnitudes, sign bytes, nonzero count) of a payload, checked against its histogram."""
    width = level_width(levels)
    if mode == MODE_FIXED:
        mag_len = (numel * width + 7) // 8
        if len(payload) < offset + mag_len:
            raise CodecError(f"{where}: payload ends inside the magnitudes")
        mags = unpack_uint(payload[offset : offset + mag_len], width, numel, where)
        if int(mags.max()) > levels:
            raise CodecError(f"{where}: magnitude {int(mags.max())} exceeds levels={levels}")
        offset += mag_len
        nnz = int(np.count_nonzero(mags))
        sign_len = (nnz + 7) // 8
        if len(payload) != offset + sign_len:
            raise CodecError(f"{where} is {len(payload)} bytes, expected {offset + sign_len}")
        sign_bytes = payload[offset:]
    elif mode == MODE_ANS:
        counts, offset = varint_decode(payload, offset, levels + 1, where)
        if int(counts.sum()) != numel:
            raise CodecError(f"{where}: level histogram sums to {int(counts.sum())}, tensor has {numel}")
        nnz = numel - int(counts[0])
        sign_len = (nnz + 7) // 8
        if len(payload) < offset + sign_len:
            raise CodecError(f"{where}: payload ends inside the sign bits")
        sign_bytes = payload[offset : offset + sign_len]
        stream = payload[offset + sign_len :]
        present = np.flatnonzero(counts)
        if present.size == 1:
            if stream:
                raise CodecError(f"{where}: {len(stream)} ANS bytes after a single-symbol histogram")
            mags = np.full(numel, present[0], dtype=_magnitude_dtype(levels))
        else:
            try:
                mags = ans_decode(stream, counts, numel)
            except CodecError as exc:
                raise CodecError(f"{where}: {exc}") from None
        # The histogram is sent anyway: it doubles as an integrity check of the stream.
        if not np.array_equal(histogram(mags, levels + 1), counts):
            raise CodecError(f"{where}: ANS stream does not match its level histogram")
    else:
        raise CodecError(f"{where}: unknown level code {mode}")
    return mags, sign_bytes, nnz


def decode_magnitudes_and_signs(
    mags: np.ndarray, sign_bytes: bytes, nnz: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(magnitudes, positions of the negative entries) from the magnitudes and the sign bits."""
    sign_bits = np.unpackbits(np.frombuffer(sign_bytes, dtype=np.uint8))
    if sign_bits[nnz:].any():
        raise CodecError(f"{where}: nonzero padding bits after the signs")
    nonzero = np.flatnonzero(mags)
    return mags, nonzero[sign_bits[:nnz].view(bool)]


class QSGDEncoder(Encoder):
    def __init__(self, codec: QSGDCodec):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self._entries = 0
        self._nonzero = 0
        self._entropy_bits = 0.0
        self._tensors = 0
        self._ans_tensors = 0
        self._last: tuple[Encoded, np.ndarray, np.ndarray, np.ndarray] | None = None  # msg, norms, mags, negative

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        self._last = None
        if flat.size == 0:
            return Encoded(self.codec.spec, spec, b"")
        c = self.codec
        norms, mags, negative = quantize_magnitudes(flat, c.levels, c.bucket, ctx.rng(spec.name))
        counts = histogram(mags, c.levels + 1)
        mode, body = encode_magnitudes(mags, negative, c.levels, c.coder, counts)
        payload = struct.pack("<B", mode) + norms.astype("<f4").tobytes() + body
        self._entries += flat.size
        nnz = flat.size - int(counts[0])
        self._nonzero += nnz
        # Histogram of the signed levels: the magnitudes' one, split by sign over the nonzero entries.
        sent = mags != 0
        negative_counts = np.bincount(mags[sent & negative], minlength=c.levels + 1)
        signed_counts = np.concatenate([negative_counts[1:], counts[:1], counts[1:] - negative_counts[1:]])
        self._entropy_bits += flat.size * entropy_from_counts(signed_counts)
        self._tensors += 1
        self._ans_tensors += int(mode == MODE_ANS)
        msg = Encoded(c.spec, spec, payload)
        self._last = (msg, norms, mags, negative)
        return msg

    def reconstruction(self, msg: Encoded) -> np.ndarray | None:
        """The decoder's output for the last message, from the levels the encoder chose (same arithmetic)."""
        last, self._last = self._last, None
        if last is None or last[0] is not msg:
            return None
        _, norms, mags, negative = last
        levels = self.codec.levels
        negative_at = np.flatnonzero(negative & (mags != 0))  # the decoder's sign bits: nonzero levels only
        if norms.size == 1:
            step = (norms.astype(np.float64) / levels).astype(np.float32)
            out = lookup(np.arange(levels + 1, dtype=np.float32) * step, mags)
            out[negative_at] = -out[negative_at]
            return out
        signed = mags.astype(np.int64)
        signed[negative_at] *= -1
        return dequantize(norms, signed, levels, self.codec.bucket)

    def stats(self) -> dict[str, float]:
        if not self._entries:
            return {}
        return {
            "nonzero_fraction": self._nonzero / self._entries,
            # Empirical entropy of the signed levels: the limit of any level code, not a bit count.
            "level_entropy_bits_per_entry": self._entropy_bits / self._entries,
            "ans_fraction": self._ans_tensors / self._tensors,
        }


class QSGDDecoder(Decoder):
    def __init__(self, codec: QSGDCodec):
        self.codec = codec

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        spec, payload = msg.spec, as_bytes(msg.payload)
        c = self.codec
        numel = spec.numel
        where = f"{c.name} payload for {spec.name!r}"
        if numel == 0:
            if payload:
                raise CodecError(f"{where}: {len(payload)} bytes for an empty tensor")
            return np.zeros(spec.shape, dtype=np.float32)
        nb = bucket_starts(numel, c.bucket).size
        head = 1 + 4 * nb
        if len(payload) < head:
            raise CodecError(f"{where} is {len(payload)} bytes, shorter than its {head}-byte header")
        norms = np.frombuffer(payload, dtype="<f4", count=nb, offset=1)
        if not (np.isfinite(norms).all() and (norms >= 0).all()):
            raise CodecError(f"{where}: norms must be finite and >= 0")
        mags, sign_bytes, nnz = _decode_magnitudes(payload, head, payload[0], numel, c.levels, where)
        mags, negative_at = decode_magnitudes_and_signs(mags, sign_bytes, nnz, where)
        if nb == 1:  # one step: a table of level values, then the signs (exact: -(k·step) = (-k)·step)
            step = (norms.astype(np.float64) / c.levels).astype(np.float32)
            out = lookup(np.arange(c.levels + 1, dtype=np.float32) * step, mags)
            out[negative_at] = -out[negative_at]
            return out.reshape(spec.shape)
        signed = mags.astype(np.int64)
        signed[negative_at] *= -1
        return dequantize(norms, signed, c.levels, c.bucket).reshape(spec.shape)


@register
@dataclass(frozen=True)
class QSGDCodec(Codec):
    """QSGD stochastic rounding to ``levels`` levels, levels entropy coded. Unbiased."""

    name = "qsgd"
    levels: int = 16
    bucket: int = 0
    coder: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.levels <= MAX_LEVELS:
            raise ValueError(f"levels must be in 1..{MAX_LEVELS}, got {self.levels}")
        if self.bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0 = whole tensor), got {self.bucket}")
        if self.coder not in CODERS:
            raise ValueError(f"coder must be one of {CODERS}, got {self.coder!r}")

    def make_encoder(self) -> Encoder:
        return QSGDEncoder(self)

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return QSGDDecoder(self)
