"""LGC PS side, per worker: ``LGCDecoder`` parses a payload and checks its kind against the stage.

Part of learned gradient compression (``lgc``, docs/algorithms.md §3; overview and payload
layouts in ``compressors/learned/lgc.py``). Dense and top-k messages decode exactly here;
a stage-3 message (leader or innovation) is parsed into ``Parsed`` and stashed in the
``LGCCrossWorkerState``, whose ``finalize`` decodes every worker from the leader's latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gradwire.compressors.base import CodecError, Decoder, Encoded, RoundContext, TensorSpec, as_bytes
from gradwire.compressors.learned import lgc_model
from gradwire.compressors.learned.layout import Layout, exempt_positions, layout_for
from gradwire.compressors.learned.payload import (
    KIND_DENSE,
    KIND_INNOVATION,
    KIND_LEADER,
    KIND_NAMES,
    KIND_SPARSE,
    STAGE_DENSE,
    STAGE_LGC,
    STAGE_TOPK,
    Parsed,
    Reader,
    directive_of,
    read_latent,
    unpack_indices,
)
from gradwire.compressors.sparse import decode_sparse

if TYPE_CHECKING:
    from gradwire.compressors.learned.cross_worker import LGCCrossWorkerState
    from gradwire.compressors.learned.lgc import LGCCodec


class LGCDecoder(Decoder):
    """PS side, one per worker: parses, checks the kind against the stage, stashes stage-3 parts."""

    def __init__(self, codec: LGCCodec, shared: LGCCrossWorkerState | None):
        self.codec = codec
        self.shared = shared
        self.layout: Layout | None = None

    def set_layout(self, specs: Sequence[TensorSpec]) -> None:
        exempt = exempt_positions(specs) if self.codec.exempt else np.zeros(0, dtype=np.int64)
        self.layout = Layout(sum(s.numel for s in specs), exempt)
        if self.shared is not None:
            self.shared.set_layout(self.layout)

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        spec = msg.spec
        layout = layout_for(spec, self.layout, self.codec.exempt)
        stage, leader = directive_of(ctx)
        where = f"lgc payload for {spec.name!r} (round {ctx.round}, stage {stage})"
        if not msg.payload:
            raise CodecError(f"{where} is empty")
        kind = msg.payload[0]
        if kind not in KIND_NAMES:
            raise CodecError(f"{where}: unknown message kind {kind}")
        allowed = {
            STAGE_DENSE: {KIND_DENSE},
            STAGE_TOPK: {KIND_SPARSE},
            STAGE_LGC: {KIND_SPARSE, KIND_LEADER if ctx.rank == leader else KIND_INNOVATION},
        }[stage]
        if kind not in allowed:
            raise CodecError(
                f"{where}: a {KIND_NAMES[kind]} message is not valid here (rank {ctx.rank}, leader {leader});"
                f" expected {sorted(KIND_NAMES[a] for a in allowed)}"
            )
        r = Reader(as_bytes(msg.payload), where)
        r.take(1, "kind")
        if kind == KIND_DENSE:
            out = r.array(spec.numel, "<f4", "dense values")
            r.done()
            self._count(ctx, stage, len(msg.payload), None)
            return out
        exempt_vals = r.array(layout.m, "<f4", "exempt values")
        if kind == KIND_SPARSE:
            idx, vals = self._sparse(r.rest(), layout.dc, "top-k")
            c = np.zeros(layout.dc, dtype=np.float32)
            c[idx] = vals
            self._count(ctx, stage, len(msg.payload), None)
            return layout.assemble(exempt_vals, c)
        parsed = Parsed(kind, len(msg.payload), np.zeros(0, np.int64), np.zeros(0, np.float32), exempt_vals)
        if kind == KIND_LEADER:
            parsed.support = unpack_indices(r.take(r.u32("index length"), "indices"), layout.dc, where)
            parsed.scale = r.f32("scale")
            if not (np.isfinite(parsed.scale) and parsed.scale > 0):
                raise CodecError(f"{where}: scale {parsed.scale} is not a positive number")
            lz = lgc_model.latent_length(parsed.support.size)
            parsed.latent = read_latent(r, lgc_model.LATENT_CHANNELS * lz, self.codec.latent).reshape(
                lgc_model.LATENT_CHANNELS, lz
            )
        parsed.inn_idx, parsed.inn_vals = self._sparse(r.rest(), layout.dc, "innovation")
        self._count(ctx, stage, len(msg.payload), parsed)
        c = np.zeros(layout.dc, dtype=np.float32)
        c[parsed.inn_idx] = parsed.inn_vals  # placeholder until finalize decodes from the leader's latent
        return layout.assemble(exempt_vals, c)

    def _sparse(self, data: bytes, dc: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        return decode_sparse(data, TensorSpec(f"__model__ ({what})", (dc,)), self.codec.name)

    def _count(self, ctx: RoundContext, stage: int, nbytes: int, parsed: Parsed | None) -> None:
        if self.shared is not None:
            self.shared.stash(ctx.round, ctx.rank, stage, nbytes, parsed)

