"""Downlink compression: the PS broadcasts codec-encoded model deltas instead of full models.

Every worker holds the PS's *broadcast reference* θ̂, not the PS's model θ. Each round the PS
encodes δ = θ − θ̂ with the downlink codec, and both ends move the reference by the same decoded
delta, θ̂ ← θ̂ + D(E(δ)), with the same float32 arithmetic (``advance_reference``), so the
references stay bitwise equal. What a lossy codec drops is not lost: it stays in θ − θ̂ and is
sent in later rounds: the reference is the error feedback of the downlink.

A worker that missed a delta (it joined, reconnected, or straggled) gets the full reference
instead: a ``ModelDelta`` names the reference round it applies to. The downlink codec's decoder
must hold no state across rounds (no TPC, LAG or LGC), since every worker decodes the same
broadcast from wherever it joined, and its error feedback is off (``check_downlink_codec``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gradwire.compressors.base import Codec, RoundContext, TensorSpec
from gradwire.compressors.registry import create_codec
from gradwire.compressors.update import UpdateDecoder, UpdateEncoder
from gradwire.protocol import MalformedMessage, ModelDelta

DENSE = "dense"
# The rank in a downlink RoundContext: randomized codecs (randk) draw their indices from
# (seed, round, rank, tensor), and the broadcast belongs to no worker.
DOWNLINK_RANK = 2**31 - 1


def check_downlink_codec(spec: str) -> Codec:
    """The downlink codec of ``spec``; ValueError when it cannot serve every worker alike.

    Error feedback is switched off (``ef=0``): the reference already feeds back what a lossy
    delta dropped, since θ − θ̂ still holds it, and a codec memory would send it a second time
    (top-k with both diverged on the default task).
    """
    codec = create_codec(spec)
    if codec.scope != "tensor" or codec.has_cross_worker_state or not codec.stateless_decoder:
        raise ValueError(
            f"{codec.name} cannot be a downlink codec: its decoder keeps state across rounds (or shares "
            "PS-wide state), so a worker joining mid-run could not decode the broadcast; use e.g. fp16, "
            "topk:ratio=0.1, qsgd or ans:bits=6"
        )
    if codec.worker_momentum:
        raise ValueError(f"{codec.spec}: momentum correction has no meaning on the downlink; drop momentum=")
    return codec.without_error_feedback()


def downlink_context(round_: int, seed: int) -> RoundContext:
    return RoundContext(round=round_, rank=DOWNLINK_RANK, seed=seed, num_workers=1)


def advance_reference(reference: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """θ̂ + decoded delta, in float32: the one addition both ends perform."""
    return {name: (reference[name] + decoded[name].astype(np.float32)).astype(np.float32) for name in reference}


@dataclass(frozen=True)
class Broadcast:
    """One round's downlink: the new reference (sent in full to workers without the previous
    one) and the delta message that moves the previous reference to it."""

    round: int
    reference: dict[str, np.ndarray]
    delta: ModelDelta | None


class DownlinkEncoder:
    """PS side: the reference θ̂ and the downlink codec's encoder (with its memory)."""

    def __init__(self, codec: Codec, specs: Sequence[TensorSpec], seed: int):
        self.codec = codec
        self.specs = list(specs)
        self.seed = seed
        self.encoder = UpdateEncoder(codec, specs)
        self.decoder = UpdateDecoder(codec, specs)

    def start(self, params: Mapping[str, np.ndarray], round_: int) -> Broadcast:
        """The reference at the start (or after a resume): the model itself, sent in full."""
        self.encoder.reset()
        reference = {n: np.array(params[n], dtype=np.float32) for n in (s.name for s in self.specs)}
        return Broadcast(round_, reference, None)

    def advance(self, current: Broadcast, params: Mapping[str, np.ndarray], round_: int) -> Broadcast:
        """Encode θ − θ̂ for ``round_``; returns the next broadcast (the caller swaps it in)."""
        ctx = downlink_context(round_, self.seed)
        delta = {n: np.asarray(params[n], dtype=np.float32) - current.reference[n] for n in current.reference}
        # Where the encoder knows what every worker will decode (bit-identical, ``Encoder.reconstruction``)
        # the PS does not decode its own broadcast; it decodes the rest (a raw fallback, a codec without it).
        encoded, known = self.encoder.encode_with_reconstructions(delta, ctx)
        decoded = {}
        for spec, msg, k in zip(self.specs, encoded, known, strict=True):
            arr = k if k is not None else np.asarray(self.decoder.decoder.decode(msg, ctx), dtype=np.float32)
            decoded[spec.name] = arr.reshape(spec.shape)
        reference = advance_reference(current.reference, decoded)
        return Broadcast(round_, reference, ModelDelta(base_round=current.round, tensors=tuple(encoded)))

    def stats(self) -> dict[str, float]:
        return self.encoder.stats()


class DownlinkDecoder:
    """Worker side: applies ``ModelDelta`` messages to the reference it holds."""

    def __init__(self, codec_spec: str, specs: Sequence[TensorSpec], seed: int):
        self.codec = check_downlink_codec(codec_spec or DENSE)
        self.decoder = UpdateDecoder(self.codec, specs)
        self.seed = seed

    def apply(self, reference: Mapping[str, np.ndarray], reference_round: int, delta: ModelDelta,
              round_: int) -> dict[str, np.ndarray]:
        if delta.base_round != reference_round:
            raise MalformedMessage(
                f"model delta for reference round {delta.base_round}, but this worker holds round {reference_round}"
            )
        ctx = downlink_context(round_, self.seed)
        decoded = self.decoder.decode(delta.tensors, ctx)
        return advance_reference(reference, decoded)


def model_digest(params: Mapping[str, np.ndarray]) -> str:
    """sha256 over the float32 bytes of every tensor, in name order: equal models, equal digests."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name], dtype="<f4").tobytes())
    return h.hexdigest()
