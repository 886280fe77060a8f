"""The codec interface: pure encoders and decoders with explicit, mirrored state.

A codec never does I/O. The worker holds one ``Encoder`` per session; the PS holds
one ``Decoder`` per worker. Anything both ends must agree on (predictor history,
entropy model, quantizer table) is updated on both sides only from *decoded*
values, in the same order (docs/algorithms.md §0), and both sides expose
``state_dict()`` / ``load_state_dict()`` / ``reset()`` so that a reconnect or a
restart can resync them explicitly.
"""

from __future__ import annotations

import dataclasses
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from gradwire.compressors.finite import all_finite

FLOAT_DTYPE = "float32"
# A codec's bytes: ``bytes``, or a read-only ``memoryview`` of memory nobody changes while the
# message is in use: on the PS, of the received message (for codecs that declare
# ``Codec.decodes_views``); on the worker, of the gradient being sent (``Encoder.encode_view``).
Payload = bytes | memoryview


def as_bytes(payload: Payload) -> bytes:
    """The payload as ``bytes`` for code that needs them: ``bytes`` as they are (no copy), a view
    copied once."""
    return payload if isinstance(payload, bytes) else bytes(payload)


class CodecError(ValueError):
    """A codec cannot encode its input or decode a payload; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver knows about a tensor before any payload arrives."""

    name: str  # stable key across rounds, e.g. "layers.0.weight"
    shape: tuple[int, ...]
    dtype: str = FLOAT_DTYPE  # numpy dtype of the *decoded* tensor

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class Encoded:
    """One encoded tensor; mirrors ``gradwire.v1.EncodedTensor``.

    ``payload`` holds the codec's bytes with all side information (scales,
    distribution parameters, indices). Temporal predictive coding adds its
    predictor coefficients and an optional residual, itself encoded by another
    codec, as separate wire fields so a capture shows what was sent.
    """

    codec: str  # codec spec string, "name:key=value,..."
    spec: TensorSpec
    payload: Payload = b""
    coefficients: Payload = b""
    residual: Encoded | None = None

    @property
    def codec_name(self) -> str:
        return self.codec.split(":", 1)[0]

    @property
    def payload_bytes(self) -> int:
        """Bytes the method claims to send: payload + coefficients + residual."""
        inner = self.residual.payload_bytes if self.residual is not None else 0
        return len(self.payload) + len(self.coefficients) + inner


@dataclass(frozen=True)
class Directive:
    """What the PS's cross-worker codec state tells one worker's encoder for a round.

    ``values`` are the same for every worker (e.g. LGC's stage and leader); ``blob`` is for this
    worker only (LGC's stage-3 support and error feedback) and is counted as downlink bytes.
    """

    values: Mapping[str, float] = field(default_factory=dict)
    blob: bytes = b""


@dataclass(frozen=True)
class RoundContext:
    """Round-level facts both ends know without sending them in the payload."""

    round: int
    rank: int
    seed: int = 0
    num_workers: int = 1
    # The round's Directive from the codec's cross-worker state (e.g. LGC stage, leader), and,
    # at the worker, its blob; the update layer fills both.
    directive: Mapping[str, float] = field(default_factory=dict)
    directive_blob: bytes = b""
    # Squared norms of the most recent model moves ||θ^t − θ^{t−1}||², newest last; the
    # worker's update layer fills this for codecs that declare needs_model_motion (LAG-style
    # triggers run at the encoder).
    model_motion_sq: tuple[float, ...] = ()

    def rng(self, tensor_name: str, salt: int = 0) -> np.random.Generator:
        """A generator both ends can reproduce from (seed, round, rank, tensor)."""
        key = zlib.crc32(tensor_name.encode())
        return np.random.default_rng([self.seed, self.round, self.rank, key, salt])


