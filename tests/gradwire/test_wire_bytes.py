"""The serialized-in-pieces encoders (protocol.worker_message_to_bytes, BroadcastSerializer) write
protobuf's bytes (exactly, but for the alignment padding before large data fields), and share a
round's model across workers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwire import protocol
from gradwire.compressors.base import Directive, Encoded, TensorSpec
from gradwire.protocol import BroadcastSerializer, ModelDelta, RoundResult, Update, WorkerTiming
from gradwire.server.robust import clip_updates, update_norm

rng = np.random.default_rng(7)
PARAMS = {
    "w": rng.standard_normal((3, 4)).astype(np.float32),
    "scalar": np.ones((), dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "f64": rng.standard_normal(5),  # converted to float32 on the wire
    "fortran": np.asfortranarray(rng.standard_normal((3, 5)).astype(np.float32)),
    "big": rng.standard_normal(70_000).astype(np.float32),  # lengths needing 3-byte varints
}
RESIDUAL = Encoded("dense", TensorSpec("w", (3, 4)), rng.bytes(48))
TENSORS = (
    Encoded("tpc", TensorSpec("w", (3, 4)), rng.bytes(300), b"coefs", RESIDUAL),
    Encoded("dense", TensorSpec("scalar", ()), b""),
    Encoded("dense", TensorSpec("big", (70_000,)), rng.bytes(280_000)),
)
DIRECTIVE = Directive(values={"stage": 2.0}, blob=b"blob")


def _strip_padding(msg) -> int:
    """Clear every alignment_padding field of ``msg`` and its submessages; their wire bytes."""
    total = 0
    for field, value in msg.ListFields():
        if field.name == "alignment_padding":
            assert value == bytes(len(value)) and len(value) < protocol.ALIGNMENT  # zeros, 2..17 bytes in all
            total += 2 + len(value)
            msg.ClearField(field.name)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for sub in (value if field.is_repeated else [value]):
                total += _strip_padding(sub)
    return total


def _data_offsets(msg, base: bytes) -> list[tuple[int, int]]:
    """(offset in ``base``, size) of each large payload or tensor data field, found by content."""
    out = []
    for field, value in msg.ListFields():
        if field.name in ("payload", "data") and len(value) >= protocol.ALIGN_FROM_BYTES:
            out.append((base.find(value), len(value)))
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for sub in (value if field.is_repeated else [value]):
                out += _data_offsets(sub, base)
    return out


def assert_protobuf_bytes_but_aligned(data: bytes, expected: bytes, message_type) -> None:
    """``data`` is ``expected`` (protobuf's serialization) with padding fields only, and puts every
    large data field at a multiple of ALIGNMENT; with no large field it is ``expected`` exactly."""
    msg = message_type.FromString(data)
    assert all(offset % protocol.ALIGNMENT == 0 for offset, _ in _data_offsets(msg, data))
    padding = _strip_padding(msg)
    assert msg.SerializeToString() == expected
    assert len(data) == len(expected) + padding
    if not _data_offsets(message_type.FromString(expected), expected):
        assert data == expected


@pytest.mark.parametrize("update", [
    Update(0, (), 0.0, 0),
    Update(5, TENSORS, 1.5, 32, 0.25, PARAMS),
    Update(2**40, TENSORS, math.nan, 1, buffers={}),
    Update(1, TENSORS[:1], -3.0, 7, buffers=None),
    # The wall-clock split's fields (7, 8) come after the buffers (6), in field order.
    Update(4, TENSORS, 0.5, 8, 0.1, PARAMS, encode_seconds=0.02, previous_round=WorkerTiming(0.3, 0.04)),
    Update(4, TENSORS[:1], 0.5, 8, encode_seconds=0.02, previous_round=WorkerTiming(0.0, 0.0)),
])
def test_update_bytes_equal_protobuf(update):
    data = protocol.worker_message_to_bytes(update)
    proto = protocol.worker_message_to_proto(update)
    assert_protobuf_bytes_but_aligned(data, proto.SerializeToString(), type(proto))
    back = protocol.worker_message_from_proto(type(protocol.worker_message_to_proto(update)).FromString(data))
    assert (back.encode_seconds, back.previous_round) == (update.encode_seconds, update.previous_round)


@pytest.mark.parametrize("result", [
    RoundResult(0, Directive(), False, 0),
    RoundResult(3, DIRECTIVE, True, 2, model=PARAMS, buffers={"bn": np.ones(3, np.float32)}),
    RoundResult(3, DIRECTIVE, True, 2, model_delta=ModelDelta(2, TENSORS), buffers={}),
    RoundResult(1, DIRECTIVE, False, 300, model={}),
])
def test_round_result_bytes_equal_protobuf(result):
    proto = protocol.server_message_to_proto(result)
    expected = proto.SerializeToString()
    data = protocol.server_message_to_bytes(result)
    assert_protobuf_bytes_but_aligned(data, expected, type(proto))
    shared = BroadcastSerializer()
    assert shared.to_bytes(result) == data
    assert shared.to_bytes(result) == data  # from the cache


def test_broadcast_serializes_each_distinct_message_once_and_keeps_each_workers_fields():
    shared = BroadcastSerializer()
    model, buffers = dict(PARAMS), {"bn": np.ones(3, np.float32)}
    for rank in range(8):  # each worker's own fields: each message its own bytes, all correct
        result = RoundResult(4, Directive(values={"rank": float(rank)}), rank % 2 == 0, 8, model=model,
                             buffers=buffers)
        data = shared.to_bytes(result)
        proto = protocol.server_message_to_proto(result)
        assert_protobuf_bytes_but_aligned(data, proto.SerializeToString(), type(proto))
        back = protocol.server_message_from_bytes(data)
        assert back.directive.values == {"rank": float(rank)} and back.update_aggregated == (rank % 2 == 0)
    # The same fields for every worker (most codecs): one bytes object for all, the model copied once.
    same = [shared.to_bytes(RoundResult(4, Directive(), True, 8, model=model, buffers=buffers)) for _ in range(8)]
    assert all(d is same[0] for d in same)
    # The engine replaces the model each round: a new object is serialized anew, the old bytes let go.
    next_round = dict(PARAMS)
    later = shared.to_bytes(RoundResult(4, Directive(), True, 8, model=next_round, buffers=buffers))
    assert later == same[0] and later is not same[0]
    assert len(shared._messages) == 1


def test_clipping_uses_norms_known_on_arrival():
    updates = {0: {"a": np.ones(4, np.float32)}, 1: {"a": np.full(4, 2.0, np.float32)},
               2: {"a": np.full(4, 100.0, np.float32)}}
    norms = {rank: update_norm(u) for rank, u in updates.items()}
    assert norms[1] == pytest.approx(4.0)
    computed = clip_updates(updates, 10, "drop")
    given = clip_updates(updates, 10, "drop", norms)
    assert computed[1] == given[1] and given[1].clipped == (2,)
    assert set(given[0]) == {0, 1}


def test_update_norm_does_not_overflow_float32():
    huge = {"a": np.full(1000, 3e38, np.float32)}
    assert update_norm(huge) == pytest.approx(3e38 * math.sqrt(1000), rel=1e-6)


def _same_message(a, b) -> bool:
    if type(a) is not type(b) or a.directive != b.directive:
        return False
    if (a.round, a.update_aggregated, a.workers, a.model_delta) != (b.round, b.update_aggregated, b.workers,
                                                                    b.model_delta):
        return False
    for x, y in ((a.model, b.model), (a.buffers, b.buffers)):
        if (x is None) != (y is None):
            return False
        if x is not None and (list(x) != list(y) or not all(
                x[k].shape == y[k].shape and np.array_equal(x[k], y[k], equal_nan=True) for k in x)):
            return False
    return True


def _outcome(parse, data):
    try:
        return "ok", parse(data)
    except protocol.MalformedMessage:
        return "malformed", None


WIRE_RESULTS = [
    RoundResult(0, Directive(), False, 0),
    RoundResult(3, DIRECTIVE, True, 2, model=PARAMS, buffers={"bn": np.ones(3, np.float32)}),
    RoundResult(3, DIRECTIVE, True, 2, model_delta=ModelDelta(2, TENSORS), buffers={}),
    RoundResult(1, DIRECTIVE, False, 300, model={}),
]


@pytest.mark.parametrize("result", WIRE_RESULTS)
def test_a_received_round_result_is_protobufs_with_the_model_as_views_of_the_bytes(result):
    data = protocol.server_message_to_bytes(result)
    fast = protocol.server_message_from_wire(data)
    assert _same_message(fast, protocol.server_message_from_bytes(data))
    for arrays in (fast.model or {}, fast.buffers or {}):
        assert all(not a.flags.writeable for a in arrays.values())  # views of the immutable bytes
    if result.model:
        assert protocol._round_result_with_views(data) is not None  # the views path, not the fallback


def test_the_views_path_agrees_with_protobuf_on_every_truncation_and_corrupted_byte():
    small = {"w": PARAMS["w"], "empty": PARAMS["empty"], "v": np.arange(5, dtype=np.float32)}
    data = protocol.server_message_to_bytes(RoundResult(3, DIRECTIVE, True, 2, model=small,
                                                        buffers={"bn": np.ones(3, np.float32)}))
    cases = [data[:cut] for cut in range(len(data))]
    cases += [data[:i] + bytes([v]) + data[i + 1:] for i in range(len(data)) for v in (0, 0x7F, 0x80, 0xFF)]
    for corrupted in cases:
        fast, slow = _outcome(protocol.server_message_from_wire, corrupted), _outcome(
            protocol.server_message_from_bytes, corrupted)
        assert fast[0] == slow[0], corrupted
        assert fast[0] != "ok" or _same_message(fast[1], slow[1]), corrupted


def test_fields_protobuf_would_merge_are_left_to_protobuf():
    one = protocol.server_message_to_bytes(RoundResult(3, Directive(), True, 2, model={"a": np.ones(2, np.float32)}))
    two = protocol.server_message_to_bytes(RoundResult(4, Directive(), True, 2, model={"b": np.zeros(3, np.float32)}))
    merged = one + two  # two round_result fields: protobuf merges them (both models' tensors, the last round)
    assert protocol._round_result_with_views(merged) is None
    got = protocol.server_message_from_wire(merged)
    assert got.round == 4 and set(got.model) == {"a", "b"}
    assert _same_message(got, protocol.server_message_from_bytes(merged))


def test_a_dense_update_is_serialized_from_views_of_the_gradient():
    """The worker's dense payload is the gradient's own memory (read-only), copied only into the
    message, whose bytes stay protobuf's; a gradient that is not contiguous float32 is copied."""
    from gradwire.compressors.base import RoundContext
    from gradwire.compressors.registry import create_codec
    from gradwire.compressors.update import UpdateEncoder

    grads = {"w": rng.standard_normal((30, 20)).astype(np.float32),
             "t": np.asfortranarray(rng.standard_normal((4, 5)).astype(np.float32)),
             "d": rng.standard_normal(7)}
    specs = [TensorSpec(n, a.shape) for n, a in grads.items()]
    encoded = UpdateEncoder(create_codec("dense"), specs).encode(grads, RoundContext(round=0, rank=0, seed=0))
    by_name = {e.spec.name: e for e in encoded}
    view = by_name["w"].payload
    assert isinstance(view, memoryview) and view.readonly
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), grads["w"])
    for name in ("t", "d"):  # not contiguous float32: the payload is a copy in the wire's layout
        assert not np.shares_memory(np.frombuffer(by_name[name].payload, dtype=np.uint8), grads[name])
        assert np.array_equal(np.frombuffer(by_name[name].payload, dtype="<f4"),
                              np.asarray(grads[name], dtype=np.float32).reshape(-1))
    update = Update(1, tuple(encoded), 0.5, 4)
    data = protocol.worker_message_to_bytes(update)
    assert data == protocol.worker_message_to_proto(update).SerializeToString()
    parsed = type(protocol.worker_message_to_proto(update)).FromString(data)
    assert protocol.worker_message_from_proto(parsed) == update


