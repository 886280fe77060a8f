"""Learned gradient compression, parameter-server variant (``lgc``).

Abrahamyan, Chen, Bekoulis, Deligiannis, "Learned Gradient Compression for
Distributed Deep Learning" (IEEE TNNLS 2021; seed 002, docs/algorithms.md §3).
Workers' gradients are correlated, so an autoencoder trained on them during
training can carry their common part in one worker's code. Three stages, driven
by the PS and announced in every round's directive (``stage``, ``leader``):

1. **Dense warm-up** (``warmup`` rounds): float32 updates.
2. **Top-k with error feedback** (``train`` rounds, ratio ``k``): the PS trains the
   autoencoder (``compressors/lgc_model.py``) on the received top-k values, one
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
    kind u8 = 1 sparse     m × f32 | topk sparse layout of c (compressors/topk.py)
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
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from gradwire.compressors import lgc_model
from gradwire.compressors.base import (
    Codec,
    CodecError,
    CrossWorkerState,
    Decoder,
    Encoded,
    Encoder,
    RoundContext,
    TensorSpec,
    check_input,
)
from gradwire.compressors.registry import register
from gradwire.compressors.topk import (
    HEADER,
    INDEX_BITMAP,
    INDEX_RICE,
    MAX_RICE_BITS,
    decode_sparse,
    encode_indices,
    encode_sparse,
    rice_decode,
    sparse_count,
)

STAGE_DENSE, STAGE_TOPK, STAGE_LGC = 1, 2, 3
KIND_DENSE, KIND_SPARSE, KIND_LEADER, KIND_INNOVATION = 0, 1, 2, 3
KIND_NAMES = {KIND_DENSE: "dense", KIND_SPARSE: "sparse", KIND_LEADER: "leader", KIND_INNOVATION: "innovation"}

BLOB_ENCODER = 0x01
BLOB_FEEDBACK = 0x02
BLOB_NOT_AGGREGATED = 0x04
BLOB_FALLBACK = 0x08
BLOB_FLAGS = BLOB_ENCODER | BLOB_FEEDBACK | BLOB_NOT_AGGREGATED | BLOB_FALLBACK

U32 = struct.Struct("<I")
F32 = struct.Struct("<f")
LATENT_KINDS = ("fp32", "fp16", "int8")
FEEDBACK_KINDS = ("decoded", "support")
AE_OPTIMIZERS = ("adam", "sgd")


# ---------------------------------------------------------------- index coding


def pack_indices(indices: np.ndarray, numel: int) -> bytes:
    """Sorted unique indices in topk's index code (Rice gaps or bitmap), without values."""
    if indices.size == 0:
        return HEADER.pack(INDEX_RICE, 0)
    mode, head, tail, _ = encode_indices(indices.astype(np.int64, copy=False), numel)
    return HEADER.pack(mode, int(indices.size)) + head + tail