class Encoder(ABC):
    """Worker side. Holds whatever state the codec needs between rounds."""

    @abstractmethod
    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded: ...

    def encode_view(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        """``encode``, where the payload may be a read-only view of ``x`` instead of a copy (the
        dense codec's payload is ``x``'s bytes): for a caller that serializes the message before
        anything writes to ``x`` (``UpdateEncoder.encode``: the worker sends it at once)."""
        return self.encode(x, spec, ctx)

    def reset(self) -> None:  # noqa: B027 - stateless codecs have nothing to forget
        """Forget all state (resync)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise CodecError(f"{type(self).__name__} has no state to load")

    def stats(self) -> dict[str, float]:
        """Codec-specific statistics accumulated since the last reset."""
        return {}

    def reconstruction(self, msg: Encoded) -> np.ndarray | None:
        """What the decoder returns for ``msg``, the message this encoder produced last (flat
        float32, bit-identical), when the encoder knows it without decoding; else None.

        Error feedback asks for it before decoding its own message a second time: an encoder
        that already knows its symbols saves the entropy decode (tests check it against the decoder).
        """
        return None

    def set_layout(self, specs: Sequence[TensorSpec]) -> None:  # noqa: B027 - a need most codecs lack
        """The model's tensors, given once before the first round to a codec that declares
        ``needs_layout`` (a model-scope codec sees one flat vector otherwise)."""


class Decoder(ABC):
    """PS side, one per worker. Mirrors the worker's encoder state."""

    @abstractmethod
    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray: ...

    def reset(self) -> None:  # noqa: B027 - stateless codecs have nothing to forget
        """Forget all state (resync)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise CodecError(f"{type(self).__name__} has no state to load")

    def stats(self) -> dict[str, float]:
        return {}

    def set_layout(self, specs: Sequence[TensorSpec]) -> None:  # noqa: B027 - a need most codecs lack
        """As ``Encoder.set_layout``."""


@dataclass(frozen=True, slots=True)  # the PS keeps one per worker and round: no __dict__ each
class LinkSample:
    """One worker's link as the PS measured it for one round (``CrossWorkerState.observe_link``).

    ``downlink_bytes``: the serialized model message (RoundResult) the PS sent the worker before this
    update; ``uplink_bytes``: the serialized update; ``transfer_seconds``: the update's arrival minus
    the model message's send minus ``compute_seconds``, which the worker reports (``Update``
    field 5; it covers training and encoding, and is the worker's word: check it before use).
    """

    round: int
    downlink_bytes: int
    uplink_bytes: int
    transfer_seconds: float
    compute_seconds: float


class CrossWorkerState:
    """The PS-wide state of a codec, shared by all of its decoders: the one channel between a
    stateful codec and the parameter server.

    The round engine calls every hook, in this order, for every codec; the defaults do nothing,
    so a codec overrides only what it needs (learned compression trains one autoencoder on every
    worker's updates and decodes worker i from the leader's latent). The engine has no
    codec-specific branch: a new stateful codec changes only ``compressors/``.

    Per round: ``open_round`` (directive values for every worker), ``blob_for`` (one worker's
    directive bytes), the decoders run, ``finalize`` (cross-worker decoding), the model steps,
    ``observe``. As each update arrives: ``observe_link`` (the PS's measurement of that worker's
    link; bandwidth-adaptive compression chooses rates from it). Any time: ``forget_worker`` (a worker left or was rejected). Checkpoints:
    ``state_dict`` / ``load_state_dict``. Summary: ``stats``.
    """

    def open_round(self, round_: int, ranks: list[int]) -> Mapping[str, float]:
        """A round opens for the workers ``ranks``: the directive values every worker gets."""
        return {}

    def blob_for(self, rank: int, round_: int) -> bytes:
        """Extra directive bytes for one worker this round (counted as downlink)."""
        return b""

    def directive_for(self, rank: int, round_: int, values: Mapping[str, float]) -> Directive:
        """One worker's directive: the round's ``values`` (from ``open_round``) and its blob."""
        return Directive(values=dict(values), blob=self.blob_for(rank, round_))

    def finalize(
        self, round_: int, decoded: Mapping[int, Mapping[str, np.ndarray]]
    ) -> dict[int, dict[str, np.ndarray]]:
        """Cross-worker decoding, after every update of the round has been decoded.

        Called before aggregation with each aggregated worker's decoder output (by
        rank); returns the updates to aggregate. Learned compression decodes
        worker i from the leader's latent here, which only exists once the
        leader's message has arrived. Raise ``CodecError`` to reject nobody but
        flag the round; the default passes the updates through unchanged.
        """
        return {rank: dict(update) for rank, update in decoded.items()}

    def observe(self, round_: int, decoded: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        """Called after a round closes with every aggregated worker's decoded update."""

    def observe_link(self, rank: int, sample: LinkSample) -> None:
        """The PS measured worker ``rank``'s link in round ``sample.round`` (bytes both ways, transfer
        time); called once per accepted update, except right after a Welcome (the worker then also
        loads its data, which no compute time covers)."""

    def forget_worker(self, rank: int) -> None:
        """A worker left or was rejected: drop whatever was kept for it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Codec(ABC):
    """A configured codec: a factory of encoders and decoders.

    Subclasses are frozen dataclasses whose fields are the spec options, so
    ``topk:ratio=0.01`` becomes ``TopKCodec(ratio=0.01)``. Validate options in
    ``__post_init__`` with a reason in the error.
    """

    name: ClassVar[str]
    # "tensor": one Encoded per parameter tensor; "model": the whole update is
    # flattened into one vector named MODEL_TENSOR_NAME (global predictors, LGC).
    scope: ClassVar[str] = "tensor"
    # False when a decoder carries state from round to round (a predictor history): such a
    # codec cannot encode the PS's broadcast, which workers start decoding at any round.
    stateless_decoder: ClassVar[bool] = True
    # Declared needs, which the update layer (compressors/update.py) satisfies; a codec never
    # asks its caller for more. needs_layout: the encoder's and decoder's set_layout get the
    # model's tensor specs. needs_model_motion: ctx.model_motion_sq holds the worker's recent
    # model moves (LAG-style triggers). has_cross_worker_state: make_cross_worker_state returns
    # state of its own, which the PS shares between the codec's decoders.
    needs_layout: ClassVar[bool] = False
    needs_model_motion: ClassVar[bool] = False
    has_cross_worker_state: ClassVar[bool] = False
    # True when the decoder takes payloads and coefficients as read-only memoryviews of the
    # received message (``Payload``) without copying them first. The PS reads an update's
    # payloads as such views (``protocol.worker_message_from_wire``); for the other codecs the
    # update layer copies them into bytes before decoding, as protobuf did (one copy, not two).
    decodes_views: ClassVar[bool] = False

    @abstractmethod
    def make_encoder(self) -> Encoder: ...

    @abstractmethod
    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder: ...

    def make_cross_worker_state(self) -> CrossWorkerState:
        """The PS-wide state for a run; the default has none (every hook is a no-op)."""
        return CrossWorkerState()

    def without_error_feedback(self) -> Codec:
        """This codec with its error-feedback memory off (the ``ef`` option, by convention), or itself."""
        return dataclasses.replace(self, ef=False) if "ef" in option_defaults(self) else self  # type: ignore[call-arg]

    @property
    def worker_momentum(self) -> float:
        """Heavy-ball momentum the workers' encoders already apply (DGC momentum correction).

        When it is nonzero the PS steps with plain SGD by default: momentum is applied once.
        """
        return 0.0

    @property
    def spec(self) -> str:
        """Canonical spec string: the name plus every option that differs from its default."""
        parts = []
        for name, default in option_defaults(self).items():
            value = getattr(self, name)
            if value != (None if default is dataclasses.MISSING else default):
                parts.append(f"{name}={format_option(value)}")
        return self.name + (":" + ",".join(parts) if parts else "")


def option_defaults(codec: Codec | type[Codec]) -> dict[str, Any]:
    """Each spec option of a codec (class) with its default, in declaration order;
    ``dataclasses.MISSING`` where an option has none."""
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        for f in dataclasses.fields(codec)
    }


def format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(int(value)) if abs(value) < 1e15 else repr(value)
    if isinstance(value, str) and ("," in value or ":" in value):
        return f"({value})"
    return str(value)


class StatelessEncoder(Encoder):
    def __init__(self, codec: TensorCodec):
        self.codec = codec

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        x = check_input(x, spec)
        return Encoded(self.codec.spec, spec, self.codec.encode_array(x, spec, ctx))

    def encode_view(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        x = check_input(x, spec)
        return Encoded(self.codec.spec, spec, self.codec.encode_array_view(x, spec, ctx))


class StatelessDecoder(Decoder):
    def __init__(self, codec: TensorCodec):
        self.codec = codec

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        out = self.codec.decode_view(msg.payload, msg.spec, ctx)
        return out.reshape(msg.spec.shape)


@dataclass(frozen=True)
class TensorCodec(Codec):
    """A codec with no state between rounds: bytes in, array out."""

    @abstractmethod
    def encode_array(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> bytes: ...

    @abstractmethod
    def decode_array(self, payload: bytes, spec: TensorSpec, ctx: RoundContext) -> np.ndarray: ...

    def decode_view(self, payload: Payload, spec: TensorSpec, ctx: RoundContext) -> np.ndarray:
        """``decode_array`` of a payload that may be a view; a codec that declares
        ``decodes_views`` decodes it as it is, the others get bytes."""
        return self.decode_array(as_bytes(payload), spec, ctx)

    def encode_array_view(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Payload:
        """``encode_array``, or a read-only view of ``x`` when the payload is ``x``'s own bytes
        (``Encoder.encode_view`` says when a caller may use it)."""
        return self.encode_array(x, spec, ctx)

    def make_encoder(self) -> Encoder:
        return StatelessEncoder(self)

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return StatelessDecoder(self)


def check_input(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Validate an encoder's input: right size, finite; returns a flat float32 view."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.size != spec.numel:
        raise CodecError(f"tensor {spec.name!r} has {arr.size} entries, spec says {spec.numel}")
    if not all_finite(arr):
        raise CodecError(f"tensor {spec.name!r} contains NaN or Inf; refusing to encode it")
    return arr.reshape(-1)


def expect_payload_size(payload: Payload, expected: int, spec: TensorSpec, codec: str) -> None:
    if len(payload) != expected:
        raise CodecError(
            f"{codec} payload for {spec.name!r} is {len(payload)} bytes, expected {expected}"
        )
