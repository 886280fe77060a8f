"""Uncompressed baselines: float32 (``dense``), float16 (``fp16``) and bfloat16 (``bf16``).

Payload layout: the tensor's entries, little-endian, row-major; no side information.
Unbiased up to rounding; ``dense`` is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwire.compressors.base import Payload, RoundContext, TensorCodec, TensorSpec, expect_payload_size
from gradwire.compressors.registry import register


def _torch():
    import torch  # a project dependency; imported when first needed

    return torch


def _torch_view(x: np.ndarray):
    """A flat float32 torch tensor sharing ``x``'s memory (a copy only when x is not contiguous float32)."""
    return _torch().from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))


@register
@dataclass(frozen=True)
class DenseCodec(TensorCodec):
    """float32, 32 bits per entry: the reference every ratio is measured against."""

    name = "dense"

    def encode_array(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> bytes:
        return x.astype("<f4", copy=False).tobytes()

    def encode_array_view(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Payload:
        # The payload is the tensor's little-endian float32 bytes: when x already is that
        # (contiguous), a view of it, and the worker's serializer copies it once, into the message.
        if x.dtype == np.dtype("<f4") and x.flags.c_contiguous:
            return x.reshape(-1).view(np.uint8).data.toreadonly()
        return self.encode_array(x, spec, ctx)

    decodes_views = True

    def decode_array(self, payload: bytes, spec: TensorSpec, ctx: RoundContext) -> np.ndarray:
        return self.decode_view(payload, spec, ctx)

    def decode_view(self, payload: Payload, spec: TensorSpec, ctx: RoundContext) -> np.ndarray:
        expect_payload_size(payload, 4 * spec.numel, spec, self.name)
        values = np.frombuffer(payload, dtype="<f4")
        # A read-only view of immutable bytes (bytes, or a read-only view of bytes: the PS's
        # received message) needs no copy: nobody can change it, nor write through it. A mutable
        # buffer is copied, so that the decoded tensor does not change when its owner reuses it.
        # The view may be unaligned (a payload's offset in a message is arbitrary): the PS's reads
        # handle that (compressors/finite.py; numpy's add), cheaper than a model-sized copy.
        if _immutable(payload) and values.dtype == np.float32:
            return values
        return values.astype(np.float32)


def _immutable(payload: Payload) -> bool:
    if isinstance(payload, memoryview):
        return payload.readonly and isinstance(payload.obj, bytes)
    return isinstance(payload, bytes)


@register
@dataclass(frozen=True)
class Float16Codec(TensorCodec):
    """IEEE half precision, 16 bits per entry; values beyond ±65504 saturate."""

    name = "fp16"

    def encode_array(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> bytes:
        limit = float(np.finfo(np.float16).max)
        # torch's vectorized conversion (round to nearest even, subnormals kept) gives the same
        # bits as numpy's astype("<f2") at several times its speed; the clamp avoids infinities.
        return _torch_view(x).clamp(-limit, limit).to(_torch().float16).numpy().tobytes()

    def decode_array(self, payload: bytes, spec: TensorSpec, ctx: RoundContext) -> np.ndarray:
        expect_payload_size(payload, 2 * spec.numel, spec, self.name)
        return np.frombuffer(payload, dtype="<f2").astype(np.float32)


@register
@dataclass(frozen=True)
class BFloat16Codec(TensorCodec):
    """bfloat16 (the top 16 bits of float32, round to nearest even): 16 bits per entry."""

    name = "bf16"

    def encode_array(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> bytes:
        # torch rounds float32 to bfloat16 to nearest even, as (bits + 0x7FFF + lsb) >> 16 does
        # (inputs are finite; a test checks the bits against that formula).
        return _torch_view(x).to(_torch().bfloat16).view(_torch().int16).numpy().tobytes()

    def decode_array(self, payload: bytes, spec: TensorSpec, ctx: RoundContext) -> np.ndarray:
        expect_payload_size(payload, 2 * spec.numel, spec, self.name)
        high = np.frombuffer(payload, dtype="<u2").astype(np.uint32) << 16
        return high.view(np.float32).copy()