def unpack_indices(buf: bytes, numel: int, where: str) -> np.ndarray:
    """Inverse of ``pack_indices``; CodecError with a reason on anything malformed."""
    if len(buf) < HEADER.size:
        raise CodecError(f"{where}: index block is {len(buf)} bytes, shorter than its header")
    mode, count = HEADER.unpack_from(buf)
    if count > numel:
        raise CodecError(f"{where}: {count} indices announced, the vector has only {numel} entries")
    if count == 0:
        if len(buf) != HEADER.size or mode != INDEX_RICE:
            raise CodecError(f"{where}: malformed empty index block")
        return np.zeros(0, dtype=np.int64)
    body = buf[HEADER.size :]
    if mode == INDEX_RICE:
        if not body:
            raise CodecError(f"{where}: missing the Rice parameter")
        b = body[0]
        if b > MAX_RICE_BITS:
            raise CodecError(f"{where}: Rice parameter {b} > {MAX_RICE_BITS}")
        low_len = (count * b + 7) // 8
        if len(body) < 1 + low_len + 1:
            raise CodecError(f"{where}: index block ends inside the Rice streams")
        gaps = rice_decode(body[1 : 1 + low_len], body[1 + low_len :], count, b, numel, where)
        if int(np.sum(gaps + 1, dtype=np.uint64)) > numel:
            raise CodecError(f"{where}: indices run past the end of the vector ({numel} entries)")
        return np.cumsum(gaps + 1) - 1
    if mode == INDEX_BITMAP:
        if len(body) != (numel + 7) // 8:
            raise CodecError(f"{where}: bitmap is {len(body)} bytes, expected {(numel + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8))
        if bits[numel:].any():
            raise CodecError(f"{where}: nonzero padding bits in the bitmap")
        idx = np.flatnonzero(bits[:numel])
        if idx.size != count:
            raise CodecError(f"{where}: bitmap marks {idx.size} entries, header says {count}")
        return idx
    raise CodecError(f"{where}: unknown index code {mode}")


class Reader:
    """Bounds-checked reads from a payload or blob."""

    def __init__(self, data: bytes, where: str):
        self.data = data
        self.pos = 0
        self.where = where

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f"{self.where}: ends inside the {what} ({len(self.data)} bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return U32.unpack(self.take(4, what))[0]

    def f32(self, what: str) -> float:
        return F32.unpack(self.take(4, what))[0]

    def array(self, count: int, dtype: str, what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        arr = np.frombuffer(self.take(count * dt.itemsize, what), dtype=dt).astype(np.float32)
        if not np.isfinite(arr).all():
            raise CodecError(f"{self.where}: the {what} contain NaN or Inf")
        return arr

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def done(self) -> None:
        if self.pos != len(self.data):
            raise CodecError(f"{self.where}: {len(self.data) - self.pos} unexpected trailing bytes")


# ---------------------------------------------------------------- shared helpers


def exempt_positions(specs: Sequence[TensorSpec]) -> np.ndarray:
    """Flat positions of the first and last module's tensors (first layer, classifier)."""
    if not specs:
        return np.zeros(0, dtype=np.int64)

    def module(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else name

    first, last = module(specs[0].name), module(specs[-1].name)
    out, offset = [], 0
    for s in specs:
        if module(s.name) in (first, last):
            out.append(np.arange(offset, offset + s.numel, dtype=np.int64))
        offset += s.numel
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class Layout:
    """How the flat model vector splits into exempt (dense) and compressed entries."""

    def __init__(self, numel: int, exempt: np.ndarray):
        self.numel = int(numel)
        self.exempt = np.asarray(exempt, dtype=np.int64)
        mask = np.ones(self.numel, dtype=bool)
        mask[self.exempt] = False
        self.compressed = np.flatnonzero(mask)

    @property
    def m(self) -> int:
        return int(self.exempt.size)

    @property
    def dc(self) -> int:
        return int(self.compressed.size)

    def assemble(self, exempt_values: np.ndarray, c: np.ndarray) -> np.ndarray:
        out = np.zeros(self.numel, dtype=np.float32)
        out[self.exempt] = exempt_values
        out[self.compressed] = c
        return out


def top_indices(v: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of the ``count`` largest |v|, nonzero entries only."""
    n = v.size
    if count <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if count < n:
        idx = np.argpartition(np.abs(v), n - count)[n - count :]
    else:
        idx = np.arange(n)
    idx = np.sort(idx)
    return idx[v[idx] != 0]


def quantize_latent(z: np.ndarray, kind: str) -> bytes:
    flat = np.ascontiguousarray(z, dtype=np.float32).reshape(-1)
    if kind == "fp32":
        return flat.astype("<f4").tobytes()
    if kind == "fp16":
        return np.clip(flat, -65504.0, 65504.0).astype("<f2").tobytes()
    peak = float(np.max(np.abs(flat))) if flat.size else 0.0
    step = peak / 127.0 if peak > 0 else 1.0
    q = np.clip(np.rint(flat / step), -127, 127).astype(np.int8)
    return F32.pack(step) + q.tobytes()


def read_latent(reader: Reader, count: int, kind: str) -> np.ndarray:
    if kind == "fp32":
        return reader.array(count, "<f4", "latent")
    if kind == "fp16":
        return reader.array(count, "<f2", "latent")
    step = reader.f32("latent step")
    if not np.isfinite(step) or step <= 0:
        raise CodecError(f"{reader.where}: latent step {step} is not a positive number")
    q = np.frombuffer(reader.take(count, "latent"), dtype=np.int8)
    if (q == -128).any():
        raise CodecError(f"{reader.where}: latent code -128 is outside the symmetric int8 range")
    return q.astype(np.float32) * np.float32(step)


def rms_scale(x: np.ndarray) -> float:
    s = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return s if np.isfinite(s) and s > 0 else 1.0


def restrict(indices: np.ndarray, values: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Values of the sparse vector (indices, values) at the sorted ``support`` positions."""
    out = np.zeros(support.size, dtype=np.float32)
    if indices.size == 0 or support.size == 0:
        return out
    pos = np.searchsorted(support, indices)
    pos_c = np.minimum(pos, support.size - 1)
    hit = support[pos_c] == indices
    out[pos_c[hit]] = values[hit]
    return out


# ---------------------------------------------------------------- codec


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


def _directive(ctx: RoundContext) -> tuple[int, int]:
    """(stage, leader) announced by the PS; no directive means stage 1 (dense) at both ends."""
    try:
        stage = int(ctx.directive.get("stage", STAGE_DENSE))
        leader = int(ctx.directive.get("leader", -1))
    except (TypeError, ValueError) as exc:
        raise CodecError(f"lgc directive is malformed: {dict(ctx.directive)}") from exc
    if stage not in (STAGE_DENSE, STAGE_TOPK, STAGE_LGC):
        raise CodecError(f"lgc directive names unknown stage {stage}")
    return stage, leader


def _layout_for(spec: TensorSpec, layout: Layout | None, exempt: bool) -> Layout:
    if layout is not None:
        if layout.numel != spec.numel:
            raise CodecError(f"lgc layout has {layout.numel} entries, tensor {spec.name!r} has {spec.numel}")
        return layout
    if exempt:
        raise CodecError("lgc exempt=1 needs the model layout (set_layout), which this caller did not give")
    return Layout(spec.numel, np.zeros(0, dtype=np.int64))


@dataclass
class Blob:
    """A parsed downlink blob."""

    flags: int = 0
    encoder: bytes = b""
    feedback_round: int = -1
    support: np.ndarray | None = None
    decoded: np.ndarray | None = None
    not_aggregated_round: int = -1


def parse_blob(data: bytes, dc: int, feedback: str) -> Blob:
    if not data:
        return Blob()
    r = Reader(data, "lgc downlink blob")
    flags = r.take(1, "flags")[0]
    if flags & ~BLOB_FLAGS:
        raise CodecError(f"lgc downlink blob: unknown flag bits 0x{flags:02x}")
    out = Blob(flags=flags)
    if flags & BLOB_ENCODER:
        out.encoder = r.take(r.u32("encoder length"), "encoder weights")
    if flags & BLOB_FEEDBACK:
        out.feedback_round = r.u32("feedback round")
        out.support = unpack_indices(r.take(r.u32("support length"), "support"), dc, "lgc feedback support")
        if feedback == "decoded":
            out.decoded = r.array(out.support.size, "<f4", "decoded values")
    if flags & BLOB_NOT_AGGREGATED:
        out.not_aggregated_round = r.u32("not-aggregated round")
    r.done()
    return out


def build_blob(
    encoder: bytes = b"",
    feedback: tuple[int, np.ndarray, np.ndarray | None] | None = None,
    dc: int = 0,
    not_aggregated: int | None = None,
    fallback: bool = False,
) -> bytes:
    flags, parts = 0, []
    if encoder:
        flags |= BLOB_ENCODER
        parts.append(U32.pack(len(encoder)) + encoder)
    if feedback is not None:
        flags |= BLOB_FEEDBACK
        round_, support, values = feedback
        idx = pack_indices(support, dc)
        parts.append(U32.pack(round_) + U32.pack(len(idx)) + idx)
        if values is not None:
            parts.append(np.asarray(values, dtype="<f4").tobytes())
    if not_aggregated is not None:
        flags |= BLOB_NOT_AGGREGATED
        parts.append(U32.pack(not_aggregated))
    if fallback:
        flags |= BLOB_FALLBACK
    if not flags:
        return b""
    return bytes([flags]) + b"".join(parts)


# ---------------------------------------------------------------- worker side


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
        layout = _layout_for(spec, self.layout, self.codec.exempt)
        stage, leader = _directive(ctx)
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


# ---------------------------------------------------------------- PS side


@dataclass
class Parsed:
    """What a decoder read from one stage-3 message, for the cross-worker state."""

    kind: int
    payload_bytes: int
    inn_idx: np.ndarray
    inn_vals: np.ndarray
    exempt_vals: np.ndarray
    support: np.ndarray | None = None
    scale: float = 1.0
    latent: np.ndarray | None = None


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
        layout = _layout_for(spec, self.layout, self.codec.exempt)
        stage, leader = _directive(ctx)
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
        r = Reader(msg.payload, where)
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
                self.layout = _layout_from_update(next(iter(decoded.values())), self.codec.exempt)
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
                out[rank] = _split_like(flat, update)
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


def _split_like(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, a in like.items():
        n = int(np.asarray(a).size)
        out[name] = flat[offset : offset + n].reshape(np.shape(a))
        offset += n
    if offset != flat.size:
        raise CodecError(f"lgc: decoded update has {flat.size} entries, the model {offset}")
    return out


def _layout_from_update(update: Mapping[str, np.ndarray], exempt: bool) -> Layout:
    """The layout from a decoded update's tensor names and shapes (when no decoder set it)."""
    specs = [TensorSpec(name, tuple(np.shape(a))) for name, a in update.items()]
    positions = exempt_positions(specs) if exempt else np.zeros(0, dtype=np.int64)
    return Layout(sum(s.numel for s in specs), positions)
