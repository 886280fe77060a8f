"""Sparse tensors on the wire: index coding (Rice-coded gaps or a bitmap) and value coding.

A shared layer: top-k, random-k and LGC's innovation all send (indices, values) this way."""

from __future__ import annotations

import math
import struct

import numpy as np
from scipy.special import gammaln

from gradwire.compressors.base import (
    CodecError,
    TensorSpec,
)

INDEX_RICE = 0


INDEX_BITMAP = 1


INDEX_MASK = 0x03


FLAG_FP16 = 0x04


HEADER = struct.Struct("<BI")  # flags, count


MAX_RICE_BITS = 32


# Wire dtypes of the value options.
VALUE_DTYPES: dict[str, np.dtype] = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2")}


FP16_MAX = float(np.finfo(np.float16).max)


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")


def sparse_count(numel: int, ratio: float) -> int:
    """k = max(1, round(ratio · numel)), at most numel (0 for an empty tensor)."""
    if numel == 0:
        return 0
    return int(min(numel, max(1, round(ratio * numel))))


def check_value_kind(kind: str) -> None:
    if kind not in VALUE_DTYPES:
        raise ValueError(f"values must be one of {sorted(VALUE_DTYPES)}, got {kind!r}")


def quantize_values(values: np.ndarray, kind: str) -> np.ndarray:
    """Values as they go on the wire (float16 saturates at ±65504)."""
    if kind == "fp16":
        return np.clip(values, -FP16_MAX, FP16_MAX).astype("<f2")
    return values.astype("<f4", copy=False)


def unpack_values(payload: bytes, offset: int, count: int, kind: str, where: str) -> np.ndarray:
    dtype = VALUE_DTYPES[kind]
    end = offset + count * dtype.itemsize
    if end > len(payload):
        raise CodecError(f"{where}: payload ends inside the values ({len(payload)} < {end} bytes)")
    values = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).astype(np.float32)
    if not np.isfinite(values).all():
        raise CodecError(f"{where}: values contain NaN or Inf")
    return values


def rice_bits(gaps: np.ndarray, b: int) -> int:
    """Exact size in bits of the Rice code of ``gaps`` with ``b`` low bits."""
    return int(gaps.size * (b + 1) + int(np.sum(gaps >> b, dtype=np.int64)))


def best_rice_parameter(gaps: np.ndarray) -> int:
    """The ``b`` in 0..32 minimising the exact Rice size (searched near log2 of the mean gap)."""
    if gaps.size == 0:
        return 0
    mean = float(gaps.mean())
    centre = int(math.floor(math.log2(mean + 1.0)))
    candidates = range(max(0, centre - 2), min(MAX_RICE_BITS, centre + 2) + 1)
    return min(candidates, key=lambda b: (rice_bits(gaps, b), b))


def rice_encode(gaps: np.ndarray, b: int) -> tuple[bytes, bytes]:
    """(low-bit stream, unary stream) of the Rice code of non-negative ``gaps``."""
    gaps = gaps.astype(np.int64, copy=False)
    if gaps.size == 0:
        return b"", b""
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        low = ((gaps[:, None] >> shifts) & 1).astype(np.uint8)
        low_bytes = np.packbits(low.reshape(-1)).tobytes()
    else:
        low_bytes = b""
    ones = np.cumsum((gaps >> b) + 1) - 1
    unary = np.zeros(int(ones[-1]) + 1, dtype=np.uint8)
    unary[ones] = 1
    return low_bytes, np.packbits(unary).tobytes()


def rice_decode(low_bytes: bytes | memoryview, unary_bytes: bytes | memoryview, count: int, b: int, limit: int, where: str) -> np.ndarray:
    """Gaps from the two Rice streams; every gap must be < ``limit``.

    ``count`` gaps that fit in ``limit`` entries sum to at most ``limit - count``, so the
    unary stream holds at most ``count + ((limit - count) >> b)`` bits: a longer stream is
    refused before it is unpacked (8 bytes of work per stream byte, and an int64 per set bit).
    """
    max_unary_bytes = (count + (max(0, limit - count) >> b) + 7) // 8
    if len(unary_bytes) > max_unary_bytes:
        raise CodecError(
            f"{where}: unary stream of {len(unary_bytes)} bytes; {count} gaps within {limit} entries "
            f"need at most {max_unary_bytes}"
        )
    bits = np.unpackbits(np.frombuffer(unary_bytes, dtype=np.uint8))
    ones = np.flatnonzero(bits)
    if ones.size != count:
        raise CodecError(f"{where}: unary stream holds {ones.size} codes, header says {count}")
    if len(unary_bytes) != int(ones[-1]) // 8 + 1:
        raise CodecError(f"{where}: unary stream has trailing bytes")
    high = np.diff(ones, prepend=-1) - 1
    if int(high.max()) > (limit >> b):
        raise CodecError(f"{where}: index gap out of range")
    gaps = high.astype(np.int64) << b
    if b:
        low_bits = np.unpackbits(np.frombuffer(low_bytes, dtype=np.uint8))
        if low_bits[count * b :].any():
            raise CodecError(f"{where}: nonzero padding bits in the low-bit stream")
        weights = np.int64(1) << np.arange(b - 1, -1, -1, dtype=np.int64)
        gaps |= low_bits[: count * b].reshape(count, b).astype(np.int64) @ weights
    if int(gaps.max()) >= limit:
        raise CodecError(f"{where}: index gap out of range")
    return gaps


