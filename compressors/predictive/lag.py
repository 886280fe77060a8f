"""LAG: lazily aggregated gradients (Chen et al., 2018), the main baseline of TPC.

LAG is temporal predictive coding (``compressors/predictive/tpc.py``, docs/algorithms.md §1) with
order ``p = 1`` and the coefficient fixed at 1: the prediction of a worker's
gradient is the last gradient the PS holds for it, so no coefficients are sent.
The worker uploads the innovation ``r = g − ĝ^{t−1}`` only when the LAG-WK rule
fires::

    ‖r‖² > (1 / (alpha²·N²·D)) · Σ_{k=1..D} ‖θ^{t+1−k} − θ^{t−k}‖²

(N = ``ctx.num_workers``, D = ``window``, model motions from
``ctx.model_motion_sq``, filled by the worker loop); otherwise the PS reuses the
worker's last reconstruction, which is exactly lazy aggregation.

Wire layout: ``predictor_coefficients`` is always empty; ``residual`` (the flag)
holds ``C(r)`` (``residual=dense`` by default, any registered codec may be
plugged in) when the rule fired and is absent otherwise; ``payload`` holds the
``check``-byte history digest (default 1 byte, ``check=0`` sends nothing at all
on a skipped round). The first round after a reset is a full update: the
residual is the whole gradient.

Options: ``trigger`` (``lag`` by default; ``relative`` / ``absolute`` /
``always`` as in TPC), ``alpha`` (1.0: the threshold scales as 1/alpha²; the LAG
paper's alpha is the step size of a PS that *sums* the workers' gradients),
``window`` (D, 10), ``max_stale`` (K, 0 = no limit as in LAG), ``eps``, ``tau``,
``residual``, ``check``, ``ef``, ``granularity`` (``model`` | ``tensor``).
Bits per message: ``8·check`` + residual bits when sent (32·d with dense).
Biased: a skipped round reuses a stale gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradwire.compressors.predictive.engine import PredictiveCodecBase, PredictorConfig
from gradwire.compressors.registry import register


@register
@dataclass(frozen=True)
class LAGCodec(PredictiveCodecBase):
    """Lazy aggregation: p = 1, coefficient 1, LAG trigger (see module doc)."""

    name = "lag"

    trigger: str = "lag"
    alpha: float = 1.0
    window: int = 10
    max_stale: int = 0
    eps: float = 0.0
    tau: float = 0.0
    residual: str = "dense"
    check: int = 1
    ef: bool = False
    granularity: str = "model"

    def __post_init__(self) -> None:
        self._resolve_residual()

    def config(self) -> PredictorConfig:
        # p = 1 with the coefficient fixed at 1: the last reconstruction is the prediction.
        return self._predictor_config(order=1, fixed_unit=True, coef="fp32", ridge=0.0, warmup="order")
