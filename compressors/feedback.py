"""Error feedback (EF): the worker remembers what compression dropped and adds it back.

``v = x + decay·e;  send C(v);  e ← v − C⁻¹(C(v))``. The memory lives with the
worker's encoder and is keyed by tensor name; the PS needs no state for it, so
the decoder is the inner codec's decoder unchanged. A local mirror decoder gives
the worker exactly what the PS will decode, so this also works for stateful
inner codecs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from compressors.base import Decoder, Encoded, Encoder, RoundContext, TensorSpec, check_input


class ErrorFeedbackEncoder(Encoder):
    def __init__(self, inner: Encoder, mirror: Decoder, decay: float = 1.0):
        self.inner = inner
        self.mirror = mirror
        self.decay = float(decay)
        self.residuals: dict[str, np.ndarray] = {}

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        memory = self.residuals.get(spec.name)
        corrected = flat if memory is None else flat + np.float32(self.decay) * memory
        msg = self.inner.encode(corrected, spec, ctx)
        decoded = self.mirror.decode(msg, ctx).reshape(-1).astype(np.float32)
        self.residuals[spec.name] = corrected - decoded
        return msg

    def residual_norm_sq(self) -> float:
        return float(sum(float(np.dot(r, r)) for r in self.residuals.values()))

    def reset(self) -> None:
        self.residuals.clear()
        self.inner.reset()
        self.mirror.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            "residuals": {k: v.copy() for k, v in self.residuals.items()},
            "inner": self.inner.state_dict(),
            "mirror": self.mirror.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.residuals = {k: np.array(v, dtype=np.float32) for k, v in state["residuals"].items()}
        self.inner.load_state_dict(state["inner"])
        self.mirror.load_state_dict(state["mirror"])

    def stats(self) -> dict[str, float]:
        out = dict(self.inner.stats())
        out["ef_residual_norm"] = float(np.sqrt(self.residual_norm_sq()))
        return out


def maybe_error_feedback(
    encoder: Encoder, mirror: Decoder, enabled: bool, decay: float = 1.0
) -> Encoder:
    """``encoder`` wrapped in error feedback when ``enabled`` (``mirror`` decodes its output)."""
    return ErrorFeedbackEncoder(encoder, mirror, decay) if enabled else encoder