def encode_indices(indices: np.ndarray, numel: int) -> tuple[int, bytes, bytes, int]:
    """Pick the cheaper index code: (mode, head, tail, index_bits).

    ``head`` goes before the values (the Rice parameter), ``tail`` after them.
    """
    bitmap_bytes = (numel + 7) // 8
    gaps = np.diff(indices, prepend=-1) - 1
    b = best_rice_parameter(gaps)
    rice_bytes = 1 + (gaps.size * b + 7) // 8 + (rice_bits(gaps, b) - gaps.size * b + 7) // 8
    if bitmap_bytes < rice_bytes:
        mask = np.zeros(numel, dtype=np.uint8)
        mask[indices] = 1
        return INDEX_BITMAP, b"", np.packbits(mask).tobytes(), 8 * bitmap_bytes
    low, unary = rice_encode(gaps, b)
    return INDEX_RICE, bytes([b]), low + unary, 8 * (1 + len(low) + len(unary))


def encode_sparse(indices: np.ndarray, values: np.ndarray, numel: int, kind: str) -> tuple[bytes, int]:
    """Payload for sorted ``indices`` with wire ``values`` (already quantized); returns (payload, index_bits)."""
    flags = FLAG_FP16 if kind == "fp16" else 0
    if indices.size == 0:
        return HEADER.pack(flags | INDEX_RICE, 0), 0
    mode, head, tail, index_bits = encode_indices(indices, numel)
    return HEADER.pack(flags | mode, indices.size) + head + values.tobytes() + tail, index_bits


def decode_sparse(payload: bytes, spec: TensorSpec, codec: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices, float32 values) from a sparse payload; raises CodecError with a reason."""
    numel = spec.numel
    where = f"{codec} payload for {spec.name!r}"
    if len(payload) < HEADER.size:
        raise CodecError(f"{where} is {len(payload)} bytes, shorter than its {HEADER.size}-byte header")
    flags, count = HEADER.unpack_from(payload)
    if flags & ~(INDEX_MASK | FLAG_FP16):
        raise CodecError(f"{where}: unknown flag bits 0x{flags:02x}")
    mode = flags & INDEX_MASK
    kind = "fp16" if flags & FLAG_FP16 else "fp32"
    if count > numel:
        raise CodecError(f"{where}: {count} entries announced, tensor has only {numel}")
    if count == 0:
        if len(payload) != HEADER.size:
            raise CodecError(f"{where}: {len(payload) - HEADER.size} bytes after an empty header")
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    offset = HEADER.size
    if mode == INDEX_RICE:
        if len(payload) < offset + 1:
            raise CodecError(f"{where}: missing the Rice parameter")
        b = payload[offset]
        offset += 1
        if b > MAX_RICE_BITS:
            raise CodecError(f"{where}: Rice parameter {b} > {MAX_RICE_BITS}")
        values = unpack_values(payload, offset, count, kind, where)
        offset += values.size * VALUE_DTYPES[kind].itemsize
        low_len = (count * b + 7) // 8
        if len(payload) < offset + low_len + 1:
            raise CodecError(f"{where}: payload ends inside the index streams")
        view = memoryview(payload)  # slices of a view, not copies of a possibly hostile stream
        gaps = rice_decode(view[offset : offset + low_len], view[offset + low_len :], count, b, numel, where)
        if int(np.sum(gaps + 1, dtype=np.uint64)) > numel:
            raise CodecError(f"{where}: indices run past the end of the tensor ({numel} entries)")
        indices = np.cumsum(gaps + 1) - 1
    elif mode == INDEX_BITMAP:
        values = unpack_values(payload, offset, count, kind, where)
        offset += values.size * VALUE_DTYPES[kind].itemsize
        bitmap_len = (numel + 7) // 8
        if len(payload) != offset + bitmap_len:
            raise CodecError(f"{where} is {len(payload)} bytes, expected {offset + bitmap_len} with a bitmap")
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8, offset=offset))
        if bits[numel:].any():
            raise CodecError(f"{where}: nonzero padding bits in the bitmap")
        indices = np.flatnonzero(bits[:numel])
        if indices.size != count:
            raise CodecError(f"{where}: bitmap marks {indices.size} entries, header says {count}")
    else:
        raise CodecError(f"{where}: unknown index code {mode}")
    return indices, values


def log2_binomial(n: int, k: int) -> float:
    """log2 C(n, k): the bits any code needs for a k-subset of n when all are equally likely."""
    if k <= 0 or k >= n:
        return 0.0
    return float((gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)) / math.log(2))
