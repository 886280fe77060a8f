"""LGC worker side: ``LGCEncoder`` (stage from the directive, error feedback, leader's latent).

Part of learned gradient compression (``lgc``, docs/algorithms.md §3; overview and payload
layouts in ``compressors/learned/lgc.py``). The encoder follows the stage and leader the PS
announces: dense in stage 1, top-k with error feedback in stage 2, and in stage 3 its
innovation, plus (when it leads) the top-k support and Enc(top-k values) with the encoder
weights the PS shipped in the downlink blob. The PS's feedback in the next round's blob
settles the error-feedback memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradwire.compressors.base import CodecError, Encoded, Encoder, RoundContext, TensorSpec, check_input
from gradwire.compressors.learned import lgc_model
from gradwire.compressors.learned.layout import Layout, exempt_positions, layout_for, rms_scale, top_indices
from gradwire.compressors.learned.payload import (
    BLOB_FALLBACK,
    F32,
    KIND_DENSE,
    KIND_INNOVATION,
    KIND_LEADER,
    KIND_SPARSE,
    STAGE_DENSE,
    STAGE_LGC,
    STAGE_TOPK,
    U32,
    Blob,
    directive_of,
    pack_indices,
    parse_blob,
    quantize_latent,
)
from gradwire.compressors.sparse import encode_sparse, sparse_count

if TYPE_CHECKING:
    from gradwire.compressors.learned.lgc import LGCCodec



class LGCEncoder(Encoder):
    """Worker side: stage from the directive, EF memory, the shipped encoder when it leads."""

    def __init__(self, codec: LGCCodec):
        self.codec = codec
        self.layout: Layout | None = None
        self.reset()

    def set_layout(self, specs: Sequence[TensorSpec]) -> None:
        exempt = exempt_positions(specs) if self.codec.exempt else np.zeros(0, dtype=np.int64)
        self.layout = Layout(sum(s.numel for s in specs), exempt)

    def reset(self) -> None:
        self.memory: np.ndarray | None = None
        self.pending: dict[str, Any] | None = None
        self.net: torch.nn.Module | None = None
        self.net_bytes = b""
        self.last_stage = 0
        self.last_support: np.ndarray | None = None  # the leader's S when this worker led
        self.counts = {"rounds": 0, "leader_rounds": 0, "fallback_rounds": 0, "feedback_exact": 0,
                       "feedback_missing": 0, "not_aggregated": 0, "encoder_loads": 0}

    # -- feedback of the previous round

    def _resolve_pending(self, blob: Blob, round_: int) -> None:
        p = self.pending
        if p is None:
            return
        self.pending = None
        if blob.not_aggregated_round == p["round"]:
            self.memory = p["v"]  # nothing of it reached the model: keep all of it
            self.counts["not_aggregated"] += 1
            return
        if blob.feedback_round != p["round"] or blob.support is None:
            self.memory = p["provisional"]
            self.counts["feedback_missing"] += 1
            return
        v, support = p["v"], blob.support
        delivered = np.zeros_like(v)
        inn_idx = p["inn_idx"]
        if self.codec.offsupport or support.size == 0:  # no latent that round: innovation only
            delivered[inn_idx] = v[inn_idx]
        if blob.decoded is not None:  # feedback=decoded: exactly what the PS aggregated
            delivered[support] = blob.decoded
        else:  # feedback=support: own top-k values (innovation included) on S assumed delivered
            on_s = np.intersect1d(p["own_idx"], support, assume_unique=True)
            delivered[on_s] = v[on_s]
        self.memory = v - delivered
        self.counts["feedback_exact"] += 1

    # -- encoding

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        layout = layout_for(spec, self.layout, self.codec.exempt)
        stage, leader = directive_of(ctx)
        blob = parse_blob(ctx.directive_blob, layout.dc, self.codec.feedback)
        if blob.encoder and blob.encoder != self.net_bytes:
            try:
                self.net = lgc_model.encoder_from_bytes(blob.encoder)
            except ValueError as exc:
                raise CodecError(f"lgc: the shipped encoder does not load: {exc}") from None
            self.net_bytes = blob.encoder
            self.counts["encoder_loads"] += 1
        self._resolve_pending(blob, ctx.round)
        self.last_stage = stage
        self.last_support = None
        self.counts["rounds"] += 1
        if stage == STAGE_DENSE:
            self.memory = None
            return Encoded(self.codec.spec, spec, bytes([KIND_DENSE]) + flat.astype("<f4").tobytes())
        head = flat[layout.exempt].astype("<f4").tobytes()  # exempt entries travel as f32
        c = flat[layout.compressed]
        v = c + self.memory if (self.codec.ef and self.memory is not None) else c.copy()
        k = sparse_count(layout.dc, self.codec.k)
        is_leader = ctx.rank == leader
        if stage == STAGE_TOPK or blob.flags & BLOB_FALLBACK or (is_leader and self.net is None):
            if stage == STAGE_LGC:
                self.counts["fallback_rounds"] += 1
            idx = top_indices(v, k)
            vals = v[idx].astype("<f4")
            payload, _ = encode_sparse(idx, vals, layout.dc, "fp32")
            memory = v.copy()
            memory[idx] = 0.0
            self.memory = memory if self.codec.ef else None
            return Encoded(self.codec.spec, spec, bytes([KIND_SPARSE]) + head + payload)
        # stage 3, compressed
        inn_idx = top_indices(v, sparse_count(layout.dc, self.codec.innovation))
        inn_payload, _ = encode_sparse(inn_idx, v[inn_idx].astype("<f4"), layout.dc, "fp32")
        own_idx = top_indices(v, k)
        provisional = v.copy()
        provisional[inn_idx] = 0.0
        if self.codec.ef:
            self.pending = {"round": ctx.round, "v": v, "inn_idx": inn_idx, "own_idx": own_idx,
                            "provisional": provisional}
            self.memory = provisional  # used only if the PS's feedback never comes
        if not is_leader:
            return Encoded(self.codec.spec, spec, bytes([KIND_INNOVATION]) + head + inn_payload)
        self.counts["leader_rounds"] += 1
        self.last_support = own_idx
        values = v[own_idx]
        scale = rms_scale(values) if self.codec.normalize else 1.0
        z = lgc_model.encode_values(self.net, values / np.float32(scale)) if own_idx.size else np.zeros((4, 0), np.float32)  # type: ignore[arg-type]
        idx_block = pack_indices(own_idx, layout.dc)
        body = U32.pack(len(idx_block)) + idx_block + F32.pack(scale) + quantize_latent(z, self.codec.latent)
        return Encoded(self.codec.spec, spec, bytes([KIND_LEADER]) + head + body + inn_payload)

    def state_dict(self) -> dict[str, Any]:
        return {
            "memory": None if self.memory is None else self.memory.copy(),
            "pending": None if self.pending is None else {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                                          for k, v in self.pending.items()},
            "net_bytes": self.net_bytes,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.memory = None if state["memory"] is None else np.array(state["memory"], dtype=np.float32)
        self.pending = None if state["pending"] is None else dict(state["pending"])
        if state["net_bytes"]:
            self.net = lgc_model.encoder_from_bytes(state["net_bytes"])
            self.net_bytes = state["net_bytes"]
        self.counts.update(state.get("counts", {}))

    def stats(self) -> dict[str, float]:
        out = {f"lgc_{k}": float(v) for k, v in self.counts.items()}
        out["lgc_stage"] = float(self.last_stage)
        if self.memory is not None:
            out["ef_residual_norm"] = float(np.linalg.norm(self.memory))
        return out

