"""Whole-update encoding: one codec applied to every parameter tensor of a model.

This is the layer the worker and the PS call. It applies the codec's scope
(per tensor, or the whole model flattened into one vector), validates what
arrives (names, shapes, codec, finite values), counts bytes for statistics, and
satisfies the needs a codec declares (``Codec.needs_layout``,
``Codec.needs_model_motion``) and the round's ``Directive``, so that callers never
look at what a particular codec wants.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradwire.compressors.base import (
    Codec,
    CodecError,
    CrossWorkerState,
    Decoder,
    Directive,
    Encoded,
    Encoder,
    RoundContext,
    TensorSpec,
    as_bytes,
)
from gradwire.compressors.bounds import check_wire_fields
from gradwire.compressors.finite import squared_norm

MODEL_TENSOR_NAME = "__model__"
# Model moves remembered for LAG-style triggers (docs/algorithms.md §1 uses D = 10).
MOTION_HISTORY = 10


class InvalidUpdate(ValueError):
    """An update that must be rejected; the message is the reason sent to the worker."""


def _model_spec(specs: Sequence[TensorSpec]) -> TensorSpec:
    return TensorSpec(MODEL_TENSOR_NAME, (sum(s.numel for s in specs),))


def wire_specs(codec: Codec, specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The tensor specs as they appear on the wire for this codec's scope."""
    return [_model_spec(specs)] if codec.scope == "model" else list(specs)


def _give_layout(codec: Codec, coder: Encoder | Decoder, specs: Sequence[TensorSpec]) -> None:
    if codec.needs_layout:
        coder.set_layout(specs)


def model_motion_sq(prev: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> float:
    """||θ_new − θ_prev||², accumulated in float64 tensor by tensor."""
    return float(sum(float(np.sum((new[k].astype(np.float64) - prev[k]) ** 2)) for k in new))


class UpdateEncoder:
    """Worker side: dict of gradients -> list of ``Encoded``.

    The worker tells it every model it receives (``model_received``) and hands it each
    round's ``Directive``; it fills the codec's ``RoundContext`` from them.
    """

    def __init__(self, codec: Codec, specs: Sequence[TensorSpec]):
        self.codec = codec
        self.specs = list(specs)
        self.encoder = codec.make_encoder()
        _give_layout(codec, self.encoder, self.specs)
        self.payload_bytes = 0
        self.entries = 0
        self.rounds = 0
        self.last_model: Mapping[str, np.ndarray] | None = None
        self.motions: list[float] = []  # newest last, at most MOTION_HISTORY

    def model_received(self, params: Mapping[str, np.ndarray]) -> None:
        """The model the worker trains on from now on (its Welcome's, then each round's)."""
        if not self.codec.needs_model_motion:
            return
        if self.last_model is not None:
            self.motions = [*self.motions, model_motion_sq(self.last_model, params)][-MOTION_HISTORY:]
        self.last_model = params

    def encode(
        self, grads: Mapping[str, np.ndarray], ctx: RoundContext, directive: Directive | None = None
    ) -> list[Encoded]:
        """Encode one round's gradients; ``directive``: what the PS's codec state sent for the round.
        Payloads may be read-only views of ``grads`` (``Encoder.encode_view``): serialize them
        before writing to the gradients."""
        return self._encode(grads, ctx, directive, None)

    def encode_with_reconstructions(
        self, grads: Mapping[str, np.ndarray], ctx: RoundContext
    ) -> tuple[list[Encoded], list[np.ndarray | None]]:
        """``encode``, and per message what the decoder will return for it (flat float32) when the
        codec's encoder knows that without decoding (``Encoder.reconstruction``), else None. The PS's
        downlink uses it to move its reference without decoding its own broadcast."""
        known: list[np.ndarray | None] = []
        return self._encode(grads, ctx, None, known), known

    def _encode(
        self, grads: Mapping[str, np.ndarray], ctx: RoundContext, directive: Directive | None,
        known: list[np.ndarray | None] | None,
    ) -> list[Encoded]:
        if directive is not None:
            ctx = dataclasses.replace(ctx, directive=dict(directive.values), directive_blob=directive.blob)
        if self.codec.needs_model_motion:
            ctx = dataclasses.replace(ctx, model_motion_sq=tuple(self.motions))
        # A round's messages are serialized before the caller touches the gradients again (the
        # worker sends them at once): payloads may be views of them. Not so for the downlink
        # (``known``), which keeps its messages as the round's broadcast while the model moves.
        encode = self.encoder.encode_view if known is None else self.encoder.encode
        if self.codec.scope == "model":
            flat = np.concatenate(
                [np.asarray(grads[s.name], dtype=np.float32).reshape(-1) for s in self.specs]
            )
            out = [encode(flat, _model_spec(self.specs), ctx)]
            if known is not None:
                known.append(None)  # one flat message: not split back into tensors here
        else:
            out = []
            for s in self.specs:
                out.append(encode(grads[s.name], s, ctx))
                if known is not None:  # asked at once: an encoder knows only its last message
                    known.append(self.encoder.reconstruction(out[-1]))
        self.payload_bytes += sum(m.payload_bytes for m in out)
        self.entries += sum(s.numel for s in self.specs)
        self.rounds += 1
        return out

    def reset(self) -> None:
        self.encoder.reset()
        self.last_model = None
        self.motions = []

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])

    def stats(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.encoder.stats().items()}
        if self.entries:
            out["bits_per_entry"] = 8.0 * self.payload_bytes / self.entries
        return out


