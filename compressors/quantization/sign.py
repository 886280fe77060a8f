"""Scaled sign compression with error feedback (``sign``).

Implements the scaled-sign compressor of EF-SignSGD (Karimireddy et al., 2019,
"Error Feedback Fixes SignSGD and other Gradient Compression Schemes"), which
builds on signSGD (Bernstein et al., 2018): each tensor ``v`` (the gradient plus
the error-feedback memory) is sent as ``mean(|v|) · sign(v)``.

**Biased**: the decoded tensor is not an unbiased estimate of ``v``; error
feedback (on by default, ``ef=1``) carries what was lost into the next round.

Payload layout (little-endian), per tensor of ``d`` entries::

    scale   float32      mean(|v|) (computed in float64, rounded to float32)
    signs   ceil(d/8) B  np.packbits(v < 0), big-endian bit order, padding bits 0

so ``1 + 32/d`` bits per entry. A zero entry is sent as ``+scale`` (one bit
cannot say "zero"); error feedback removes the resulting error over rounds.
An empty tensor has an empty payload.

Options: ``ef`` (error feedback, default 1), ``decay`` (memory decay γ in
``v = g + γ·e``, default 1).
"""

from __future__ import annotations

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
    expect_payload_size,
)
from gradwire.compressors.feedback import check_feedback_options, maybe_error_feedback
from gradwire.compressors.registry import register

SCALE_BYTES = 4


def sign_payload_bytes(numel: int) -> int:
    """Exact payload size of a tensor of ``numel`` entries."""
    return 0 if numel == 0 else SCALE_BYTES + (numel + 7) // 8


class SignEncoder(Encoder):
    def __init__(self, codec: SignCodec):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self._entries = 0
        self._tensors = 0
        self._scale_sum = 0.0

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        if flat.size == 0:
            return Encoded(self.codec.spec, spec, b"")
        # float64 accumulation: exact enough and no overflow for |v| up to float32 max.
        scale = np.float32(np.mean(np.abs(flat), dtype=np.float64))
        if not np.isfinite(scale):  # mean of finite float32 values cannot overflow float32
            raise CodecError(f"sign scale of {spec.name!r} is not finite")
        bits = np.packbits(flat < 0)
        self._entries += flat.size
        self._tensors += 1
        self._scale_sum += float(scale)
        return Encoded(self.codec.spec, spec, struct.pack("<f", scale) + bits.tobytes())

    def stats(self) -> dict[str, float]:
        if not self._tensors:
            return {}
        return {"mean_scale": self._scale_sum / self._tensors}


class SignDecoder(Decoder):
    def __init__(self, codec: SignCodec):
        self.codec = codec

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        spec, payload = msg.spec, as_bytes(msg.payload)
        numel = spec.numel
        expect_payload_size(payload, sign_payload_bytes(numel), spec, self.codec.name)
        if numel == 0:
            return np.zeros(spec.shape, dtype=np.float32)
        (scale,) = struct.unpack_from("<f", payload)
        if not (np.isfinite(scale) and scale >= 0):
            raise CodecError(f"sign payload for {spec.name!r} has scale {scale}; expected finite >= 0")
        packed = np.frombuffer(payload, dtype=np.uint8, offset=SCALE_BYTES)
        negative = np.unpackbits(packed)
        if negative[numel:].any():
            raise CodecError(f"sign payload for {spec.name!r} has nonzero padding bits")
        scale32 = np.float32(scale)
        out = np.where(negative[:numel].astype(bool), -scale32, scale32).astype(np.float32)
        return out.reshape(spec.shape)


@register
@dataclass(frozen=True)
class SignCodec(Codec):
    """Scaled sign ``mean(|v|)·sign(v)`` with error feedback: 1 bit per entry + 32 per tensor. Biased."""

    name = "sign"
    ef: bool = True
    decay: float = 1.0

    def __post_init__(self) -> None:
        check_feedback_options(self.decay, self.ef)

    def make_encoder(self) -> Encoder:
        return maybe_error_feedback(SignEncoder(self), SignDecoder(self), self.ef, self.decay)

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return SignDecoder(self)


__all__ = ["SignCodec", "SignDecoder", "SignEncoder", "sign_payload_bytes"]
