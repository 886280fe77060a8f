"""The codec framework: spec strings, registry, dense codecs, whole-update encoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradwire.compressors.base import CodecError, RoundContext, TensorSpec
from gradwire.compressors.registry import available_codecs, create_codec
from gradwire.compressors.spec import SpecError, parse_spec
from gradwire.compressors.update import InvalidUpdate, UpdateDecoder, UpdateEncoder


def test_parse_nested_spec():
    p = parse_spec("tpc:order=3,residual=(huffman:bits=4,model=gennorm),trigger=relative")
    assert p.name == "tpc"
    assert p.options == {"order": "3", "residual": "huffman:bits=4,model=gennorm", "trigger": "relative"}
    assert parse_spec("tpc:residual=fp16").options == {"residual": "fp16"}


@pytest.mark.parametrize("bad", ["", "dense:bits", "x:a=1,a=2", "topk:ratio=(0.1", "bad name:x=1"])
def test_bad_specs(bad):
    with pytest.raises(SpecError):
        parse_spec(bad)


def test_registry_errors_name_the_problem():
    with pytest.raises(SpecError, match="unknown codec 'nope'"):
        create_codec("nope")
    with pytest.raises(SpecError, match="has no option 'bits'"):
        create_codec("dense:bits=3")
    assert {"dense", "fp16", "bf16"} <= set(available_codecs())


# fp16 subnormals (|x| < 6.1e-5) keep an absolute error of at most 2^-25.
@pytest.mark.parametrize("name, tol, atol", [("dense", 0.0, 0.0), ("fp16", 1e-3, 3e-8), ("bf16", 8e-3, 1e-39)])
@settings(max_examples=30, deadline=None)
@given(x=arrays(np.float32, st.integers(0, 40), elements=st.floats(-1e4, 1e4, width=32)))
def test_float_codecs_round_trip(name, tol, atol, x):
    codec = create_codec(name)
    spec = TensorSpec("t", x.shape)
    ctx = RoundContext(0, 0)
    msg = codec.make_encoder().encode(x, spec, ctx)
    out = codec.make_decoder().decode(msg, ctx)
    assert out.shape == x.shape
    assert len(msg.payload) == (4 if name == "dense" else 2) * x.size
    np.testing.assert_allclose(out, x, rtol=tol, atol=atol)


def test_golden_dense_bytes():
    x = np.array([1.0, -2.5, 3.25], dtype=np.float32)
    msg = create_codec("dense").make_encoder().encode(x, TensorSpec("t", (3,)), RoundContext(0, 0))
    assert msg.payload.hex() == "0000803f000020c000005040"  # little-endian float32: a wire change is deliberate


def test_encoder_refuses_nan():
    with pytest.raises(CodecError, match="NaN or Inf"):
        create_codec("fp16").make_encoder().encode(np.array([1.0, np.nan]), TensorSpec("t", (2,)), RoundContext(0, 0))


def test_update_encoder_validates_and_counts():
    specs = [TensorSpec("w", (4, 3)), TensorSpec("b", (4,))]
    codec = create_codec("dense")
    enc, dec = UpdateEncoder(codec, specs), UpdateDecoder(codec, specs)
    grads = {"w": np.ones((4, 3), np.float32), "b": np.zeros(4, np.float32)}
    msgs = enc.encode(grads, RoundContext(0, 0))
    out = dec.decode(msgs, RoundContext(0, 0))
    np.testing.assert_array_equal(out["w"], grads["w"])
    assert enc.stats()["bits_per_entry"] == 32.0
    with pytest.raises(InvalidUpdate, match="missing"):
        dec.decode(msgs[:1], RoundContext(0, 0))
    fp16 = UpdateEncoder(create_codec("fp16"), specs).encode(grads, RoundContext(0, 0))
    with pytest.raises(InvalidUpdate, match="codec 'fp16'"):
        dec.decode(fp16, RoundContext(0, 0))
