"""Random-k sparsification (``randk``).

Per tensor, ``k = max(1, round(ratio · numel))`` entries chosen uniformly at
random without replacement (Stich et al., 2018, "Sparsified SGD with Memory";
Wangni et al., 2018). The indices come from ``ctx.rng(spec.name)``, which the
PS reproduces from (seed, round, rank, tensor name), so **no index is sent**:
the payload is the k values only, in increasing index order.

Two modes:

* ``scale=0`` (default) with error feedback (``ef=1``, default): the decoder
  puts the values in place; unsent entries stay in the worker's memory.
  **Biased** (the estimate is ``(k/d)·v`` in expectation), corrected over rounds
  by the memory.
* ``scale=1, ef=0``: the decoder multiplies by ``d/k``, an **unbiased** estimate
  of ``v`` with variance ``(d/k − 1)·||v||²``. Error feedback cannot be combined
  with scaling (the memory would grow by ``(d/k − 1)·v`` each round), so
  ``scale=1, ef=1`` is rejected.

Payload layout (little-endian): ``k × float32`` (or float16 with
``values=fp16``), nothing else; ``32·k/d`` bits per entry. An empty tensor has
an empty payload. Options: ``ratio`` (0.01), ``ef`` (1), ``decay`` (1),
``scale`` (0), ``values`` (``fp32`` or ``fp16``), ``momentum`` (DGC momentum
correction at the worker, 0) and ``masking`` (momentum factor masking, 1).
"""

from __future__ import annotations

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
from gradwire.compressors.feedback import MomentumCorrected, check_feedback_options
from gradwire.compressors.registry import register
from gradwire.compressors.sparse import (
    VALUE_DTYPES,
    check_ratio,
    check_value_kind,
    quantize_values,
    sparse_count,
)


def randk_indices(numel: int, k: int, spec_name: str, ctx: RoundContext) -> np.ndarray:
    """The sorted random support both ends draw for tensor ``spec_name`` in this round."""
    if k >= numel:
        return np.arange(numel, dtype=np.int64)
    rng = ctx.rng(spec_name)
    return np.sort(rng.choice(numel, size=k, replace=False, shuffle=False)).astype(np.int64)


class RandKEncoder(Encoder):
    def __init__(self, codec: RandKCodec):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self._entries = 0
        self._sent = 0

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        k = sparse_count(flat.size, self.codec.ratio)
        indices = randk_indices(flat.size, k, spec.name, ctx)
        values = quantize_values(flat[indices], self.codec.values)
        self._entries += flat.size
        self._sent += k
        return Encoded(self.codec.spec, spec, values.tobytes())

    def stats(self) -> dict[str, float]:
        return {"density": self._sent / self._entries} if self._entries else {}


class RandKDecoder(Decoder):
    def __init__(self, codec: RandKCodec):
        self.codec = codec

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        spec = msg.spec
        numel = spec.numel
        k = sparse_count(numel, self.codec.ratio)
        dtype = VALUE_DTYPES[self.codec.values]
        expect_payload_size(as_bytes(msg.payload), k * dtype.itemsize, spec, self.codec.name)
        values = np.frombuffer(msg.payload, dtype=dtype).astype(np.float32)
        if not np.isfinite(values).all():
            raise CodecError(f"{self.codec.name} payload for {spec.name!r} holds NaN or Inf")
        out = np.zeros(numel, dtype=np.float32)
        if k:
            if self.codec.scale:
                # float64 product: d/k · v may exceed float32 for huge v; saturate rather than overflow.
                limit = float(np.finfo(np.float32).max)
                values = np.clip(values * (numel / k), -limit, limit).astype(np.float32)
            out[randk_indices(numel, k, spec.name, ctx)] = values
        return out.reshape(spec.shape)


@register
@dataclass(frozen=True)
class RandKCodec(MomentumCorrected, Codec):
    """Random-k with PS-reproduced indices; 32·k/d bits per entry. Biased unless ``scale=1``."""

    name = "randk"
    ratio: float = 0.01
    ef: bool = True
    decay: float = 1.0
    scale: bool = False
    values: str = "fp32"
    momentum: float = 0.0  # DGC momentum correction at the worker (needs ef=1)
    masking: bool = True  # DGC momentum factor masking (with momentum > 0)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_feedback_options(self.decay, self.ef, self.momentum)
        if self.scale and self.ef:
            raise ValueError(
                "scale=1 (unbiased d/k scaling) cannot be combined with ef=1: the memory would grow "
                "by (d/k - 1)·v every round; use scale=1,ef=0 or scale=0,ef=1"
            )
        check_value_kind(self.values)

    def make_encoder(self) -> Encoder:
        return self.with_error_feedback(RandKEncoder(self), RandKDecoder(self))

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return RandKDecoder(self)
