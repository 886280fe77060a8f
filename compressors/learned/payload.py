"""LGC wire format: stages and the round directive, message kinds, payload and blob parsing.

Part of learned gradient compression (``lgc``, docs/algorithms.md §3; the codec and the
byte layouts are described in ``compressors/learned/lgc.py``). Holds the constants every
side shares (stages, payload kinds, downlink-blob flags), the index code of a support
(topk's, without values), the bounds-checked ``Reader``, latent quantization, the
downlink blob (``build_blob`` / ``parse_blob``) and ``Parsed``, what a PS decoder read from
one stage-3 message. Pure byte handling: no torch, no state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from gradwire.compressors.base import CodecError, RoundContext
from gradwire.compressors.sparse import (
    HEADER,
    INDEX_BITMAP,
    INDEX_RICE,
    MAX_RICE_BITS,
    encode_indices,
    rice_decode,
)

STAGE_DENSE, STAGE_TOPK, STAGE_LGC = 1, 2, 3
KIND_DENSE, KIND_SPARSE, KIND_LEADER, KIND_INNOVATION = 0, 1, 2, 3
KIND_NAMES = {KIND_DENSE: "dense", KIND_SPARSE: "sparse", KIND_LEADER: "leader", KIND_INNOVATION: "innovation"}

BLOB_ENCODER = 0x01
BLOB_FEEDBACK = 0x02
BLOB_NOT_AGGREGATED = 0x04
BLOB_FALLBACK = 0x08
BLOB_FLAGS = BLOB_ENCODER | BLOB_FEEDBACK | BLOB_NOT_AGGREGATED | BLOB_FALLBACK

U32 = struct.Struct("<I")
F32 = struct.Struct("<f")
LATENT_KINDS = ("fp32", "fp16", "int8")


# ---------------------------------------------------------------- index coding


def pack_indices(indices: np.ndarray, numel: int) -> bytes:
    """Sorted unique indices in topk's index code (Rice gaps or bitmap), without values."""
    if indices.size == 0:
        return HEADER.pack(INDEX_RICE, 0)
    mode, head, tail, _ = encode_indices(indices.astype(np.int64, copy=False), numel)
    return HEADER.pack(mode, int(indices.size)) + head + tail


