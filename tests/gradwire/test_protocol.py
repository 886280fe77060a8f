"""Wire format: generated code matches the .proto; conversions round-trip."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from gradwire import protocol
from gradwire.compressors.base import Directive, Encoded, TensorSpec
from gradwire.v1 import exchange_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed")
def test_generated_code_matches_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    for name in ("exchange_pb2.py", "exchange_pb2.pyi", "exchange_pb2_grpc.py"):
        fresh, checked_in = tmp_path / "gradwire" / "v1" / name, ROOT / "gradwire" / "v1" / name
        assert filecmp.cmp(fresh, checked_in, shallow=False), (
            f"{checked_in} is out of date with proto/: run `python tools/gen_proto.py` and commit the result"
        )


def test_encoded_round_trip_with_residual():
    rng = np.random.default_rng(0)
    inner = Encoded("fp16", TensorSpec("w", (3, 5)), rng.bytes(30))
    outer = Encoded("tpc:order=2", TensorSpec("w", (3, 5)), b"", coefficients=rng.bytes(8), residual=inner)
    msg = protocol.encoded_to_proto(outer)
    back = protocol.encoded_from_proto(pb.EncodedTensor.FromString(msg.SerializeToString()))
    assert back == outer
    assert back.payload_bytes == 38


def test_residual_nesting_is_bounded():
    msg = pb.EncodedTensor(name="w", codec_spec="tpc")
    node = msg
    for _ in range(protocol.MAX_RESIDUAL_DEPTH + 2):
        node.residual.name, node.residual.codec_spec = "w", "tpc"
        node = node.residual
    with pytest.raises(protocol.MalformedMessage, match="nested"):
        protocol.encoded_from_proto(msg)


def test_model_round_trip_and_bad_size():
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    back = protocol.model_from_proto(pb.Model.FromString(protocol.model_to_proto(params).SerializeToString()))
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    bad = protocol.model_to_proto(params)
    bad.tensors[0].data = bad.tensors[0].data[:-4]
    with pytest.raises(protocol.MalformedMessage, match="5 values for shape"):
        protocol.model_from_proto(bad)


def test_dense_message_overhead_is_small():
    """Protobuf framing of a dense update stays far below 1 % + 200 B per message."""
    rng = np.random.default_rng(1)
    shapes = {"w1": (128, 64), "b1": (128,), "w2": (10, 128), "b2": (10,)}
    tensors = [protocol.encoded_to_proto(Encoded("dense", TensorSpec(n, s), rng.bytes(4 * int(np.prod(s))))) for n, s in shapes.items()]
    msg = pb.WorkerMessage(update=pb.Update(round=12345, tensors=tensors, train_loss=0.5, num_examples=32, compute_seconds=0.01))
    payload = sum(4 * int(np.prod(s)) for s in shapes.values())
    assert payload < msg.ByteSize() < payload * 1.01 + 200


def test_every_message_round_trips_through_its_serialized_form():
    rng = np.random.default_rng(2)
    model = {"a.weight": rng.standard_normal((3, 2)).astype(np.float32), "a.bias": np.zeros(3, np.float32)}
    enc = Encoded("dense", TensorSpec("a.bias", (3,)), b"\x01" * 12)
    directive = Directive({"stage": 3.0, "leader": 1.0}, b"\x00blob")
    counters = {"interface": "eth0", "tx_bytes": 5, "rx_bytes": 7}
    server_messages = [
        protocol.Welcome("gradwire.v1", "w", 2, protocol.TaskSpec("digits", "mlp", 32, 3, 2, "iid", 0.5, 7, ""),
                         "dense", 4, 10, model, directive, 3, "fp16"),
        protocol.RoundResult(5, directive, True, 3, model_delta=protocol.ModelDelta(4, (enc,))),
        protocol.RoundResult(5, Directive(), False, 3, model=model),
        protocol.Finished(10, "completed 10 rounds"),
    ]
    for m in server_messages:
        # deterministic=True: protobuf leaves the order of map entries (the directive's values)
        # unspecified, so two serializations of equal messages may differ byte for byte.
        data = protocol.server_message_to_proto(m).SerializeToString(deterministic=True)
        back = protocol.server_message_from_proto(pb.ServerMessage.FromString(data))
        assert type(back) is type(m)
        assert protocol.server_message_to_proto(back).SerializeToString(deterministic=True) == data
    worker_messages = [
        protocol.Hello("gradwire.v1", "w", ("dense", "lgc"), "host", counters),
        protocol.Update(5, (enc,), 1.25, 32, 0.5),
        protocol.Update(6, (enc,), 1.25, 32, 0.5, encode_seconds=0.25,  # the wall-clock split's fields 7 and 8
                        previous_round=protocol.WorkerTiming(reply_wait_seconds=0.75, downlink_decode_seconds=0.125)),
        protocol.WorkerReport({"bits_per_entry": 32.0}, counters, None),
    ]
    for m in worker_messages:
        data = protocol.worker_message_to_proto(m).SerializeToString(deterministic=True)
        assert protocol.worker_message_from_proto(pb.WorkerMessage.FromString(data)) == m
    # what the ledger counts: a full model's payload is its float32 bytes, a delta's its codec bytes
    assert protocol.server_message_payload_bytes(server_messages[0]) == 4 * 9 + len(directive.blob)  # the Welcome carries the blob too
    assert protocol.server_message_payload_bytes(server_messages[1]) == 12 + len(directive.blob)
    assert protocol.server_message_payload_bytes(server_messages[2]) == 4 * 9


def test_status_json_is_the_protobuf_json_of_the_status():
    from google.protobuf import json_format

    from gradwire.counters import RoundCounters, WorkerCounters

    status = protocol.Status(
        "gradwire.v1", 3, 10, "fp16", 100, False, "dense",
        workers=(protocol.WorkerStatus("w", 0, True, "h", WorkerCounters(uplink_payload_bytes=600, rounds_aggregated=3),
                                       {"interface": "eth0", "tx_bytes": 1, "rx_bytes": 2}),),
        rounds=(RoundCounters(round=0, workers=1, train_loss=1.5), RoundCounters(round=1, workers=1, test_accuracy=0.5)),
    )
    data = protocol.status_to_proto(status).SerializeToString()
    back = protocol.status_from_bytes(data)
    assert back.workers[0].counters.uplink_payload_bytes == 600 and back.rounds[1].test_accuracy == 0.5
    assert back.rounds[0].test_accuracy is None  # NaN on the wire
    as_dict = protocol.status_to_dict(back)
    assert as_dict == json_format.MessageToDict(pb.StatusResponse.FromString(data), preserving_proto_field_name=True,
                                                always_print_fields_with_no_presence=True)
    assert as_dict["workers"][0]["uplink_payload_bytes"] == "600"


def test_protobuf_stays_at_the_edge():
    """Generated code is imported by the protocol module and the servicer only (the worker's client
    reads raw bytes through gradwire.protocol); the worker imports nothing from the PS."""
    importers = sorted(
        str(p.relative_to(ROOT)) for folder in ("server", "worker", "gradwire", "compressors")
        for p in (ROOT / folder).rglob("*.py")
        if "exchange_pb2" in p.read_text() and p.parent.name != "v1"
    )
    assert importers == ["gradwire/protocol.py", "server/servicer.py"]
    for p in (ROOT / "worker").rglob("*.py"):
        assert "gradwire.server" not in p.read_text(), p


def test_task_fields_and_buffers_round_trip_and_count_as_payload():
    """Issue 11's fields: TaskSpec.task/local_steps/local_lr and the buffers of Update, Welcome and
    RoundResult survive the wire, and the buffers count as model payload (float32, in full)."""
    rng = np.random.default_rng(3)
    model = {"fc.weight": rng.standard_normal((2, 3)).astype(np.float32)}
    buffers = {"bn.running_mean": rng.standard_normal(3).astype(np.float32),
               "bn.num_batches_tracked": np.array(7.0, np.float32)}
    spec = protocol.TaskSpec("", "", 16, 2, 1, "iid", 0.0, 5, "", task="mytasks:make_task", local_steps=4,
                             local_lr=0.05)
    welcome = protocol.Welcome("gradwire.v1", "w", 1, spec, "dense", 0, 3, model, Directive(), 2, "dense",
                               buffers=buffers)
    result = protocol.RoundResult(1, Directive(), True, 2, model=model, buffers=buffers)
    for m in (welcome, result):
        data = protocol.server_message_to_proto(m).SerializeToString()
        back = protocol.server_message_from_proto(pb.ServerMessage.FromString(data))
        assert back.buffers is not None and set(back.buffers) == set(buffers)
        for name in buffers:
            np.testing.assert_array_equal(back.buffers[name], buffers[name])
        assert protocol.server_message_payload_bytes(back) == 4 * 6 + 4 * 4  # model + buffers
    back_welcome = protocol.server_message_from_proto(
        pb.ServerMessage.FromString(protocol.server_message_to_proto(welcome).SerializeToString()))
    assert isinstance(back_welcome, protocol.Welcome)
    assert (back_welcome.task.task, back_welcome.task.local_steps) == ("mytasks:make_task", 4)
    assert back_welcome.task.local_lr == pytest.approx(0.05)
    update = protocol.Update(1, (), 0.5, 16, buffers=buffers)
    back_update = protocol.worker_message_from_proto(
        pb.WorkerMessage.FromString(protocol.worker_message_to_proto(update).SerializeToString()))
    assert isinstance(back_update, protocol.Update) and back_update.buffers is not None
    np.testing.assert_array_equal(back_update.buffers["bn.running_mean"], buffers["bn.running_mean"])
    # No buffers: the fields stay unset, and a model without buffers sends none.
    plain = protocol.worker_message_from_proto(protocol.worker_message_to_proto(protocol.Update(1, (), 0.5, 16)))
    assert isinstance(plain, protocol.Update) and plain.buffers is None
    assert not protocol.worker_message_to_proto(protocol.Update(1, (), 0.5, 16)).update.HasField("buffers")
