"""Error feedback (EF): the worker remembers what compression dropped and adds it back.

``v = x + decay·e;  send C(v);  e ← v − C⁻¹(C(v))``. The memory lives with the
worker's encoder and is keyed by tensor name; the PS needs no state for it, so
the decoder is the inner codec's decoder unchanged. A local mirror decoder gives
the worker exactly what the PS will decode, so this also works for stateful
inner codecs; an inner encoder that already knows what the PS will decode
(``Encoder.reconstruction``: m22, huffman, ans) spares the mirror its decode.

**Momentum correction** (Lin et al., 2018, "Deep Gradient Compression", §3.2),
for sparsifying codecs (``topk``, ``randk``) with ``momentum=m``: the worker
keeps the heavy-ball velocity itself and feeds *it* to error feedback,
``u ← m·u + x;  v = u + decay·e;  send C(v);  e ← v − C⁻¹(C(v))``, and clears
the velocity where an entry was sent (momentum factor masking, ``masking=1``,
the default), so a sent coordinate does not keep pushing from stale momentum.
Without masking, ``ratio=1`` is exactly heavy-ball SGD; with it, the velocity of
an entry sent every round never builds up, so masking suits small ratios. The PS then applies plain
SGD: a second, server-side momentum would delay the memory's already delayed
corrections once more, which is why top-k with PS momentum trains poorly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gradwire.compressors.base import Decoder, Encoded, Encoder, RoundContext, TensorSpec, check_input


class ErrorFeedbackEncoder(Encoder):
    def __init__(self, inner: Encoder, mirror: Decoder, decay: float = 1.0, momentum: float = 0.0,
                 masking: bool = True):
        self.inner = inner
        self.mirror = mirror
        self.decay = float(decay)
        self.momentum = float(momentum)
        self.masking = bool(masking)
        self.residuals: dict[str, np.ndarray] = {}
        self.velocities: dict[str, np.ndarray] = {}

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        if self.momentum:
            velocity = self.velocities.get(spec.name)
            flat = flat.copy() if velocity is None else np.float32(self.momentum) * velocity + flat
            self.velocities[spec.name] = flat
        memory = self.residuals.get(spec.name)
        if memory is None:
            corrected = flat
        else:  # decay·e + x with one new float32 array (the memory stays intact if encoding fails)
            corrected = memory * np.float32(self.decay) if self.decay != 1.0 else memory + flat
            if self.decay != 1.0:
                corrected += flat
        msg = self.inner.encode(corrected, spec, ctx)
        known = self.inner.reconstruction(msg)  # the inner encoder's symbols, when it keeps them
        decoded = (self.mirror.decode(msg, ctx) if known is None else known).reshape(-1).astype(np.float32, copy=False)
        self.residuals[spec.name] = corrected - decoded
        if self.momentum:
            if self.masking:  # momentum factor masking: a sent entry stops pushing from stale momentum
                self.velocities[spec.name][decoded != 0] = 0.0
        return msg

    def residual_norm_sq(self) -> float:
        return float(sum(float(np.dot(r, r)) for r in self.residuals.values()))

    def reset(self) -> None:
        self.residuals.clear()
        self.velocities.clear()
        self.inner.reset()
        self.mirror.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            "residuals": {k: v.copy() for k, v in self.residuals.items()},
            "velocities": {k: v.copy() for k, v in self.velocities.items()},
            "inner": self.inner.state_dict(),
            "mirror": self.mirror.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.residuals = {k: np.array(v, dtype=np.float32) for k, v in state["residuals"].items()}
        self.velocities = {k: np.array(v, dtype=np.float32) for k, v in state.get("velocities", {}).items()}
        self.inner.load_state_dict(state["inner"])
        self.mirror.load_state_dict(state["mirror"])

    def stats(self) -> dict[str, float]:
        out = dict(self.inner.stats())
        out["ef_residual_norm"] = float(np.sqrt(self.residual_norm_sq()))
        if self.momentum:
            out["velocity_norm"] = float(np.sqrt(sum(float(np.dot(u, u)) for u in self.velocities.values())))
        return out


def maybe_error_feedback(
    encoder: Encoder, mirror: Decoder, enabled: bool, decay: float = 1.0, momentum: float = 0.0,
    masking: bool = True,
) -> Encoder:
    """``encoder`` wrapped in error feedback when ``enabled`` (``mirror`` decodes its output)."""
    return ErrorFeedbackEncoder(encoder, mirror, decay, momentum, masking) if enabled else encoder


def check_feedback_options(decay: float, ef: bool, momentum: float = 0.0) -> None:
    """Validation shared by the error-feedback codecs' options ``decay``, ``ef`` and ``momentum``."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if momentum and not ef:
        raise ValueError("momentum correction (momentum>0) needs error feedback (ef=1): "
                         "the velocity is accumulated in the memory")


class MomentumCorrected:
    """For the sparsifying codecs with the options ``ef``, ``decay``, ``momentum`` and ``masking``
    (``topk``, ``randk``): their error feedback with momentum correction, and the momentum it
    applies at the workers (so that the PS does not apply it again)."""

    ef: bool
    decay: float
    momentum: float
    masking: bool

    @property
    def worker_momentum(self) -> float:
        return self.momentum

    def with_error_feedback(self, encoder: Encoder, mirror: Decoder) -> Encoder:
        return maybe_error_feedback(encoder, mirror, self.ef, self.decay, self.momentum, self.masking)
