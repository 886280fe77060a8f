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
    check_input,
)
from gradwire.compressors.entropy import (
    ans_decode,
    ans_encode,
    entropy_from_counts,
    varint_decode,
    varint_encode,
)
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


def quantize(flat: np.ndarray, levels: int, bucket: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(float32 norms per bucket, signed int32 levels) of the QSGD stochastic quantizer.

    The probabilities use the float32 norm that is sent, so the estimate is
    unbiased with respect to what the PS multiplies by. float32 arithmetic (no
    float64 temporaries: memory traffic dominates on large tensors); the
    uniforms are float32 multiples of 2^-24, a bias below 6e-8 per level.
    """
    numel = flat.size
    starts = bucket_starts(numel, bucket)
    v64 = flat.astype(np.float64)  # float64 squares: no overflow or underflow for any float32
    sq = np.array([np.dot(v64, v64)]) if starts.size == 1 else np.add.reduceat(v64 * v64, starts)
    norms = np.minimum(np.sqrt(sq), FLOAT32_MAX).astype(np.float32)
    del v64
    x = np.abs(flat)
    x /= _per_entry(np.where(norms > 0, norms, np.float32(1)), numel, bucket)
    x *= np.float32(levels)
    np.minimum(x, np.float32(levels), out=x)  # float32 rounding of ν can push x a hair past s
    floor = np.floor(x)
    x -= floor
    mags = floor.astype(np.int32)
    mags += rng.random(numel, dtype=np.float32) < x
    np.negative(mags, out=mags, where=flat < 0)
    return norms, mags


def dequantize(norms: np.ndarray, signed: np.ndarray, levels: int, bucket: int) -> np.ndarray:
    steps = (norms.astype(np.float64) / levels).astype(np.float32)
    out = signed.astype(np.float32)
    out *= _per_entry(steps, signed.size, bucket)
    return out


# ---------------------------------------------------------------- payload


def encode_levels(signed: np.ndarray, levels: int, coder: str) -> tuple[int, bytes]:
    """(mode, bytes after the norms) for the signed levels."""
    mags = np.abs(signed)
    signs = np.packbits(signed[signed != 0] < 0).tobytes()
    width = level_width(levels)
    fixed_len = (mags.size * width + 7) // 8
    if coder == "fixed":
        return MODE_FIXED, pack_uint(mags, width) + signs
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
            mags = np.full(numel, present[0], dtype=np.int64)
        else:
            try:
                mags = ans_decode(stream, counts, numel)
            except CodecError as exc:
                raise CodecError(f"{where}: {exc}") from None
        # The histogram is sent anyway: it doubles as an integrity check of the stream.
        if not np.array_equal(np.bincount(mags, minlength=levels + 1), counts):
            raise CodecError(f"{where}: ANS stream does not match its level histogram")
    else:
        raise CodecError(f"{where}: unknown level code {mode}")
    sign_bits = np.unpackbits(np.frombuffer(sign_bytes, dtype=np.uint8))
    if sign_bits[nnz:].any():
        raise CodecError(f"{where}: nonzero padding bits after the signs")
    signed = mags.copy()
    nonzero = np.flatnonzero(mags)
    negative = sign_bits[:nnz].astype(bool)
    signed[nonzero[negative]] *= -1
    return signed


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

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        if flat.size == 0:
            return Encoded(self.codec.spec, spec, b"")
        c = self.codec
        norms, signed = quantize(flat, c.levels, c.bucket, ctx.rng(spec.name))
        mode, body = encode_levels(signed, c.levels, c.coder)
        payload = struct.pack("<B", mode) + norms.astype("<f4").tobytes() + body
        self._entries += flat.size
        self._nonzero += int(np.count_nonzero(signed))
        counts = np.bincount(signed + c.levels, minlength=2 * c.levels + 1)
        self._entropy_bits += flat.size * entropy_from_counts(counts)
        self._tensors += 1
        self._ans_tensors += int(mode == MODE_ANS)
        return Encoded(c.spec, spec, payload)

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
        spec, payload = msg.spec, msg.payload
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
        signed = decode_levels(payload, head, payload[0], numel, c.levels, where)
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
