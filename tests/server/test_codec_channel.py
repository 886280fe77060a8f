"""The one channel between a stateful codec and the PS, used by a codec that exists only here.

``ScaledCodec`` is defined and registered in this file alone, with no edit to server/, worker/
or gradwire/: it uses every part of the interface through real loopback PS rounds.

* directive: each round the cross-worker state announces a scale (``open_round``) and gives
  every worker a blob naming its rank and the round (``blob_for``); the encoder refuses to
  encode without the right blob and sends its gradient times the scale;
* finalize: the decoders hand the PS the scaled updates and only the cross-worker state divides
  them back, so the run is bit for bit the dense run exactly when ``finalize`` is applied;
* forget: every worker that leaves is forgotten; state: the state survives a checkpoint;
* declared needs: the encoder refuses to run without the tensor layout or, after its first
  round, without the model's recent moves.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from gradwire.compressors import registry
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

BLOB = struct.Struct("<ii")  # rank, round


def scale_of(round_: int) -> float:
    return 2.0 ** (1 + round_ % 3)  # powers of two: x * s / s == x exactly in float32


class ScaledState(CrossWorkerState):
    def __init__(self) -> None:
        self.scales: dict[int, float] = {}
        self.finalized = 0
        self.forgotten: list[int] = []

    def open_round(self, round_: int, ranks: list[int]) -> Mapping[str, float]:
        self.scales[round_] = scale_of(round_)
        return {"scale": self.scales[round_]}

    def blob_for(self, rank: int, round_: int) -> bytes:
        return BLOB.pack(rank, round_)

    def finalize(self, round_, decoded):
        self.finalized += 1
        s = np.float32(self.scales[round_])
        return {rank: {n: a / s for n, a in update.items()} for rank, update in decoded.items()}

    def forget_worker(self, rank: int) -> None:
        self.forgotten.append(rank)

    def state_dict(self) -> dict[str, Any]:
        return {"finalized": self.finalized}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.finalized = int(state["finalized"])

    def stats(self) -> dict[str, Any]:
        return {"finalized_rounds": self.finalized, "forgotten_workers": len(self.forgotten)}


class ScaledEncoder(Encoder):
    def __init__(self) -> None:
        self.layout: list[TensorSpec] | None = None
        self.rounds = 0

    def set_layout(self, specs: Sequence[TensorSpec]) -> None:
        self.layout = list(specs)

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        if self.layout is None or sum(s.numel for s in self.layout) != spec.numel:
            raise CodecError("no model layout")
        if len(ctx.directive_blob) != BLOB.size or BLOB.unpack(ctx.directive_blob) != (ctx.rank, ctx.round):
            raise CodecError(f"directive blob {ctx.directive_blob!r} is not for rank {ctx.rank}, round {ctx.round}")
        if self.rounds and not ctx.model_motion_sq:
            raise CodecError("no model motion after the first round")
        self.rounds += 1
        scaled = check_input(x, spec) * np.float32(ctx.directive["scale"])
        return Encoded(ScaledCodec.name, spec, ctx.directive_blob + scaled.astype("<f4").tobytes())


class ScaledDecoder(Decoder):
    def __init__(self, shared: ScaledState) -> None:
        self.shared = shared

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        if msg.payload[: BLOB.size] != self.shared.blob_for(ctx.rank, ctx.round):
            raise CodecError("payload does not echo this worker's directive")
        return np.frombuffer(msg.payload[BLOB.size :], dtype="<f4").copy()


@dataclass(frozen=True)
class ScaledCodec(Codec):
    name = "test_scaled"
    scope = "model"
    stateless_decoder = False
    needs_layout = True
    needs_model_motion = True
    has_cross_worker_state = True

    def make_encoder(self) -> Encoder:
        return ScaledEncoder()

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        assert isinstance(shared, ScaledState)
        return ScaledDecoder(shared)

    def make_cross_worker_state(self) -> CrossWorkerState:
        return ScaledState()


@pytest.fixture
def scaled_codec():
    registry.available_codecs()  # load the real codecs first
    registry.register(ScaledCodec)
    yield ScaledCodec.name
    del registry.CODECS[ScaledCodec.name]


def test_a_stateful_codec_defined_outside_the_package_runs_through_the_interface(
    scaled_codec, make_server, run_workers, tmp_path
):
    rounds, workers = 4, 2
    dense = make_server(workers=workers, rounds=rounds)
    dense_results = run_workers(dense.port, workers, "d")
    dense.thread.join(30)
    toy = make_server(workers=workers, rounds=rounds, codec=scaled_codec, checkpoint_every=rounds, out=str(tmp_path))
    toy_results = run_workers(toy.port, workers, "t")
    toy.thread.join(30)
    s, d = toy.summary(), dense.summary()
    assert all(r.finished and r.sessions == 1 for r in toy_results), [r.rejections for r in toy_results]
    assert s["rounds"] == rounds and s["rejected_messages"] == 0
    # finalize undid the scales: the same models, bit for bit, as the dense run
    assert [r.model_digest for r in toy_results] == [r.model_digest for r in dense_results]
    assert [e["train_loss"] for e in s["rounds_log"]] == [e["train_loss"] for e in d["rounds_log"]]
    assert s["final_loss"] == d["final_loss"]
    # the blob is downlink bytes: each round's directive carries 8 of them per worker
    assert s["downlink_message_bytes"] > d["downlink_message_bytes"]
    assert s["codec_stats"]["finalized_rounds"] == rounds
    assert s["codec_stats"]["forgotten_workers"] == workers
    resumed = make_server(workers=workers, rounds=rounds + 1, codec=scaled_codec,
                          resume=str(tmp_path / "checkpoint.pt"), out=str(tmp_path / "b"))
    assert resumed.engine.codec_state.finalized == rounds
