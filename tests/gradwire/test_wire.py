"""Wire format: generated code matches the .proto; conversions round-trip."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from gradwire import wire
from gradwire.compressors.base import Encoded, TensorSpec
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
    msg = wire.encoded_to_proto(outer)
    back = wire.encoded_from_proto(pb.EncodedTensor.FromString(msg.SerializeToString()))
    assert back == outer
    assert back.payload_bytes == 38


def test_residual_nesting_is_bounded():
    msg = pb.EncodedTensor(name="w", codec_spec="tpc")
    node = msg
    for _ in range(wire.MAX_RESIDUAL_DEPTH + 2):
        node.residual.name, node.residual.codec_spec = "w", "tpc"
        node = node.residual
    with pytest.raises(wire.MalformedMessage, match="nested"):
        wire.encoded_from_proto(msg)


def test_model_round_trip_and_bad_size():
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    back = wire.model_from_proto(pb.Model.FromString(wire.model_to_proto(params).SerializeToString()))
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    bad = wire.model_to_proto(params)
    bad.tensors[0].data = bad.tensors[0].data[:-4]
    with pytest.raises(wire.MalformedMessage, match="5 values for shape"):
        wire.model_from_proto(bad)


def test_dense_message_overhead_is_small():
    """Protobuf framing of a dense update stays far below 1 % + 200 B per message."""
    rng = np.random.default_rng(1)
    shapes = {"w1": (128, 64), "b1": (128,), "w2": (10, 128), "b2": (10,)}
    tensors = [wire.encoded_to_proto(Encoded("dense", TensorSpec(n, s), rng.bytes(4 * int(np.prod(s))))) for n, s in shapes.items()]
    msg = pb.WorkerMessage(update=pb.Update(round=12345, tensors=tensors, train_loss=0.5, num_examples=32, compute_seconds=0.01))
    payload = sum(4 * int(np.prod(s)) for s in shapes.values())
    assert payload < msg.ByteSize() < payload * 1.01 + 200