def _with_bytes(m: Encoded) -> Encoded:
    """``m`` with its payloads as bytes (a view copied once), for a codec that does not declare
    ``Codec.decodes_views``; ``m`` itself when they are bytes already."""
    residual = _with_bytes(m.residual) if m.residual is not None else None
    if isinstance(m.payload, bytes) and isinstance(m.coefficients, bytes) and residual is m.residual:
        return m
    return dataclasses.replace(m, payload=as_bytes(m.payload), coefficients=as_bytes(m.coefficients),
                               residual=residual)


class UpdateDecoder:
    """PS side, one per worker: list of ``Encoded`` -> dict of decoded gradients.

    Raises ``InvalidUpdate`` with a reason for anything that must be rejected.
    """

    def __init__(
        self,
        codec: Codec,
        specs: Sequence[TensorSpec],
        shared: CrossWorkerState | None = None,
    ):
        self.codec = codec
        self.specs = list(specs)
        self.decoder = codec.make_decoder(shared)
        _give_layout(codec, self.decoder, self.specs)
        self.expected = {s.name: s for s in wire_specs(codec, self.specs)}

    def _check_structure(self, msgs: Sequence[Encoded]) -> None:
        names = [m.spec.name for m in msgs]
        if len(set(names)) != len(names):
            raise InvalidUpdate(f"update names a tensor twice: {sorted(names)}")
        missing = sorted(set(self.expected) - set(names))
        extra = sorted(set(names) - set(self.expected))
        if missing or extra:
            raise InvalidUpdate(f"update tensors do not match the model: missing {missing}, unexpected {extra}")
        for m in msgs:
            self._check_tensor(m, self.expected[m.spec.name])

    def _check_tensor(self, m: Encoded, want: TensorSpec) -> None:
        if tuple(m.spec.shape) != tuple(want.shape):
            raise InvalidUpdate(
                f"shape mismatch for {want.name!r}: got {list(m.spec.shape)}, model has {list(want.shape)}"
            )
        if m.spec.dtype != want.dtype:
            raise InvalidUpdate(f"dtype {m.spec.dtype!r} for {want.name!r}; expected {want.dtype!r}")
        if m.codec_name != self.codec.name:
            raise InvalidUpdate(
                f"tensor {want.name!r} is encoded with codec {m.codec_name!r}; this run uses {self.codec.spec!r}"
            )
        try:
            check_wire_fields(m, self.codec, want)  # before any decoding: bounded work and memory
        except CodecError as exc:
            raise InvalidUpdate(str(exc)) from None

    def decode(self, msgs: Sequence[Encoded], ctx: RoundContext) -> dict[str, np.ndarray]:
        return self.decode_with_norm(msgs, ctx)[0]

    def decode_with_norm(self, msgs: Sequence[Encoded], ctx: RoundContext) -> tuple[dict[str, np.ndarray], float]:
        """``decode``, and the update's L2 norm (what the PS clips by), from the one read of each
        decoded tensor that also proves it finite (``squared_norm``: a BLAS dot product, NaN or
        Inf when any entry is), instead of a finiteness read and a norm read after it."""
        self._check_structure(msgs)
        decoded: dict[str, np.ndarray] = {}
        total = 0.0
        for m in msgs:
            if not self.codec.decodes_views:
                m = _with_bytes(m)
            try:
                arr = self.decoder.decode(m, ctx)
            except (CodecError, ValueError, IndexError, KeyError, RuntimeError) as exc:
                raise InvalidUpdate(f"payload of {m.spec.name!r} does not decode: {exc}") from None
            arr = np.asarray(arr, dtype=np.float32)
            if arr.size != m.spec.numel:
                raise InvalidUpdate(f"payload of {m.spec.name!r} decodes to {arr.size} entries, expected {m.spec.numel}")
            squared = squared_norm(arr)
            if squared is None:
                raise InvalidUpdate(f"tensor {m.spec.name!r} decodes to NaN or Inf values")
            total += squared
            decoded[m.spec.name] = arr.reshape(m.spec.shape)
        if self.codec.scope == "model":
            flat = decoded[MODEL_TENSOR_NAME].reshape(-1)
            out, offset = {}, 0
            for s in self.specs:
                out[s.name] = flat[offset : offset + s.numel].reshape(s.shape)
                offset += s.numel
            return out, math.sqrt(total)
        return decoded, math.sqrt(total)

    def reset(self) -> None:
        self.decoder.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"decoder": self.decoder.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decoder.load_state_dict(state["decoder"])

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.decoder.stats().items()}
