"""PowerSGD low-rank compression with error feedback (``powersgd``).

Vogels, Karimireddy and Jaggi, 2019, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", in the single-worker form that fits
a parameter server (the PS cannot all-reduce P before Q is computed):

* a tensor with ``ndim >= 2`` is viewed as ``M`` of shape ``(n, m) =
  (shape[0], numel / shape[0])``; with ``r = min(rank, n, m)``:
  ``P = M Q``; ``P ← orthonormal basis of P`` (Householder QR); ``Q = Mᵀ P``;
  send ``P`` and ``Q``; the PS decodes ``P Qᵀ`` (the projection of ``M`` on the
  span of ``P``);
* warm start: the worker keeps ``Q`` (columns normalised; scaling does not
  change the next QR) and uses it to start the next round's power iteration.
  ``Q`` is worker state only (``state_dict`` / ``load_state_dict`` / ``reset``);
  the PS needs no state. The first ``Q`` (and any column that became zero) is
  drawn from ``ctx.rng(spec.name, salt=POWERSGD_SALT)``;
* error feedback (``ef=1``, default) keeps ``M − P Qᵀ`` for the next round.

**Biased**. Tensors with ``ndim < 2`` (biases, scalars), and matrices for which
``r·(n + m) >= n·m`` (low rank would not save anything), are sent dense float32.
The choice depends only on the shape and ``rank``, which both ends know.

Payload layout (little-endian, no header): low rank: ``P`` (n × r float32,
row-major) then ``Q`` (m × r float32, row-major); dense: ``numel`` float32.
Cost per entry of a low-rank tensor: ``32·r·(n + m) / (n·m)`` bits.

Arithmetic is float64 internally so that magnitudes up to the float32 limit
neither overflow nor underflow; sent factors saturate at the float32 range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

POWERSGD_SALT = 0x5057  # "PW": keeps the initial Q independent of other codecs' draws
FLOAT32_MAX = float(np.finfo(np.float32).max)


def lowrank_layout(shape: tuple[int, ...], rank: int) -> tuple[int, int, int] | None:
    """(n, m, r) when the tensor is sent as rank-r factors, None when it is sent dense."""
    if len(shape) < 2:
        return None
    n = int(shape[0])
    numel = int(np.prod(shape, dtype=np.int64))
    if numel == 0:
        return None
    m = numel // n
    r = min(rank, n, m)
    if r * (n + m) >= n * m:
        return None
    return n, m, r


def lowrank_bits_per_entry(n: int, m: int, r: int) -> float:
    """32·r·(n + m)/(n·m): what a low-rank tensor costs per entry."""
    return 32.0 * r * (n + m) / (n * m)


def _to_float32(a: np.ndarray) -> np.ndarray:
    return np.clip(a, -FLOAT32_MAX, FLOAT32_MAX).astype("<f4")


class PowerSGDEncoder(Encoder):
    def __init__(self, codec: PowerSGDCodec):
        self.codec = codec
        self.q: dict[str, np.ndarray] = {}
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._entries = 0
        self._lowrank_entries = 0
        self._sq_norm = 0.0
        self._sq_err = 0.0

    def reset(self) -> None:
        self.q.clear()
        self._reset_stats()

    def state_dict(self) -> dict[str, Any]:
        return {"q": {k: v.copy() for k, v in self.q.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.q = {k: np.array(v, dtype=np.float32) for k, v in state.get("q", {}).items()}

    def _start_q(self, name: str, m: int, r: int, ctx: RoundContext) -> np.ndarray:
        q = self.q.get(name)
        if q is None or q.shape != (m, r) or not np.isfinite(q).all():
            return ctx.rng(name, salt=POWERSGD_SALT).standard_normal((m, r))
        q = q.astype(np.float64)
        dead = ~np.any(q != 0, axis=0)
        if dead.any():  # a zero column would stay zero forever: restart it at random
            fresh = ctx.rng(name, salt=POWERSGD_SALT).standard_normal((m, r))
            q[:, dead] = fresh[:, dead]
        return q

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        self._entries += flat.size
        layout = lowrank_layout(spec.shape, self.codec.rank)
        if layout is None:
            return Encoded(self.codec.spec, spec, flat.astype("<f4").tobytes())
        n, m, r = layout
        mat = flat.reshape(n, m).astype(np.float64)
        p, _ = np.linalg.qr(mat @ self._start_q(spec.name, m, r, ctx))
        q = mat.T @ p
        norms = np.linalg.norm(q, axis=0)
        self.q[spec.name] = (q / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        # ||M − P Pᵀ M||² = ||M||² − ||Pᵀ M||² for orthonormal P.
        sq_norm = float(np.vdot(mat, mat))  # BLAS dot: no n×m float64 temporary
        self._sq_norm += sq_norm
        self._sq_err += max(0.0, sq_norm - float(np.sum(norms * norms)))
        self._lowrank_entries += flat.size
        return Encoded(self.codec.spec, spec, _to_float32(p).tobytes() + _to_float32(q).tobytes())

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._entries:
            out["lowrank_fraction"] = self._lowrank_entries / self._entries
        if self._sq_norm > 0:
            out["approx_rel_error"] = float(np.sqrt(self._sq_err / self._sq_norm))
        return out


class PowerSGDDecoder(Decoder):
    def __init__(self, codec: PowerSGDCodec):
        self.codec = codec

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        spec, payload = msg.spec, as_bytes(msg.payload)
        layout = lowrank_layout(spec.shape, self.codec.rank)
        if layout is None:
            expect_payload_size(payload, 4 * spec.numel, spec, self.codec.name)
            out = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        else:
            n, m, r = layout
            expect_payload_size(payload, 4 * r * (n + m), spec, self.codec.name)
            factors = np.frombuffer(payload, dtype="<f4").astype(np.float64)
            p = factors[: n * r].reshape(n, r)
            q = factors[n * r :].reshape(m, r)
            out = _to_float32(p @ q.T).astype(np.float32)
        if not np.isfinite(out).all():
            raise CodecError(f"{self.codec.name} payload for {spec.name!r} holds NaN or Inf")
        return out.reshape(spec.shape)


@register
@dataclass(frozen=True)
class PowerSGDCodec(Codec):
    """Rank-r PowerSGD with warm start and error feedback; 32·r(n+m)/(nm) bits per entry. Biased."""

    name = "powersgd"
    rank: int = 2
    ef: bool = True
    decay: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 1024:
            raise ValueError(f"rank must be in 1..1024, got {self.rank}")
        check_feedback_options(self.decay, self.ef)

    def make_encoder(self) -> Encoder:
        return maybe_error_feedback(PowerSGDEncoder(self), PowerSGDDecoder(self), self.ef, self.decay)

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return PowerSGDDecoder(self)
