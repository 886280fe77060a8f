"""Every gradwire codec as a ``torch.distributed`` DDP communication hook.

One line changes how DDP's gradients travel::

    state, comm_hook = gradwire.ddp.hook("topk:ratio=0.01", model=ddp_model)
    ddp_model.register_comm_hook(state, comm_hook)

For each gradient bucket, every rank

1. encodes the bucket with its own gradwire encoder (error feedback memory, warm starts
   and predictor histories are kept per tensor name, so per bucket);
2. packs the encoded tensors into one :mod:`gradwire.codecs` frame (a header and the
   same ``gradwire.v1.EncodedTensor`` messages the parameter server receives);
3. exchanges the frames with an all-gather of variable-length byte strings: first an
   all-gather of the frame sizes (one int64 per rank), then an all-gather of uint8
   tensors padded to the largest size (collectives need equal shapes; gloo and NCCL
   both support all_gather of uint8 tensors, and the sizes let each rank cut the padding
   off). On NCCL the byte tensors live on the bucket's device;
4. decodes every rank's frame, its own included, with one decoder per sender (the
   decoder mirrors that sender's encoder, exactly as the PS keeps one decoder per
   worker), sums the decoded buckets in rank order and divides by the world size.

Every rank thus computes the same average from the same bytes in the same order, so
the replicas stay bitwise identical. Randomized codecs (``randk``, ``qsgd``, PowerSGD's
first Q) draw from ``RoundContext(round=step, rank=sender, seed)`` and the tensor name,
which holds the parameter's name (or the bucket index and position): the sender and all
receivers reproduce the same draw.

**Layouts.** ``layout="parameters"`` (default for per-tensor codecs) cuts the flat
bucket back into its parameters' gradients with their shapes, so each codec sees what
it sees on the PS (PowerSGD gets matrices, and, as in torch's own PowerSGD hook and on
the PS, sends 1-D tensors dense) and the payload bytes are those the PS would count.
``layout="bucket"`` (default for whole-model codecs: ``tpc`` / ``lag`` with
``granularity=model``) encodes the flat bucket as one tensor. ``powersgd`` refuses the
bucket layout, since a flat vector has no matrix to factor and it would go dense.
``lgc`` is refused: its decoders need the parameter server's cross-worker state.

**Bytes.** :class:`GradwireHookState` counts, per step and in total, for its own rank:
``payload_bytes`` (what the PS counts as uplink payload: payload + coefficients +
residual), ``frame_bytes`` (the frame this rank sent: payload and its self-description)
and ``padded_bytes`` (what this rank actually put into the padded all-gather, the
largest frame of the step's buckets, plus 8 bytes of size). It also records, per
sender, the frame and payload bytes it received, which a test compares with what each
sender reported.

**Cost.** Encoding and decoding run in numpy on the CPU inside the hook, which blocks
until its bucket is averaged (the returned future is already complete): there is no
overlap of a bucket's exchange with the rest of the backward pass. The hook must be
registered before the first backward, like every DDP hook. DDP may rebuild its buckets
after the first iteration; when the layout of a bucket index changes and tensor names
come from bucket positions (no ``model`` given), the codec state is reset on every rank
at the same step (counted in ``resets``); pass ``model=`` for names that survive it.
LAG's default ``lag`` trigger compares residuals with the model's recent motion; the hook
measures ``‖θ^t − θ^{t−1}‖²`` from the parameters of ``model`` (required for it) at the first
bucket of each step, keeping a float64 copy of the parameters between steps.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects
# (``bucket: dist.GradBucket``), and postponed annotations are strings.

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gradwire import codecs
from gradwire.compressors.base import CodecError, RoundContext, TensorSpec

__all__ = ["GradwireHookState", "gradwire_comm_hook", "hook"]

LAYOUTS = ("parameters", "bucket")
SIZE_BYTES = 8  # the int64 frame size each rank contributes to the size all-gather


class GradwireHookState:
    """State of the gradwire DDP hook, in the manner of torch's ``PowerSGDState``.

    Holds the rank's encoder, one decoder per rank, the step counter and the byte counts.
    ``state_dict()`` / ``load_state_dict()`` checkpoint all of it.
    """

    def __init__(
        self,
        codec: str,
        process_group: dist.ProcessGroup | None = None,
        *,
        model: torch.nn.Module | None = None,
        seed: int = 0,
        layout: str | None = None,
        max_frame_bytes: int = codecs.DEFAULT_MAX_BYTES,
    ):
        self.codec = codecs.codec_for(codec)  # refuses lgc
        if layout is None:
            layout = "bucket" if self.codec.scope == "model" else "parameters"
        if layout not in LAYOUTS:
            raise CodecError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "bucket" and self.codec.name == "powersgd":
            raise CodecError("powersgd factors matrices; a flat bucket has none and would be sent dense. "
                             "Use layout='parameters' (the default), which gives each gradient its shape.")
        self.layout = layout
        if getattr(self.codec, "trigger", None) == "lag" and model is None:
            raise CodecError(f"{self.codec.spec}: the lag trigger needs the model's motion; pass model=")
        self.process_group = process_group
        group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.seed = int(seed)
        self.max_frame_bytes = int(max_frame_bytes)
        self.param_names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        # LAG's trigger compares residuals with the model's recent motion ‖θ^t − θ^{t−1}‖², which
        # the PS worker loop measures; here the hook measures it from the parameters (identical on
        # every rank) at the first bucket of each step, before the optimizer moves them.
        self.needs_motion = getattr(self.codec, "trigger", None) == "lag"
        self.params = [p for _, p in model.named_parameters()] if self.needs_motion and model is not None else []
        self.motion_window = int(getattr(self.codec, "window", 0) or 0)
        self.motions: list[float] = []
        self.previous_params: list[torch.Tensor] | None = None
        self.encoder = self.codec.make_encoder()
        self.decoders = [self.codec.make_decoder() for _ in range(self.world_size)]
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.iter = 0
        self.resets = 0
        self.history: list[dict[str, int]] = []
        self._step = self._zero_step()
        self.total = {"payload_bytes": 0, "frame_bytes": 0, "padded_bytes": 0}
        self.received = {"frame_bytes": [0] * self.world_size, "payload_bytes": [0] * self.world_size}

    @staticmethod
    def _zero_step() -> dict[str, int]:
        return {"payload_bytes": 0, "frame_bytes": 0, "padded_bytes": 0, "buckets": 0}

    # -- bytes --------------------------------------------------------------------------------

    def bytes_report(self) -> dict[str, Any]:
        """This rank's counts: per finished step (``steps``) and in total."""
        steps = len(self.history)
        return {
            "codec": self.codec.spec,
            "rank": self.rank,
            "world_size": self.world_size,
            "steps": steps,
            "per_step": [dict(h) for h in self.history],
            "total": dict(self.total),
            "mean_payload_bytes_per_step": self.total["payload_bytes"] / steps if steps else 0.0,
            "mean_frame_bytes_per_step": self.total["frame_bytes"] / steps if steps else 0.0,
            "received_frame_bytes": list(self.received["frame_bytes"]),
            "received_payload_bytes": list(self.received["payload_bytes"]),
            "resets": self.resets,
        }

    # -- checkpoint ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "codec": self.codec.spec, "iter": self.iter, "resets": self.resets, "shapes": dict(self.shapes),
            "encoder": self.encoder.state_dict(), "decoders": [d.state_dict() for d in self.decoders],
            "history": [dict(h) for h in self.history], "total": dict(self.total),
            "received": {k: list(v) for k, v in self.received.items()},
            "motions": list(self.motions),
            "previous_params": None if self.previous_params is None else [p.clone() for p in self.previous_params],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["codec"] != self.codec.spec:
            raise CodecError(f"state is for codec {state['codec']!r}, this hook is {self.codec.spec!r}")
        if len(state["decoders"]) != self.world_size:
            raise CodecError(f"state has {len(state['decoders'])} decoders for {self.world_size} ranks")
        self.encoder.load_state_dict(state["encoder"])
        for decoder, s in zip(self.decoders, state["decoders"], strict=True):
            decoder.load_state_dict(s)
        self.iter, self.resets = int(state["iter"]), int(state["resets"])
        self.shapes = {k: tuple(v) for k, v in state["shapes"].items()}
        self.history = [dict(h) for h in state["history"]]
        self.total = dict(state["total"])
        self.received = {k: list(v) for k, v in state["received"].items()}
        self.motions = [float(m) for m in state["motions"]]
        previous = state["previous_params"]
        self.previous_params = None if previous is None else [p.clone() for p in previous]

    # -- one bucket ---------------------------------------------------------------------------

    def _specs(self, bucket: dist.GradBucket) -> list[tuple[TensorSpec, slice]]:
        """The tensors a bucket is encoded as, with their slices of the flat buffer."""
        index = bucket.index()
        if self.layout == "bucket":
            n = bucket.buffer().numel()
            return [(TensorSpec(f"bucket{index}", (n,)), slice(0, n))]
        out, offset = [], 0
        for j, p in enumerate(bucket.parameters()):
            name = self.param_names.get(id(p), f"bucket{index}.{j}")
            out.append((TensorSpec(name, tuple(p.shape)), slice(offset, offset + p.numel())))
            offset += p.numel()
        if offset != bucket.buffer().numel():
            raise CodecError(f"bucket {index}: parameters hold {offset} entries, its buffer {bucket.buffer().numel()}")
        return out

    def _check_layout(self, specs: list[tuple[TensorSpec, slice]]) -> None:
        changed = [s.name for s, _ in specs if self.shapes.get(s.name, s.shape) != s.shape]
        if changed:
            # DDP rebuilt its buckets: the memories keyed by these names no longer fit. All
            # ranks see the same rebuild at the same step, so they reset together.
            self.encoder.reset()
            for d in self.decoders:
                d.reset()
            self.shapes.clear()
            self.resets += 1
        for s, _ in specs:
            self.shapes[s.name] = s.shape

    def exchange(self, frame: bytes, device: torch.device) -> list[bytes]:
        """All-gather variable-length byte strings: sizes first, then padded uint8 tensors."""
        group = self.process_group
        size = torch.tensor([len(frame)], dtype=torch.int64, device=device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=group)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        if longest > self.max_frame_bytes:
            raise CodecError(f"a rank sends a frame of {longest} bytes (limit {self.max_frame_bytes})")
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(frame)] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
        gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine.to(device), group=group)
        self._step["padded_bytes"] += longest + SIZE_BYTES
        return [g[:n].cpu().numpy().tobytes() for g, n in zip(gathered, lengths, strict=True)]

    def _measure_motion(self) -> None:
        current = [p.detach().to("cpu", torch.float64, copy=True) for p in self.params]
        if self.previous_params is not None:
            motion = sum(float(((c - q) ** 2).sum()) for c, q in zip(current, self.previous_params, strict=True))
            self.motions = (self.motions + [motion])[-max(self.motion_window, 1):]
        self.previous_params = current

    def run(self, bucket: dist.GradBucket) -> torch.Tensor:
        buffer = bucket.buffer()
        flat = buffer.detach().to(device="cpu", dtype=torch.float32).numpy().reshape(-1)
        specs = self._specs(bucket)
        self._check_layout(specs)
        if self.needs_motion and self._step["buckets"] == 0:
            self._measure_motion()
        ctx = RoundContext(round=self.iter, rank=self.rank, seed=self.seed, num_workers=self.world_size,
                           model_motion_sq=tuple(self.motions))
        encoded = [self.encoder.encode(flat[sl].reshape(spec.shape), spec, ctx) for spec, sl in specs]
        frame = codecs.pack_frame(encoded, ctx, stateful=True)
        frames = self.exchange(frame, buffer.device)
        self._step["payload_bytes"] += sum(e.payload_bytes for e in encoded)
        self._step["frame_bytes"] += len(frame)
        self._step["buckets"] += 1

        total = np.zeros(flat.size, dtype=np.float32)
        for src, data in enumerate(frames):  # rank order: the same sum on every rank
            parsed = codecs.parse_frame(data, max_bytes=self.max_frame_bytes, max_numel=max(flat.size, 1))
            if parsed.rank != src or parsed.step != self.iter or len(parsed.tensors) != len(specs):
                raise CodecError(f"bucket {bucket.index()}: frame from rank {src} is rank {parsed.rank}, "
                                 f"step {parsed.step}, {len(parsed.tensors)} tensors; expected rank {src}, "
                                 f"step {self.iter}, {len(specs)} tensors")
            ctx_src = parsed.context
            for (spec, sl), e in zip(specs, parsed.tensors, strict=True):
                if e.spec.name != spec.name or e.spec.shape != spec.shape or e.codec != self.codec.spec:
                    raise CodecError(f"bucket {bucket.index()}: rank {src} sent {e.codec} {e.spec.name!r} "
                                     f"{list(e.spec.shape)}; expected {self.codec.spec} {spec.name!r} "
                                     f"{list(spec.shape)}")
                total[sl] += codecs.decode_tensor(self.decoders[src], e, ctx_src).reshape(-1)
            self.received["frame_bytes"][src] += len(data)
            self.received["payload_bytes"][src] += parsed.payload_bytes
        total /= np.float32(self.world_size)
        buffer.copy_(torch.from_numpy(total).to(device=buffer.device, dtype=buffer.dtype))

        if bucket.is_last():
            record = {"step": self.iter, **self._step}
            self.history.append(record)
            for key in self.total:
                self.total[key] += self._step[key]
            self._step = self._zero_step()
            self.iter += 1
        return buffer


def gradwire_comm_hook(state: GradwireHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: encode, all-gather frames, decode every rank's, average."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    try:
        fut.set_result(state.run(bucket))
    except Exception as exc:  # DDP reports a failed future's exception from backward()
        fut.set_exception(exc)  # type: ignore[arg-type]  # torch 2.13 stub types it as T
    return fut


def hook(
    codec: str,
    process_group: dist.ProcessGroup | None = None,
    *,
    model: torch.nn.Module | None = None,
    seed: int = 0,
    layout: str | None = None,
) -> tuple[GradwireHookState, Any]:
    """``(state, hook)`` for ``ddp_model.register_comm_hook(state, hook)``.

    ``codec`` is any gradwire codec spec except ``lgc``. ``model`` (the DDP module or the
    module it wraps) names the tensors after its parameters; ``seed`` seeds randomized
    codecs identically on all ranks; ``layout`` is ``"parameters"`` or ``"bucket"`` (module
    doc). Raises ``CodecError`` for a codec or layout the hook cannot run faithfully.
    """
    return GradwireHookState(codec, process_group, model=model, seed=seed, layout=layout), gradwire_comm_hook