def unpack_indices(buf: bytes, numel: int, where: str) -> np.ndarray:
    """Inverse of ``pack_indices``; CodecError with a reason on anything malformed."""
    if len(buf) < HEADER.size:
        raise CodecError(f"{where}: index block is {len(buf)} bytes, shorter than its header")
    mode, count = HEADER.unpack_from(buf)
    if count > numel:
        raise CodecError(f"{where}: {count} indices announced, the vector has only {numel} entries")
    if count == 0:
        if len(buf) != HEADER.size or mode != INDEX_RICE:
            raise CodecError(f"{where}: malformed empty index block")
        return np.zeros(0, dtype=np.int64)
    body = buf[HEADER.size :]
    if mode == INDEX_RICE:
        if not body:
            raise CodecError(f"{where}: missing the Rice parameter")
        b = body[0]
        if b > MAX_RICE_BITS:
            raise CodecError(f"{where}: Rice parameter {b} > {MAX_RICE_BITS}")
        low_len = (count * b + 7) // 8
        if len(body) < 1 + low_len + 1:
            raise CodecError(f"{where}: index block ends inside the Rice streams")
        gaps = rice_decode(body[1 : 1 + low_len], body[1 + low_len :], count, b, numel, where)
        if int(np.sum(gaps + 1, dtype=np.uint64)) > numel:
            raise CodecError(f"{where}: indices run past the end of the vector ({numel} entries)")
        return np.cumsum(gaps + 1) - 1
    if mode == INDEX_BITMAP:
        if len(body) != (numel + 7) // 8:
            raise CodecError(f"{where}: bitmap is {len(body)} bytes, expected {(numel + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8))
        if bits[numel:].any():
            raise CodecError(f"{where}: nonzero padding bits in the bitmap")
        idx = np.flatnonzero(bits[:numel])
        if idx.size != count:
            raise CodecError(f"{where}: bitmap marks {idx.size} entries, header says {count}")
        return idx
    raise CodecError(f"{where}: unknown index code {mode}")


class Reader:
    """Bounds-checked reads from a payload or blob."""

    def __init__(self, data: bytes, where: str):
        self.data = data
        self.pos = 0
        self.where = where

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f"{self.where}: ends inside the {what} ({len(self.data)} bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return U32.unpack(self.take(4, what))[0]

    def f32(self, what: str) -> float:
        return F32.unpack(self.take(4, what))[0]

    def array(self, count: int, dtype: str, what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        arr = np.frombuffer(self.take(count * dt.itemsize, what), dtype=dt).astype(np.float32)
        if not np.isfinite(arr).all():
            raise CodecError(f"{self.where}: the {what} contain NaN or Inf")
        return arr

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def done(self) -> None:
        if self.pos != len(self.data):
            raise CodecError(f"{self.where}: {len(self.data) - self.pos} unexpected trailing bytes")



# ---------------------------------------------------------------- latent


def quantize_latent(z: np.ndarray, kind: str) -> bytes:
    flat = np.ascontiguousarray(z, dtype=np.float32).reshape(-1)
    if kind == "fp32":
        return flat.astype("<f4").tobytes()
    if kind == "fp16":
        return np.clip(flat, -65504.0, 65504.0).astype("<f2").tobytes()
    peak = float(np.max(np.abs(flat))) if flat.size else 0.0
    step = peak / 127.0 if peak > 0 else 1.0
    q = np.clip(np.rint(flat / step), -127, 127).astype(np.int8)
    return F32.pack(step) + q.tobytes()


def read_latent(reader: Reader, count: int, kind: str) -> np.ndarray:
    if kind == "fp32":
        return reader.array(count, "<f4", "latent")
    if kind == "fp16":
        return reader.array(count, "<f2", "latent")
    step = reader.f32("latent step")
    if not np.isfinite(step) or step <= 0:
        raise CodecError(f"{reader.where}: latent step {step} is not a positive number")
    q = np.frombuffer(reader.take(count, "latent"), dtype=np.int8)
    if (q == -128).any():
        raise CodecError(f"{reader.where}: latent code -128 is outside the symmetric int8 range")
    return q.astype(np.float32) * np.float32(step)



# ---------------------------------------------------------------- round directive


def directive_of(ctx: RoundContext) -> tuple[int, int]:
    """(stage, leader) announced by the PS; no directive means stage 1 (dense) at both ends."""
    try:
        stage = int(ctx.directive.get("stage", STAGE_DENSE))
        leader = int(ctx.directive.get("leader", -1))
    except (TypeError, ValueError) as exc:
        raise CodecError(f"lgc directive is malformed: {dict(ctx.directive)}") from exc
    if stage not in (STAGE_DENSE, STAGE_TOPK, STAGE_LGC):
        raise CodecError(f"lgc directive names unknown stage {stage}")
    return stage, leader



# ---------------------------------------------------------------- downlink blob


@dataclass
class Blob:
    """A parsed downlink blob."""

    flags: int = 0
    encoder: bytes = b""
    feedback_round: int = -1
    support: np.ndarray | None = None
    decoded: np.ndarray | None = None
    not_aggregated_round: int = -1


def parse_blob(data: bytes, dc: int, feedback: str) -> Blob:
    if not data:
        return Blob()
    r = Reader(data, "lgc downlink blob")
    flags = r.take(1, "flags")[0]
    if flags & ~BLOB_FLAGS:
        raise CodecError(f"lgc downlink blob: unknown flag bits 0x{flags:02x}")
    out = Blob(flags=flags)
    if flags & BLOB_ENCODER:
        out.encoder = r.take(r.u32("encoder length"), "encoder weights")
    if flags & BLOB_FEEDBACK:
        out.feedback_round = r.u32("feedback round")
        out.support = unpack_indices(r.take(r.u32("support length"), "support"), dc, "lgc feedback support")
        if feedback == "decoded":
            out.decoded = r.array(out.support.size, "<f4", "decoded values")
    if flags & BLOB_NOT_AGGREGATED:
        out.not_aggregated_round = r.u32("not-aggregated round")
    r.done()
    return out


def build_blob(
    encoder: bytes = b"",
    feedback: tuple[int, np.ndarray, np.ndarray | None] | None = None,
    dc: int = 0,
    not_aggregated: int | None = None,
    fallback: bool = False,
) -> bytes:
    flags, parts = 0, []
    if encoder:
        flags |= BLOB_ENCODER
        parts.append(U32.pack(len(encoder)) + encoder)
    if feedback is not None:
        flags |= BLOB_FEEDBACK
        round_, support, values = feedback
        idx = pack_indices(support, dc)
        parts.append(U32.pack(round_) + U32.pack(len(idx)) + idx)
        if values is not None:
            parts.append(np.asarray(values, dtype="<f4").tobytes())
    if not_aggregated is not None:
        flags |= BLOB_NOT_AGGREGATED
        parts.append(U32.pack(not_aggregated))
    if fallback:
        flags |= BLOB_FALLBACK
    if not flags:
        return b""
    return bytes([flags]) + b"".join(parts)


# ---------------------------------------------------------------- parsed stage-3 message


@dataclass
class Parsed:
    """What a decoder read from one stage-3 message, for the cross-worker state."""

    kind: int
    payload_bytes: int
    inn_idx: np.ndarray
    inn_vals: np.ndarray
    exempt_vals: np.ndarray
    support: np.ndarray | None = None
    scale: float = 1.0
    latent: np.ndarray | None = None

