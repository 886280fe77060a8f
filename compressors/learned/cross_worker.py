"""LGC PS-wide state: ``LGCCrossWorkerState`` (stages, autoencoder training, leader, decoding).

Part of learned gradient compression (``lgc``, docs/algorithms.md §3; overview in
``compressors/learned/lgc.py``, the autoencoder in ``compressors/learned/lgc_model.py``).
One per parameter server: it announces each round's stage and leader, trains the
autoencoder on every worker's stage-2 updates, freezes it and ships the encoder in the
downlink blob, decodes every worker on the leader's support in stage 3 (``finalize``),
adopts stage-3 newcomers, keeps the per-stage statistics and checkpoints all of it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradwire.compressors.base import CrossWorkerState
from gradwire.compressors.learned import lgc_model
from gradwire.compressors.learned.layout import (
    Layout,
    layout_from_update,
    restrict,
    rms_scale,
    split_like,
    top_indices,
)
from gradwire.compressors.learned.payload import (
    KIND_LEADER,
    STAGE_DENSE,
    STAGE_LGC,
    STAGE_TOPK,
    Parsed,
    build_blob,
)
from gradwire.compressors.sparse import sparse_count

if TYPE_CHECKING:
    from gradwire.compressors.learned.lgc import LGCCodec


class LGCCrossWorkerState(CrossWorkerState):
    """PS-wide LGC state: the stages, the autoencoder, the leader, cross-worker decoding.

    Decoders run in the workers' gRPC handler threads and call ``stash``; the PS's
    round thread calls ``open_round`` / ``finalize`` / ``observe``: one lock guards it all.
    """

    def __init__(self, codec: LGCCodec):
        self.codec = codec
        self.lock = threading.RLock()
        self.layout: Layout | None = None
        self.ae = lgc_model.LGCAutoencoder(codec.ae_seed)
        self.enc_opt = self._optimizer(self.ae.encoder.parameters())
        self.dec_opts: dict[int, torch.optim.Optimizer] = {}
        self.frozen = False
        self.encoder_blob = b""
        self.shipped: set[int] = set()
        self.adopting: dict[int, int] = {}  # rank -> decoder steps so far (stage-3 newcomers)
        self.stage_by_round: dict[int, int] = {}
        self.leader_by_round: dict[int, int] = {}
        self.rec_by_round: dict[int, float] = {}
        self.sim_by_round: dict[int, float] = {}
        self.inn_err_by_round: dict[int, float] = {}
        self.inbox: dict[tuple[int, int], tuple[int, Parsed | None]] = {}  # (round, rank) -> (bytes, parsed)
        self.feedback: dict[int, tuple[int, np.ndarray, np.ndarray | None]] = {}
        self.not_aggregated: dict[int, int] = {}
        self.latent_of_round: tuple[int, np.ndarray, np.ndarray, float] | None = None
        self.supports: dict[int, np.ndarray] = {}  # round -> leader's support (recent rounds)
        self.bits = {s: [0, 0] for s in (STAGE_DENSE, STAGE_TOPK, STAGE_LGC)}  # stage -> [bytes, entries]
        self.encoder_bytes_shipped = 0
        self.encoder_shipments = 0
        self.decoded_from_latent = 0
        self.innovation_only = 0

    def _optimizer(self, params) -> torch.optim.Optimizer:
        if self.codec.ae_opt == "adam":
            return torch.optim.Adam(params, lr=self.codec.ae_lr)
        return torch.optim.SGD(params, lr=self.codec.ae_lr)

    def _ensure_decoder(self, rank: int) -> None:
        if not self.ae.has_decoder(rank):
            self.ae.add_decoder(rank)
            self.dec_opts[rank] = self._optimizer(self.ae.decoder(rank).parameters())

    def set_layout(self, layout: Layout) -> None:
        with self.lock:
            self.layout = layout

    # -- round protocol

    def open_round(self, round_: int, ranks: list[int]) -> dict[str, float]:
        with self.lock:
            stage = self.codec.stage_of(round_)
            leader = -1
            if stage == STAGE_LGC:
                if not self.frozen:
                    self._freeze()
                eligible = sorted(r for r in ranks if self.ae.has_decoder(r) and r not in self.adopting)
                if eligible:
                    leader = eligible[round_ % len(eligible)]
            self.stage_by_round[round_] = stage
            self.leader_by_round[round_] = leader
            return {"stage": float(stage), "leader": float(leader)}

    def _freeze(self) -> None:
        self.frozen = True
        self.ae.eval()
        for p in self.ae.parameters():
            p.requires_grad_(False)
        self.encoder_blob = lgc_model.encoder_to_bytes(self.ae.encoder)

    def blob_for(self, rank: int, round_: int) -> bytes:
        with self.lock:
            if self.stage_by_round.get(round_, self.codec.stage_of(round_)) != STAGE_LGC or self.layout is None:
                return b""
            fallback = False
            if not self.ae.has_decoder(rank):
                self._ensure_decoder(rank)  # a stage-3 newcomer: top-k while its decoder trains
                for p in self.ae.decoder(rank).parameters():
                    p.requires_grad_(True)
                self.adopting[rank] = 0
            if rank in self.adopting:
                fallback = True
            encoder = b""
            if self.leader_by_round.get(round_) == rank and rank not in self.shipped:
                encoder = self.encoder_blob
                self.shipped.add(rank)
                self.encoder_bytes_shipped += len(encoder)
                self.encoder_shipments += 1
            fb = self.feedback.get(rank)
            feedback = fb if fb is not None and fb[0] == round_ - 1 else None
            na = self.not_aggregated.get(rank)
            return build_blob(
                encoder, feedback, self.layout.dc,
                na if na is not None and na == round_ - 1 else None, fallback,
            )

    def stash(self, round_: int, rank: int, stage: int, nbytes: int, parsed: Parsed | None) -> None:
        with self.lock:
            self.inbox[(round_, rank)] = (nbytes, parsed)

    def finalize(
        self, round_: int, decoded: Mapping[int, Mapping[str, np.ndarray]]
    ) -> dict[int, dict[str, np.ndarray]]:
        with self.lock:
            if self.layout is None and decoded:
                self.layout = layout_from_update(next(iter(decoded.values())), self.codec.exempt)
            stage = self.stage_by_round.get(round_, self.codec.stage_of(round_))
            mine = {rank: v for (r, rank), v in self.inbox.items() if r == round_}
            self.inbox = {key: v for key, v in self.inbox.items() if key[0] > round_}
            out = {rank: dict(update) for rank, update in decoded.items()}
            for rank, update in decoded.items():
                self.bits[stage][0] += mine[rank][0] if rank in mine else 0
                self.bits[stage][1] += sum(int(a.size) for a in update.values())
            for rank in mine:
                if rank not in decoded:
                    self.not_aggregated[rank] = round_
            if stage != STAGE_LGC or self.layout is None:
                return out
            leader = self.leader_by_round.get(round_, -1)
            lead = mine.get(leader, (0, None))[1] if leader in decoded else None
            self.latent_of_round = None
            if lead is not None and lead.kind == KIND_LEADER:
                self.latent_of_round = (round_, lead.latent, lead.support, lead.scale)  # type: ignore[assignment]
                self.supports[round_] = lead.support  # type: ignore[assignment]
                for old in [r for r in self.supports if r < round_ - 8]:
                    del self.supports[old]
            for rank, update in decoded.items():
                parsed = mine.get(rank, (0, None))[1]
                if parsed is None:  # dense-format / top-k fallback: decoded exactly already
                    continue
                usable = (
                    self.latent_of_round is not None and self.latent_of_round[2].size > 0
                    and self.ae.has_decoder(rank) and rank not in self.adopting
                )
                if usable:
                    _, z, support, scale = self.latent_of_round  # type: ignore[misc]
                    c, on_support = self._decode_on_support(rank, parsed, z, support, scale)
                    self.decoded_from_latent += 1
                else:
                    support = np.zeros(0, dtype=np.int64)
                    on_support = np.zeros(0, dtype=np.float32)
                    c = np.zeros(self.layout.dc, dtype=np.float32)
                    c[parsed.inn_idx] = parsed.inn_vals
                    self.innovation_only += 1
                flat = self.layout.assemble(parsed.exempt_vals, c)
                out[rank] = split_like(flat, update)
                self.feedback[rank] = (
                    round_, support, on_support if self.codec.feedback == "decoded" else None
                )
            return out

    def _decode_on_support(
        self, rank: int, parsed: Parsed, z: np.ndarray, support: np.ndarray, scale: float
    ) -> tuple[np.ndarray, np.ndarray]:
        inn_on_s = restrict(parsed.inn_idx, parsed.inn_vals, support)
        rec = lgc_model.decode_values(self.ae.decoder(rank), z, inn_on_s / np.float32(scale)) * np.float32(scale)
        rec = np.nan_to_num(rec, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        c = np.zeros(self.layout.dc, dtype=np.float32)  # type: ignore[union-attr]
        if self.codec.offsupport:
            c[parsed.inn_idx] = parsed.inn_vals
        c[support] = rec
        return c, rec

    def observe(self, round_: int, decoded: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        with self.lock:
            if self.layout is None or not decoded:
                return
            stage = self.stage_by_round.get(round_, self.codec.stage_of(round_))
            if stage == STAGE_TOPK:
                self._train_round(round_, decoded)
            elif stage == STAGE_LGC and self.adopting:
                self._adopt_round(round_, decoded)

    def _compressed_part(self, update: Mapping[str, np.ndarray]) -> np.ndarray:
        flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in update.values()])
        return flat[self.layout.compressed]  # type: ignore[union-attr]

    def _pairs(self, cs: list[np.ndarray], support: np.ndarray, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs (values on the shared support) and innovations on it, scaled."""
        n_inn = sparse_count(self.layout.dc, self.codec.innovation)  # type: ignore[union-attr]
        xs, inns = [], []
        for c in cs:
            xs.append(c[support] / scale)
            inn_idx = top_indices(c, n_inn)
            inns.append(restrict(inn_idx, c[inn_idx], support) / scale)
        x = torch.from_numpy(np.stack(xs).astype(np.float32)).unsqueeze(1)
        inn = torch.from_numpy(np.stack(inns).astype(np.float32)).unsqueeze(1)
        return x, inn

    def _train_round(self, round_: int, decoded: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        ranks = sorted(decoded)
        cs = [self._compressed_part(decoded[r]) for r in ranks]
        rng = np.random.default_rng([self.codec.ae_seed, round_, 0x1C])
        shared = int(rng.integers(len(ranks)))
        support = np.flatnonzero(cs[shared])
        if support.size == 0:
            return
        scale = rms_scale(cs[shared][support]) if self.codec.normalize else 1.0
        x, inn = self._pairs(cs, support, scale)
        for r in ranks:
            self._ensure_decoder(r)
        self.ae.train()
        opts = [self.enc_opt] + [self.dec_opts[r] for r in ranks]
        energy = float(x.pow(2).mean(dim=(1, 2)).sum())
        if energy > 0:  # the same figure for "innovation only": what the autoencoder must beat
            self.inn_err_by_round[round_] = float((inn - x).pow(2).mean(dim=(1, 2)).sum()) / energy
        for step in range(self.codec.ae_steps):
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss, rec, sim = lgc_model.training_losses(self.ae, ranks, x, inn, shared, self.codec.sim, 0.5)
            if step == 0:  # the error before this round's update: an honest held-out figure
                self.rec_by_round[round_] = float(rec.sum()) / energy if energy > 0 else 0.0
                self.sim_by_round[round_] = float(sim)
            loss.backward()
            for o in opts:
                o.step()
        self.ae.eval()

    def _adopt_round(self, round_: int, decoded: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        """One decoder-only step for each stage-3 newcomer, from this round's leader latent."""
        if self.latent_of_round is None or self.latent_of_round[0] != round_:
            return
        _, z, support, scale = self.latent_of_round
        if support.size == 0:
            return
        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).unsqueeze(0)
        for rank in sorted(self.adopting):
            if rank not in decoded or self.codec.adopt == 0:
                continue
            x, inn = self._pairs([self._compressed_part(decoded[rank])], support, scale)
            dec = self.ae.decoder(rank)
            dec.train()
            opt = self.dec_opts[rank]
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = torch.nn.functional.mse_loss(dec(zt, inn), x)
                loss.backward()
            opt.step()
            dec.eval()
            self.adopting[rank] += 1
            if self.adopting[rank] >= self.codec.adopt:
                for p in dec.parameters():
                    p.requires_grad_(False)
                del self.adopting[rank]

    def forget_worker(self, rank: int) -> None:
        with self.lock:
            self.shipped.discard(rank)
            self.feedback.pop(rank, None)
            self.not_aggregated.pop(rank, None)
            self.inbox = {key: v for key, v in self.inbox.items() if key[1] != rank}

    # -- reporting and checkpoints

    def support_of_round(self, round_: int) -> np.ndarray | None:
        with self.lock:
            s = self.supports.get(round_)
            return None if s is None else s.copy()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            rounds = sorted(self.stage_by_round)
            by_stage = {
                str(s): 8.0 * b / n for s, (b, n) in self.bits.items() if n > 0
            }
            stage3 = [r for r in rounds if self.stage_by_round[r] == STAGE_LGC]
            return {
                "bits_per_entry_by_stage": by_stage,
                "stage_by_round": [self.stage_by_round[r] for r in rounds],
                "leader_by_round": [self.leader_by_round.get(r, -1) for r in rounds],
                "reconstruction_error_by_round": {str(r): v for r, v in sorted(self.rec_by_round.items())},
                "similarity_loss_by_round": {str(r): v for r, v in sorted(self.sim_by_round.items())},
                "innovation_only_error_by_round": {str(r): v for r, v in sorted(self.inn_err_by_round.items())},
                "lgc_stage_reached": max(self.stage_by_round.values()) if self.stage_by_round else 0,
                "lgc_stage3_first_round": stage3[0] if stage3 else None,
                "lgc_encoder_bytes_shipped": self.encoder_bytes_shipped,
                "lgc_encoder_shipments": self.encoder_shipments,
                "lgc_decoded_from_latent": self.decoded_from_latent,
                "lgc_innovation_only": self.innovation_only,
                "lgc_adopting": sorted(self.adopting),
                "lgc_options": self.codec.options(),
            }

    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "ae": {k: v.clone() for k, v in self.ae.state_dict().items()},
                "decoder_ranks": sorted(int(r) for r in self.ae.decoders),
                "enc_opt": self.enc_opt.state_dict(),
                "dec_opts": {r: o.state_dict() for r, o in self.dec_opts.items()},
                "frozen": self.frozen,
                "adopting": dict(self.adopting),
                "stage_by_round": dict(self.stage_by_round),
                "leader_by_round": dict(self.leader_by_round),
                "rec_by_round": dict(self.rec_by_round),
                "sim_by_round": dict(self.sim_by_round),
                "inn_err_by_round": dict(self.inn_err_by_round),
                "bits": {s: list(v) for s, v in self.bits.items()},
                "counters": {
                    "encoder_bytes_shipped": self.encoder_bytes_shipped,
                    "encoder_shipments": self.encoder_shipments,
                    "decoded_from_latent": self.decoded_from_latent,
                    "innovation_only": self.innovation_only,
                },
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self.lock:
            for r in state["decoder_ranks"]:
                self._ensure_decoder(r)
            self.ae.load_state_dict(state["ae"])
            self.enc_opt.load_state_dict(state["enc_opt"])
            for r, o in state["dec_opts"].items():
                self.dec_opts[int(r)].load_state_dict(o)
            self.adopting = {int(r): int(n) for r, n in state["adopting"].items()}
            if state["frozen"]:
                self._freeze()
                for r in self.adopting:
                    for p in self.ae.decoder(r).parameters():
                        p.requires_grad_(True)
            self.stage_by_round = dict(state["stage_by_round"])
            self.leader_by_round = dict(state["leader_by_round"])
            self.rec_by_round = dict(state["rec_by_round"])
            self.sim_by_round = dict(state["sim_by_round"])
            self.inn_err_by_round = dict(state.get("inn_err_by_round", {}))
            self.bits = {int(s): list(v) for s, v in state["bits"].items()}
            for name, value in state.get("counters", {}).items():
                setattr(self, name, int(value))
            # Workers reconnect after a restart with fresh encoders: ship again, no stale feedback.
            self.shipped.clear()
            self.feedback.clear()
            self.not_aggregated.clear()
            self.inbox.clear()
