"""Downlink compression: codec-encoded model deltas from the PS, applied identically by every worker."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gradwire import protocol
from gradwire.compressors.base import Directive, TensorSpec
from gradwire.downlink import DownlinkDecoder, DownlinkEncoder, check_downlink_codec, model_digest
from gradwire.v1 import exchange_pb2 as pb

SPECS = [TensorSpec("layer.weight", (12, 7)), TensorSpec("layer.bias", (12,))]


def _params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in SPECS}


@pytest.mark.parametrize("spec", ["fp16", "topk:ratio=0.1", "qsgd:levels=4", "huffman:bits=6", "randk:ratio=0.2",
                                  "ans:bits=6", "qsgd:levels=16,bucket=16"])
def test_worker_and_ps_references_stay_bitwise_equal(spec):
    rng = np.random.default_rng(5)
    theta = _params(rng)
    ps = DownlinkEncoder(check_downlink_codec(spec), SPECS, seed=3)
    broadcast = ps.start(theta, 0)
    worker = DownlinkDecoder(spec, SPECS, seed=3)
    held, held_round = protocol.model_from_proto(protocol.model_to_proto(broadcast.reference)), 0
    for round_ in range(1, 9):
        theta = {n: v - 0.05 * rng.standard_normal(v.shape).astype(np.float32) for n, v in theta.items()}
        broadcast = ps.advance(broadcast, theta, round_)
        assert broadcast.delta.base_round == held_round
        held = worker.apply(held, held_round, broadcast.delta, round_)
        held_round = round_
        assert model_digest(held) == model_digest(broadcast.reference)
        sent = protocol.RoundResult(round=round_, directive=Directive(), update_aggregated=True, workers=1,
                                    model_delta=broadcast.delta)
        wire_form = protocol.server_message_to_proto(sent)
        assert wire_form.round_result.HasField("model_delta") and not wire_form.round_result.HasField("model")
        assert protocol.server_message_payload_bytes(sent) == sum(
            len(t.payload) for t in pb.ServerMessage.FromString(wire_form.SerializeToString()).round_result.model_delta.tensors
        )


@pytest.mark.parametrize("spec", ["qsgd:levels=16", "ans:bits=6"])
def test_the_ps_does_not_decode_a_broadcast_its_encoder_can_reconstruct(spec, monkeypatch):
    """qsgd and ans know their decoded values from the levels they chose: the PS moves its reference
    with those, decoding only what the encoder cannot reconstruct (ans's raw fallback for the bias)."""
    rng = np.random.default_rng(2)
    theta = _params(rng)
    ps = DownlinkEncoder(check_downlink_codec(spec), SPECS, seed=1)
    decoded: list[str] = []
    real = ps.decoder.decoder.decode
    monkeypatch.setattr(ps.decoder.decoder, "decode", lambda msg, ctx: decoded.append(msg.spec.name) or real(msg, ctx))
    broadcast = ps.start(theta, 0)
    worker = DownlinkDecoder(spec, SPECS, seed=1)
    held = broadcast.reference
    for round_ in range(1, 4):
        theta = {n: v - 0.05 * rng.standard_normal(v.shape).astype(np.float32) for n, v in theta.items()}
        broadcast = ps.advance(broadcast, theta, round_)
        held = worker.apply(held, round_ - 1, broadcast.delta, round_)
        assert model_digest(held) == model_digest(broadcast.reference)
    assert "layer.weight" not in decoded


def test_the_reference_catches_up_with_a_model_that_stops_moving():
    """What a lossy delta drops stays in θ − θ̂ and is sent later: top-10 % reaches θ within ~10 rounds."""
    rng = np.random.default_rng(6)
    start, theta = _params(rng), _params(rng)
    ps = DownlinkEncoder(check_downlink_codec("topk:ratio=0.1,ef=0"), SPECS, seed=0)
    broadcast = ps.start(start, 0)
    gaps = []
    for round_ in range(1, 16):
        broadcast = ps.advance(broadcast, theta, round_)
        gaps.append(max(float(np.abs(theta[n] - broadcast.reference[n]).max()) for n in theta))
    assert gaps[0] > 0.1 and gaps[-1] < 1e-6
    assert all(b <= a + 1e-7 for a, b in zip(gaps, gaps[1:], strict=False))


@pytest.mark.parametrize("spec", ["tpc", "lag", "lgc"])
def test_codecs_with_stateful_decoders_are_refused_with_a_reason(spec):
    with pytest.raises(ValueError, match="cannot be a downlink codec"):
        check_downlink_codec(spec)


def test_downlink_error_feedback_is_the_reference_so_codec_memory_is_off():
    """θ − θ̂ already carries what a delta dropped; a codec memory would send it twice (top-k diverged)."""
    assert check_downlink_codec("topk:ratio=0.1").spec == "topk:ratio=0.1,ef=0"
    assert check_downlink_codec("sign").spec == "sign:ef=0"
    assert check_downlink_codec("fp16").spec == "fp16"
    with pytest.raises(ValueError, match="momentum"):
        check_downlink_codec("topk:momentum=0.9")


def test_a_delta_for_another_base_round_is_refused():
    rng = np.random.default_rng(7)
    theta = _params(rng)
    ps = DownlinkEncoder(check_downlink_codec("fp16"), SPECS, seed=0)
    broadcast = ps.advance(ps.start(theta, 0), _params(rng), 1)
    with pytest.raises(protocol.MalformedMessage, match="reference round 0"):
        DownlinkDecoder("fp16", SPECS, seed=0).apply(theta, 5, broadcast.delta, 1)


def test_loopback_run_with_a_compressed_downlink(make_server, run_workers):
    rounds, workers = 4, 2
    running = make_server(workers=workers, rounds=rounds, downlink_codec="topk:ratio=0.1")
    results = run_workers(running.port, workers, "dl")
    running.thread.join(30)
    assert all(r is not None and r.finished for r in results)
    s = running.summary()
    params = s["params"]
    assert s["downlink_codec"] == "topk:ratio=0.1,ef=0" and s["rounds"] == rounds
    # Each worker: the full model in its Welcome, then rounds - 1 deltas (the last answer is Finished).
    full = 4 * params
    per_worker = [w["downlink_payload_bytes"] for w in s["per_worker"]]
    assert all(full < b < full + (rounds - 1) * full * 0.2 for b in per_worker), per_worker
    assert s["downlink_payload_bytes"] == sum(per_worker)
    assert s["downlink_message_bytes"] > s["downlink_payload_bytes"]
    assert s["downlink_bits_per_entry"] < 32 * (1 + (rounds - 1) * 0.2) / rounds
    # Every worker ends on the PS's broadcast reference, bit for bit.
    reference = model_digest(running.engine.broadcast.reference)
    assert [r.model_digest for r in results] == [reference] * workers
    assert running.engine.broadcast.round == rounds - 1


def test_dense_downlink_sends_the_full_model_every_round(make_server, run_workers):
    running = make_server(workers=1, rounds=3)
    results = run_workers(running.port, 1, "dd")
    running.thread.join(30)
    s = running.summary()
    assert results[0].finished and s["downlink_codec"] == "dense" and s["downlink_bits_per_entry"] == 32.0
    assert s["downlink_payload_bytes"] == 4 * s["params"] * 3  # welcome + 2 round results
    assert len(results[0].model_digest) == 64


def test_a_worker_without_the_base_gets_the_full_reference(make_server):
    from gradwire.server.ledger import WorkerRecord
    from gradwire.server.round_engine import Session

    running = make_server(workers=1, rounds=3, downlink_codec="fp16")
    coord = running.engine
    moved = {n: v + np.float32(0.01) for n, v in coord._params().items()}
    coord.broadcast = coord.downlink.advance(coord.broadcast, moved, 1)
    session = Session(WorkerRecord("w", 0), decoder=None, reference_round=0)
    fields = dict(round=1, directive=Directive(), update_aggregated=True, workers=1)
    reply = coord._model_reply(session, **fields)
    assert reply.model_delta is not None and reply.model is None and session.reference_round == 1
    session.reference_round = 7  # missed a delta (straggled, or joined from another reference)
    reply = coord._model_reply(session, **fields)
    assert reply.model is not None and reply.model_delta is None
    wire_form = protocol.server_message_to_proto(reply)
    assert model_digest(protocol.model_from_proto(wire_form.round_result.model)) == model_digest(coord.broadcast.reference)


def test_a_delta_the_worker_cannot_apply_makes_it_reconnect_for_the_full_model(
    make_server, monkeypatch, run_workers
):
    """The worker never trains on a model it could not rebuild: it starts a new session instead."""
    import gradwire.downlink as downlink

    real_apply = downlink.DownlinkDecoder.apply
    calls = {"n": 0}

    def apply_failing_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise protocol.MalformedMessage("simulated corrupt delta")
        return real_apply(self, *args, **kwargs)

    monkeypatch.setattr(downlink.DownlinkDecoder, "apply", apply_failing_once)
    # The PS forgets a session only when its stream ends. A slow leave widens the window in which a
    # worker that reconnects without waiting for that end is refused as a duplicate (ALREADY_EXISTS,
    # a third session): under load that happened by chance; here it would happen every time.
    from gradwire.server.round_engine import RoundEngine

    real_leave = RoundEngine.leave

    def slow_leave(self, session):
        time.sleep(0.5)
        real_leave(self, session)

    monkeypatch.setattr(RoundEngine, "leave", slow_leave)
    rounds = 5
    running = make_server(workers=1, rounds=rounds, downlink_codec="fp16")
    [result] = run_workers(running.port, 1, "re")
    running.thread.join(60)
    assert result is not None and result.finished and result.sessions == 2
    assert result.model_digest == model_digest(running.engine.broadcast.reference)
    assert running.summary()["per_worker"][0]["sessions"] == 2


def test_resume_restarts_the_reference_from_the_checkpointed_model(make_server, tmp_path, run_workers):
    """After a PS restart the broadcast reference is the model itself, sent in full to every worker."""
    first = make_server(workers=1, rounds=4, checkpoint_every=2, out=str(tmp_path), downlink_codec="ans:bits=6")
    run_workers(first.port, 1, "ck")
    first.thread.join(30)
    resumed = make_server(workers=1, rounds=6, resume=str(tmp_path / "checkpoint.pt"), out=str(tmp_path / "b"),
                          downlink_codec="ans:bits=6")
    coord = resumed.engine
    assert coord.broadcast.round == 4 and coord.broadcast.delta is None
    assert model_digest(coord.broadcast.reference) == model_digest(coord._params())
    [result] = run_workers(resumed.port, 1, "ck")
    resumed.thread.join(30)
    s = resumed.summary()
    assert result.finished and s["rounds"] == 6
    assert result.model_digest == model_digest(coord.broadcast.reference) and coord.broadcast.round == 5
