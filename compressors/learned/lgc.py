"""Learned gradient compression, parameter-server variant (``lgc``).

Abrahamyan, Chen, Bekoulis, Deligiannis, "Learned Gradient Compression for
Distributed Deep Learning" (IEEE TNNLS 2021; seed 002, docs/algorithms.md §3).
Workers' gradients are correlated, so an autoencoder trained on them during
training can carry their common part in one worker's code. Three stages, driven
by the PS and announced in every round's directive (``stage``, ``leader``):

1. **Dense warm-up** (``warmup`` rounds): float32 updates.
2. **Top-k with error feedback** (``train`` rounds, ratio ``k``): the PS trains the
   autoencoder (``compressors/learned/lgc_model.py``) on the received top-k values, one
   optimizer step per round, loss = 0.5·Σ_i MSE(x_i, Dec_i(z_shared, innov_i)) +
   0.5·Σ_{i≠j} MSE(z_i, z_j), one decoder per worker.
3. **Compressed**: the autoencoder is frozen. The leader (rotating every round
   among the workers that have a trained decoder) sends Enc(its top-k values), the
   top-k indices and its innovation (its top ``innovation``·d entries); every other
   worker sends only its innovation. The PS decodes every worker on the leader's
   support: ``x̂_i = s·Dec_i(z_leader, innov_i|S / s)``. The encoder weights go to a
   worker in the downlink blob of the first round it leads (counted as downlink).

**Biased** (top-k and a learned reconstruction).

Defaults (``warmup=10, train=40, k=0.05, innovation=0.002, latent=fp32``) put a
120-round run in stage 3 from round 50. The paper's schedule (200 + 300 rounds,
k = 1e-3, innovation = 1e-5) is ``lgc:warmup=200,train=300,k=0.001,innovation=0.00001``.
A conv autoencoder trained from scratch with one step per round needs on the
order of a hundred steps before it beats passing the innovation through; the
stats ``reconstruction_error_by_round`` and ``innovation_only_error_by_round``
(relative squared errors on stage-2 data, before each step) show whether it did.

[design] choices (docs/algorithms.md §3 follows a third-party reimplementation; all
are options, and the cross-worker state's stats record every option's value):

* ``exempt=0`` (default): the whole model is compressed. ``exempt=1`` sends the
  first layer and the classifier (the tensors of the first and last module) as
  float32 in stages 2 and 3, as the paper does; on the 26,122-parameter digits
  MLP that alone costs ~12 bits per entry, so it is off by default.
* Aligned training targets: in stage 2 the PS draws the shared worker j (seeded by
  round) and trains every decoder to reconstruct worker i's top-k vector
  *restricted to j's support* from z_j, which is exactly what stage 3 asks of it.
* ``normalize=1``: values are divided by the RMS s of the leader's top-k values
  before the autoencoder (s travels as 4 bytes in the leader's payload).
* ``feedback``: error feedback in stage 3. The worker cannot know x̂_i (it holds no
  decoder and, unless it leads, no latent), so the PS tells it in the next round's
  downlink blob. ``support`` (default) sends the leader's support S only, and the
  worker assumes its top-k values on S and its innovation were delivered (the
  reimplementation assumes its *own* top-k support was delivered, without S).
  ``decoded`` also sends x̂_i on S (f32) and the worker keeps ``e = v − x̂`` exactly;
  on the digits MLP that exact memory re-injects the autoencoder's errors and
  training oscillates (75 % vs 95 % final accuracy), so it is not the default.
  Both cost downlink only.
* ``offsupport=1``: innovation entries outside the leader's support are added to
  x̂_i as sent (they are on the wire anyway); ``0`` drops them (decode strictly on S).
* ``ae_opt=adam`` (default; the reimplementation uses ``sgd``), ``ae_lr=1e-3``,
  ``ae_steps=1``, ``sim=0.5`` (similarity weight; reconstruction weight 0.5).
  One plain SGD step per round at lr 1e-3 barely moves the autoencoder in the
  tens of stage-2 rounds of a short run.
* ``latent``: ``fp32``, ``fp16`` or ``int8`` (symmetric, one float32 scale).
* ``adopt``: a worker that joins in stage 3 without a decoder first sends top-k
  (stage-2 format) while the PS trains its new decoder from the leader's latent,
  one step per round, for ``adopt`` rounds; it then sends innovation only like the
  others. ``adopt=0`` keeps such a worker on top-k.

Payload layouts (little-endian); ``m`` exempt entries (0 unless ``exempt=1``)
come right after the kind byte as m × f32; ``c`` = the other d − m entries::

    kind u8 = 0 dense      d × f32
    kind u8 = 1 sparse     m × f32 | topk sparse layout of c (compressors/sparsification/topk.py)
    kind u8 = 2 leader     m × f32 | u32 n | indices of S (n bytes, see pack_indices)
                           | scale f32 | latent | topk sparse layout of the innovation
    kind u8 = 3 innovation m × f32 | topk sparse layout of the innovation

``latent`` is 4 × ceil(|S|/16) values: f32, f16, or (int8) a f32 step then int8s.
Indices: ``mode u8 (0 Rice, 1 bitmap) | count u32 | Rice b u8 | low bits | unary``
or ``... | bitmap`` — topk's index code, without values.

Downlink blob (``CrossWorkerState.blob_for``), stage 3 only: ``flags u8`` then, in
order, for each flag set: ENCODER ``u32 n | n bytes`` (lgc_model weights);
FEEDBACK ``u32 round | u32 n | indices of S | (decoded) |S| × f32``;
NOT_AGGREGATED ``u32 round``; FALLBACK (no data: send top-k this round).

Files (this module holds the options, their checks and the registration):
``payload.py`` stages, directive, payload kinds, index code, latent, downlink blob;
``layout.py`` exempt/compressed split, top-k selection, supports; ``encoder.py`` the
worker's ``LGCEncoder``; ``decoder.py`` the PS's per-worker ``LGCDecoder``;
``cross_worker.py`` the PS-wide ``LGCCrossWorkerState`` (autoencoder training, leader,
stage-3 decoding, statistics); ``lgc_model.py`` the autoencoder.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from gradwire.compressors.base import Codec, CrossWorkerState, Decoder, Encoder
from gradwire.compressors.learned.cross_worker import LGCCrossWorkerState
from gradwire.compressors.learned.decoder import LGCDecoder
from gradwire.compressors.learned.encoder import LGCEncoder
from gradwire.compressors.learned.payload import LATENT_KINDS, STAGE_DENSE, STAGE_LGC, STAGE_TOPK
from gradwire.compressors.registry import register

FEEDBACK_KINDS = ("decoded", "support")
AE_OPTIMIZERS = ("adam", "sgd")


@register
@dataclass(frozen=True)
class LGCCodec(Codec):
    """Three-stage learned gradient compression with a rotating leader (PS variant). Biased."""

    name = "lgc"
    scope = "model"
    stateless_decoder = False  # per-worker decoders trained over rounds
    needs_layout = True  # exempt=1 leaves layers out by name; the layout sizes the blob's support
    has_cross_worker_state = True  # one autoencoder, trained on every worker's updates
    warmup: int = 10
    train: int = 40
    k: float = 0.05
    innovation: float = 0.002
    latent: str = "fp32"
    ef: bool = True
    feedback: str = "support"
    offsupport: bool = True
    normalize: bool = True
    exempt: bool = False
    ae_opt: str = "adam"
    ae_lr: float = 1e-3
    ae_steps: int = 1
    sim: float = 0.5
    adopt: int = 10
    ae_seed: int = 0

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 rounds, got {self.warmup}")
        if self.train < 1:
            raise ValueError(f"train must be >= 1 round (the autoencoder is trained in stage 2), got {self.train}")
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {self.k}")
        if not 0.0 < self.innovation < self.k:
            raise ValueError(f"innovation must be in (0, k={self.k}), got {self.innovation}")
        if self.latent not in LATENT_KINDS:
            raise ValueError(f"latent must be one of {LATENT_KINDS}, got {self.latent!r}")
        if self.feedback not in FEEDBACK_KINDS:
            raise ValueError(f"feedback must be one of {FEEDBACK_KINDS}, got {self.feedback!r}")
        if self.ae_opt not in AE_OPTIMIZERS:
            raise ValueError(f"ae_opt must be one of {AE_OPTIMIZERS}, got {self.ae_opt!r}")
        if not self.ae_lr > 0:
            raise ValueError(f"ae_lr must be > 0, got {self.ae_lr}")
        if self.ae_steps < 1:
            raise ValueError(f"ae_steps must be >= 1, got {self.ae_steps}")
        if self.sim < 0:
            raise ValueError(f"sim must be >= 0, got {self.sim}")
        if self.adopt < 0:
            raise ValueError(f"adopt must be >= 0 rounds, got {self.adopt}")

    def stage_of(self, round_: int) -> int:
        if round_ < self.warmup:
            return STAGE_DENSE
        if round_ < self.warmup + self.train:
            return STAGE_TOPK
        return STAGE_LGC

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def make_encoder(self) -> Encoder:
        return LGCEncoder(self)

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        if shared is not None and not isinstance(shared, LGCCrossWorkerState):
            raise TypeError(f"lgc decoders need an LGCCrossWorkerState, got {type(shared).__name__}")
        return LGCDecoder(self, shared)

    def make_cross_worker_state(self) -> CrossWorkerState:
        return LGCCrossWorkerState(self)