WIRE_UPDATES = [
    Update(0, (), 0.0, 0),
    Update(5, TENSORS, 1.5, 32, 0.25, PARAMS),
    Update(4, TENSORS, 0.5, 8, 0.1, {"bn": np.ones(3, np.float32)}, encode_seconds=0.02,
           previous_round=WorkerTiming(0.3, 0.04)),
    Update(1, TENSORS[:1], -3.0, 7, buffers={}),
]


def _same_update(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if not isinstance(a, Update):
        return a == b
    if (a.round, a.tensors, a.num_examples, a.compute_seconds, a.encode_seconds, a.previous_round) != (
            b.round, b.tensors, b.num_examples, b.compute_seconds, b.encode_seconds, b.previous_round):
        return False
    if not (a.train_loss == b.train_loss or (math.isnan(a.train_loss) and math.isnan(b.train_loss))):
        return False
    if (a.buffers is None) != (b.buffers is None):
        return False
    return a.buffers is None or (list(a.buffers) == list(b.buffers) and all(
        np.array_equal(a.buffers[k], b.buffers[k], equal_nan=True) and a.buffers[k].shape == b.buffers[k].shape
        for k in a.buffers))


def _payloads(e: Encoded):
    while e is not None:
        yield from (e.payload, e.coefficients)
        e = e.residual


@pytest.mark.parametrize("update", WIRE_UPDATES)
def test_a_received_update_is_protobufs_with_the_payloads_as_views_of_the_bytes(update):
    data = protocol.worker_message_to_bytes(update)
    fast = protocol.worker_message_from_wire(data)
    assert protocol._update_with_views(data) is not None  # the views path, not the fallback
    assert _same_update(fast, protocol.worker_message_from_bytes(data))
    for e in fast.tensors:
        for p in _payloads(e):
            assert not len(p) or (isinstance(p, memoryview) and p.readonly and p.obj is data)
    assert all(not a.flags.writeable for a in (fast.buffers or {}).values())


def test_the_update_views_path_agrees_with_protobuf_on_every_truncation_and_corrupted_byte():
    small = Update(3, (TENSORS[0], Encoded("dense", TensorSpec("v", (2,)), b"\x01" * 8)), 0.5, 2,
                   buffers={"bn": np.ones(3, np.float32)})
    data = protocol.worker_message_to_bytes(small)
    cases = [data[:cut] for cut in range(len(data))]
    cases += [data[:i] + bytes([v]) + data[i + 1:] for i in range(len(data)) for v in (0, 0x7F, 0x80, 0xFF)]
    for corrupted in cases:
        fast = _outcome(protocol.worker_message_from_wire, corrupted)
        slow = _outcome(protocol.worker_message_from_bytes, corrupted)
        assert fast[0] == slow[0], corrupted
        assert fast[0] != "ok" or _same_update(fast[1], slow[1]), corrupted


def test_update_fields_protobuf_would_merge_are_left_to_protobuf():
    one = protocol.worker_message_to_bytes(Update(3, TENSORS[1:2], 0.5, 2))
    two = protocol.worker_message_to_bytes(Update(4, TENSORS[2:], 0.5, 2))
    merged = one + two  # two update fields: protobuf merges them (both tensors, the last round)
    assert protocol._update_with_views(merged) is None
    got = protocol.worker_message_from_wire(merged)
    assert got.round == 4 and [t.spec.name for t in got.tensors] == ["scalar", "big"]
    # a payload given twice: protobuf keeps the last one
    tensor = protocol.encoded_to_bytes(Encoded("dense", TensorSpec("v", (1,)), b"\x00" * 4)) + b"\x2a\x04\x01\x02\x03\x04"
    update = b"\x12" + bytes([len(tensor)]) + tensor
    twice = b"\x12" + bytes([len(update)]) + update
    assert protocol._update_with_views(twice) is None
    assert bytes(protocol.worker_message_from_wire(twice).tensors[0].payload) == b"\x01\x02\x03\x04"


def test_dense_decodes_views_in_place_and_copies_mutable_buffers():
    from gradwire.compressors.base import RoundContext
    from gradwire.compressors.registry import create_codec
    from gradwire.compressors.update import UpdateDecoder

    values = np.arange(6, dtype=np.float32)
    ctx = RoundContext(round=0, rank=0, seed=0)
    spec = TensorSpec("v", (6,))
    for pad in range(4):  # the payload's offset in the message moves with the name's length
        named = TensorSpec("v" * (1 + pad), (6,))
        data = protocol.worker_message_to_bytes(Update(0, (Encoded("dense", named, values.tobytes()),), 0.5, 1))
        payload = protocol.worker_message_from_wire(data).tensors[0].payload
        decoded = UpdateDecoder(create_codec("dense"), [named]).decode([Encoded("dense", named, payload)], ctx)
        arr = decoded[named.name]
        assert np.array_equal(arr, values)
        assert np.shares_memory(arr, np.frombuffer(data, dtype=np.uint8))  # in place, aligned or not
        assert not arr.flags.writeable
    # a mutable buffer is copied: the decoded tensor must not change with it
    mutable = bytearray(values.tobytes())
    arr = UpdateDecoder(create_codec("dense"), [spec]).decode([Encoded("dense", spec, memoryview(mutable))], ctx)["v"]
    mutable[:4] = b"\x00" * 4
    assert arr[0] == 0.0 and arr[1] == 1.0 and np.array_equal(arr, values)


def test_codecs_that_do_not_decode_views_get_bytes():
    from gradwire.compressors.base import Decoder, RoundContext
    from gradwire.compressors.registry import create_codec
    from gradwire.compressors.update import UpdateDecoder

    seen = []

    class Recording(Decoder):
        def decode(self, msg, ctx):
            seen.extend(type(p) for p in _payloads(msg))
            return np.zeros(msg.spec.numel, np.float32)

    spec = TensorSpec("v", (2,))
    codec = create_codec("fp16")
    assert not codec.decodes_views
    decoder = UpdateDecoder(codec, [spec])
    decoder.decoder = Recording()
    msg = Encoded("fp16", spec, memoryview(b"abcdef")[:4])
    decoder.decode([msg], RoundContext(round=0, rank=0, seed=0))
    assert seen == [bytes, bytes]


def test_a_snapshot_serializes_the_live_model_once_and_hands_out_views_of_its_bytes():
    live = {"w": rng.standard_normal((30, 7)).astype(np.float32), "empty": np.zeros((0, 2), np.float32),
            "b": rng.standard_normal(5).astype(np.float32)}
    kept = {k: v.copy() for k, v in live.items()}
    shared = BroadcastSerializer()
    message = RoundResult(4, DIRECTIVE, True, 3, model=live, buffers={"bn": np.ones(3, np.float32)})
    snap = shared.snapshot(message)
    data = shared.to_bytes(snap)
    assert data == protocol.server_message_to_proto(message).SerializeToString()
    for k in live:  # read-only views of the sent bytes, not copies of the live model
        live[k] += 1.0  # the PS steps its model in place: the snapshot must not move
        assert np.array_equal(snap.model[k], kept[k]) and not snap.model[k].flags.writeable
        assert snap.model[k].size == 0 or np.shares_memory(snap.model[k], np.frombuffer(data, np.uint8))
    assert np.shares_memory(snap.buffers["bn"], np.frombuffer(data, np.uint8))
    # every worker whose reply carries the views and the same small fields gets these very bytes
    same = RoundResult(4, DIRECTIVE, True, 3, model=snap.model, buffers=snap.buffers)
    assert shared.to_bytes(same) is data
    other = RoundResult(4, Directive(), False, 3, model=snap.model, buffers=snap.buffers)  # its own fields
    assert shared.to_bytes(other) == protocol.server_message_to_proto(other).SerializeToString()
    assert shared.to_bytes(same) is data  # still kept beside the other worker's message


def test_large_payloads_and_model_data_arrive_as_aligned_views():
    """A reader views large fields in place; the writers' padding makes those views 16-aligned
    (numpy and BLAS take their fast loops), whatever the headers before them weigh."""
    for name_length in range(1, 40):  # headers of every length modulo the alignment
        n = protocol.ALIGN_FROM_BYTES // 4 + name_length
        payload = rng.standard_normal(n).astype(np.float32)
        update = Update(name_length, (Encoded("dense", TensorSpec("w" * name_length, (n,)), payload.tobytes()),), 1.0, 2)
        (tensor,) = protocol.worker_message_from_wire(protocol.worker_message_to_bytes(update)).tensors
        view = np.frombuffer(tensor.payload, dtype=np.float32)
        assert view.ctypes.data % protocol.ALIGNMENT == 0 and np.array_equal(view, payload)
        model = {"b" * name_length: payload, "small": np.ones(3, np.float32)}
        result = RoundResult(name_length, DIRECTIVE, True, 2, model=model)
        back = protocol.server_message_from_wire(BroadcastSerializer().to_bytes(result))
        arr = back.model["b" * name_length]
        assert arr.flags.aligned and arr.ctypes.data % protocol.ALIGNMENT == 0 and np.array_equal(arr, payload)


def test_a_peers_padding_is_skipped_unread(monkeypatch):
    """Padding is never copied into the header the fast readers rebuild: a peer's megabytes of it
    cost the PS nothing beyond the bytes it received."""
    rebuilt = []
    parse = protocol._parse_rebuilt
    monkeypatch.setattr(protocol, "_parse_rebuilt",
                        lambda msg, number, chunks: rebuilt.append(sum(map(len, chunks))) or parse(msg, number, chunks))
    proto = protocol.worker_message_to_proto(Update(1, TENSORS, 0.5, 4, buffers={"bn": np.ones(3, np.float32)}))
    for t in proto.update.tensors:
        t.alignment_padding = bytes(1 << 20)
    proto.update.buffers.tensors[0].alignment_padding = bytes(1 << 20)
    back = protocol.worker_message_from_wire(proto.SerializeToString())
    assert [bytes(t.payload) for t in back.tensors] == [bytes(t.payload) for t in TENSORS]
    assert back.buffers is not None and np.array_equal(back.buffers["bn"], np.ones(3, np.float32))
    assert rebuilt and max(rebuilt) < 4096  # headers only: no padding, no payloads
