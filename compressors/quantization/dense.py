"""Uncompressed baselines: float32 (``dense``), float16 (``fp16``) and bfloat16 (``bf16``).

Payload layout: the tensor's entries, little-endian, row-major; no side information.
Unbiased up to rounding; ``dense`` is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwire.compressors.base import RoundContext, TensorCodec, TensorSpec, expect_payload_size
from gradwire.compressors.registry import register


@register
@dataclass(frozen=True)
class DenseCodec(TensorCodec):
    """float32, 32 bits per entry: the reference every ratio is measured against."""

    name = "dense"

    def encode_array(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> bytes:
        return x.astype("<f4", copy=False).tobytes()

    def decode_array(self, payload: bytes, spec: TensorSpec, ctx: RoundContext) -> np.ndarray:
        expect_payload_size(payload, 4 * spec.numel, spec, self.name)
        return np.frombuffer(payload, dtype="<f4").astype(np.float32)


@register
@dataclass(frozen=True)
class Float16Codec(TensorCodec):
    """IEEE half precision, 16 bits per entry; values beyond ±65504 saturate."""

    name = "fp16"

    def encode_array(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> bytes:
        limit = np.finfo(np.float16).max
        return np.clip(x, -limit, limit).astype("<f2").tobytes()

    def decode_array(self, payload: bytes, spec: TensorSpec, ctx: RoundContext) -> np.ndarray:
        expect_payload_size(payload, 2 * spec.numel, spec, self.name)
        return np.frombuffer(payload, dtype="<f2").astype(np.float32)


@register
@dataclass(frozen=True)
class BFloat16Codec(TensorCodec):
    """bfloat16 (the top 16 bits of float32, round to nearest even): 16 bits per entry."""

    name = "bf16"

    def encode_array(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> bytes:
        bits = x.astype("<f4").view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return np.minimum(rounded, 0xFFFF).astype("<u2").tobytes()

    def decode_array(self, payload: bytes, spec: TensorSpec, ctx: RoundContext) -> np.ndarray:
        expect_payload_size(payload, 2 * spec.numel, spec, self.name)
        high = np.frombuffer(payload, dtype="<u2").astype(np.uint32) << 16
        return high.view(np.float32).copy()
