"""gradwire.codecs: stateless codecs through bytes (decoded in a fresh process), stateful codecs
through Encoder/Decoder objects and their state_dicts, refusals, hostile bytes, and the
examples of docs/codec-api.md."""

from __future__ import annotations

import copy
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwire import codecs
from gradwire.compressors.base import RoundContext, TensorSpec
from gradwire.compressors.registry import available_codecs, create_codec

ROOT = Path(__file__).resolve().parents[2]
# Every registered codec with its defaults, plus stateless variants of the error-feedback codecs.
EXTRA_STATELESS = ["ans:bits=4", "qsgd:levels=4", "topk:ratio=0.05,ef=0", "randk:ratio=0.1,ef=0", "sign:ef=0",
                   "huffman:bits=3", "fp8:format=152"]
EXTRA_STATEFUL = ["tpc:granularity=tensor", "lag:trigger=relative", "powersgd:rank=2", "m22:ef=0",
                  "randk:ratio=0.1", "ans:bits=4,ef=1"]
# Codecs with PS-wide state (lgc, adaptive) run only through the PS; gradwire.codecs refuses them.
ALL_SPECS = [n for n in available_codecs() if not create_codec(n).has_cross_worker_state]
STATELESS = [s for s in ALL_SPECS + EXTRA_STATELESS if codecs.is_stateless(s)]
STATEFUL = [s for s in ALL_SPECS + EXTRA_STATEFUL if not codecs.is_stateless(s)]


def gradient(shape=(48, 20), seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 1e-2).astype(np.float32)


def test_every_codec_is_classified():
    # The defaults of the error-feedback codecs are stateful; plain quantizers are not.
    assert {"dense", "fp16", "bf16", "fp8", "ans", "huffman", "qsgd"} <= set(STATELESS)
    assert {"topk", "randk", "sign", "m22", "powersgd", "tpc", "lag"} <= set(STATEFUL)
    assert "lgc" not in STATELESS + STATEFUL
    assert len(STATELESS) >= 10 and len(STATEFUL) >= 10


