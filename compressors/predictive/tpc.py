"""Temporal predictive coding (TPC): the codec front-end on the predictor engine.

See docs/algorithms.md for the method; the engine is ``predictive.engine``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwire.compressors.predictive.engine import COEF_FORMATS, WARMUPS, PredictiveCodecBase, PredictorConfig
from gradwire.compressors.registry import register


@register
@dataclass(frozen=True)
class TPCCodec(PredictiveCodecBase):
    """Temporal predictive coding with closed-loop least-squares prediction (``predictive.engine``)."""

    name = "tpc"

    order: int = 3
    trigger: str = "relative"
    eps: float = 0.7
    tau: float = 0.0
    alpha: float = 1.0
    window: int = 10
    max_stale: int = 2
    residual: str = "fp16"
    coef: str = "fp32"
    ridge: float = 1e-8
    warmup: str = "order"
    granularity: str = "model"
    check: int = 2
    ef: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 64:
            raise ValueError(f"order (p) must be in 1..64, got {self.order}")
        if self.coef not in COEF_FORMATS:
            raise ValueError(f"coef must be one of {', '.join(COEF_FORMATS)}, got {self.coef!r}")
        if not (np.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"ridge must be finite and >= 0, got {self.ridge}")
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {', '.join(WARMUPS)}, got {self.warmup!r}")
        self._resolve_residual()

    def config(self) -> PredictorConfig:
        return self._predictor_config(
            order=self.order, fixed_unit=False, coef=self.coef, ridge=self.ridge, warmup=self.warmup
        )