def test_stateless_codecs_round_trip_through_bytes_in_a_fresh_process(tmp_path):
    x = gradient()
    expected = {}
    for i, spec in enumerate(STATELESS):
        data = codecs.encode(x, spec, name="layer.weight", step=3, rank=1, seed=5, num_workers=2)
        (tmp_path / f"{i}.frame").write_bytes(data)
        # What the PS would decode from the same message: the codec's own decoder.
        c = create_codec(spec)
        ctx = RoundContext(round=3, rank=1, seed=5, num_workers=2)
        e = c.make_encoder().encode(x, TensorSpec("layer.weight", x.shape), ctx)
        expected[i] = c.make_decoder().decode(e, ctx).reshape(x.shape)
        assert codecs.parse_frame(data).payload_bytes == e.payload_bytes
    script = (
        "import sys, pathlib, numpy as np\n"
        "from gradwire import codecs\n"
        "for path in sorted(pathlib.Path(sys.argv[1]).glob('*.frame')):\n"
        "    np.save(path.with_suffix('.npy'), codecs.decode(path.read_bytes()))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    for i, spec in enumerate(STATELESS):
        decoded = np.load(tmp_path / f"{i}.npy")
        assert decoded.shape == x.shape and decoded.dtype == np.float32, spec
        assert np.array_equal(decoded, expected[i]), spec
        assert float(np.dot(decoded.ravel(), x.ravel())) > 0, spec  # it points the way x does


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_torch_tensors_come_back_as_torch_tensors_of_their_dtype(dtype):
    t = torch.from_numpy(gradient()).to(dtype)
    back = codecs.decode(codecs.encode(t, "fp16"))
    assert isinstance(back, torch.Tensor) and back.dtype == dtype and back.shape == t.shape
    assert torch.allclose(back.float(), t.float(), rtol=1e-2, atol=1e-4)
    arr = codecs.decode(codecs.encode(t.float().numpy().astype(np.float64), "dense"))
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float64


def test_randomized_codec_is_reproduced_from_the_frame():
    x = gradient()
    a = codecs.decode(codecs.encode(x, "randk:ratio=0.1,ef=0", step=1, rank=0, seed=9))
    b = codecs.decode(codecs.encode(x, "randk:ratio=0.1,ef=0", step=2, rank=0, seed=9))
    assert not np.array_equal(np.nonzero(a), np.nonzero(b))  # the step changes the draw


@pytest.mark.parametrize("spec", STATEFUL)
def test_stateful_codecs_through_objects_match_the_codec_and_resume_from_state_dicts(spec):
    steps = [gradient((40, 12), seed=s) + gradient((40, 12), seed=100) for s in range(6)]
    motion = (1e-4,) * 3  # LAG-style triggers read model motion
    # Reference: the codec's own encoder/decoder pair, as worker and PS run it.
    c = create_codec(spec)
    ref_enc, ref_dec = c.make_encoder(), c.make_decoder()
    reference = []
    for t, g in enumerate(steps):
        ctx = RoundContext(round=t, rank=0, seed=0, num_workers=1, model_motion_sq=motion)
        reference.append(ref_dec.decode(ref_enc.encode(g, TensorSpec("w", g.shape), ctx), ctx).reshape(g.shape))

    enc, dec = codecs.Encoder(spec), codecs.Decoder(spec)
    for t in range(3):
        out = dec.decode(enc.encode(steps[t], name="w", model_motion_sq=motion))
        assert np.array_equal(out, reference[t]), (spec, t)
    # Checkpoint both ends through pickle, continue in fresh objects.
    enc_state = pickle.loads(pickle.dumps(enc.state_dict()))
    dec_state = pickle.loads(pickle.dumps(dec.state_dict()))
    enc2, dec2 = codecs.Encoder(spec), codecs.Decoder(spec)
    enc2.load_state_dict(enc_state)
    dec2.load_state_dict(dec_state)
    for t in range(3, 6):
        out = dec2.decode(enc2.encode(steps[t], name="w", model_motion_sq=motion))
        assert np.array_equal(out, reference[t]), (spec, t)


def test_stateful_decoder_refuses_frames_out_of_order_and_from_another_codec():
    enc, dec = codecs.Encoder("topk:ratio=0.1"), codecs.Decoder("topk:ratio=0.1")
    first, second = enc.encode(gradient(), name="w"), enc.encode(gradient(seed=1), name="w")
    with pytest.raises(codecs.CodecError, match="expected step 0"):
        dec.decode(second)
    dec.decode(first)
    with pytest.raises(codecs.CodecError, match="this decoder is"):
        dec.decode(codecs.encode(gradient(), "fp16", name="w"))
    with pytest.raises(codecs.CodecError, match="stateful"):
        codecs.decode(second)


@pytest.mark.parametrize("spec", ["topk", "powersgd", "tpc", "lag", "sign"])
def test_encode_refuses_stateful_codecs(spec):
    with pytest.raises(codecs.CodecError, match="keeps state between calls"):
        codecs.encode(gradient(), spec)


def test_lgc_is_refused_everywhere():
    for call in (lambda: codecs.encode(gradient(), "lgc"), lambda: codecs.Encoder("lgc"),
                 lambda: codecs.Decoder("lgc")):
        with pytest.raises(codecs.CodecError, match="parameter-server coordinator"):
            call()


def test_bad_inputs_are_refused_with_reasons():
    with pytest.raises(codecs.CodecError, match="NaN or Inf"):
        codecs.encode(np.array([1.0, np.nan], dtype=np.float32), "fp16")
    with pytest.raises(codecs.CodecError, match="floating point"):
        codecs.encode(np.arange(4), "fp16")
    with pytest.raises(codecs.CodecError, match="unknown codec"):
        codecs.encode(gradient(), "nosuchcodec")


def _frame_with(data: bytes, **fields) -> bytes:
    names = ["magic", "version", "flags", "dtype", "reserved", "step", "rank", "workers", "seed", "count"]
    values = dict(zip(names, codecs.HEADER.unpack_from(data), strict=True))
    values.update(fields)
    return codecs.HEADER.pack(*values.values()) + data[codecs.HEADER.size:]


def test_frame_bounds_are_checked_before_decoding():
    good = codecs.encode(gradient(), "dense")
    assert codecs.decode(good).shape == (48, 20)
    cases = {
        "magic": _frame_with(good, magic=b"NOPE"),
        "version": _frame_with(good, version=2),
        "flags": _frame_with(good, flags=0x80),
        "dtype code": _frame_with(good, dtype=9),
        "rank 3 of 2": _frame_with(good, rank=3, workers=2),
        "claims 65537 tensors": _frame_with(good, count=65537),
        "bytes after its header": _frame_with(good, count=5000),
        "trailing": good + b"\0",
        "claims": good[:-10],
        "shorter than": good[:20],
        "exceeds the limit": good,
        "at most 100": good,
    }
    for reason, data in cases.items():
        kwargs = {"max_bytes": 100} if reason == "exceeds the limit" else {}
        kwargs = {"max_numel": 100} if reason == "at most 100" else kwargs
        with pytest.raises(codecs.CodecError, match=re.escape(reason)):
            codecs.decode(data, **kwargs)


def test_payload_that_does_not_match_the_shape_is_refused():
    # A frame whose shape was changed after encoding: the payload no longer fits.
    for spec in STATELESS:
        frame = codecs.parse_frame(codecs.encode(gradient(), spec))
        (e,) = frame.tensors
        import dataclasses

        bigger = dataclasses.replace(e, spec=TensorSpec(e.spec.name, (4800, 20)))
        data = codecs.pack_frame([bigger], frame.context)
        try:
            out = codecs.decode(data)
        except codecs.CodecError:
            continue
        assert out.shape == (4800, 20), spec  # a codec that decodes must honour the spec


VALID_FRAMES = [codecs.encode(gradient((9, 7), seed=i), s, step=i) for i, s in enumerate(STATELESS)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_codec_error(data):
    with pytest.raises(codecs.CodecError):
        codecs.decode(data)
    with pytest.raises(codecs.CodecError):
        codecs.decode(codecs.MAGIC + bytes([codecs.VERSION]) + data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_FRAMES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                               min_size=1, max_size=6), st.integers(0, 10_000))
def test_mutated_frames_decode_or_raise_codec_error(frame, edits, cut):
    data = bytearray(frame)
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: max(cut, codecs.HEADER.size)]) if cut < len(data) else bytes(data)
    try:
        out = codecs.decode(data, max_numel=1 << 16)
    except codecs.CodecError:
        return
    assert int(np.prod(out.shape)) <= 1 << 16  # a numpy array, or a torch tensor if the flag bit flipped


def test_header_layout_is_what_the_module_documents():
    data = codecs.encode(torch.zeros(3, dtype=torch.float16), "dense", step=2, rank=1, seed=7, num_workers=4)
    magic, version, flags, dtype, reserved, step, rank, workers, seed, count = struct.unpack_from(
        "<4sBBBBQIIQI", data)
    assert (magic, version, flags, dtype, reserved) == (b"GWCF", 1, 1, 2, 0)
    assert (step, rank, workers, seed, count) == (2, 1, 4, 7, 1)
    assert struct.unpack_from("<I", data, 36)[0] == len(data) - 40


def doc_blocks() -> list[str]:
    text = (ROOT / "docs" / "codec-api.md").read_text()
    blocks = []
    for match in re.finditer(r"(<!-- not executed[^>]*-->\n)?```python\n(.*?)```", text, re.S):
        if not match.group(1):
            blocks.append(match.group(2))
    return blocks


def test_the_examples_in_docs_codec_api_run():
    blocks = doc_blocks()
    assert len(blocks) >= 8
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/codec-api.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert copy.deepcopy(namespace["stateless"]) == [s for s in STATELESS if ":" not in s]
