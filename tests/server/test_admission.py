"""Admission control (server/admission.py): idle streams, stream caps, bounded strings."""

from __future__ import annotations

import sys
import threading
import time

import grpc
import numpy as np
import pytest

from gradwire import protocol
from gradwire.compressors.bounds import max_payload_bytes
from gradwire.protocol import SERVICE_NAME
from gradwire.server.admission import MAX_CODEC_STAT_CHARS, MAX_CODEC_STATS, printable, receive_limit_bytes
from gradwire.status import fetch_status
from gradwire.v1 import exchange_pb2 as pb

IDLE_STREAMS = 1000
HELLO_TIMEOUT_S = 2.0


def _idle_streams(port: int, count: int, per_channel: int = 100):
    """``count`` Train streams that never send a message; returns (channels, calls, release)."""
    release = threading.Event()

    def nothing():
        release.wait()
        return
        yield  # a generator that sends nothing until released

    channels, calls = [], []
    for _ in range(0, count, per_channel):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        method = channel.stream_stream(f"/{SERVICE_NAME}/Train", request_serializer=pb.WorkerMessage.SerializeToString,
                                       response_deserializer=pb.ServerMessage.FromString)
        calls.extend(method(nothing()) for _ in range(per_channel))
    return channels, calls, release


def test_a_thousand_idle_streams_do_not_hold_the_round_or_status(make_server, run_workers):
    running = make_server(workers=2, rounds=2, hello_timeout_s=HELLO_TIMEOUT_S)
    channels, calls, release = _idle_streams(running.port, IDLE_STREAMS)
    try:
        time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            started = time.monotonic()
            assert fetch_status(channel, timeout=5).protocol == protocol.PROTOCOL
            assert time.monotonic() - started < 1.0
        started = time.monotonic()
        results = run_workers(running.port, 2)
        elapsed = time.monotonic() - started
        assert all(r is not None and r.finished for r in results)
        assert running.summary()["rounds"] == 2
        # at worst the honest workers wait for the idle streams' Hello deadline
        assert elapsed < HELLO_TIMEOUT_S + 20, elapsed
        assert not any(r.startswith("worker-") for r in running.engine.records)  # idle streams never joined
        deadline = time.monotonic() + HELLO_TIMEOUT_S + 10
        while not all(c.done() for c in calls) and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = sum(1 for c in calls if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        cancelled = sum(1 for c in calls if c.done() and c.code() == grpc.StatusCode.CANCELLED)
        assert refused >= IDLE_STREAMS - 100 and refused + cancelled >= IDLE_STREAMS - 1, (refused, cancelled)
    finally:
        release.set()
        for c in calls:
            c.cancel()
        for channel in channels:
            channel.close()


@pytest.mark.parametrize(("worker_id", "code"), [("x" * 129, grpc.StatusCode.INVALID_ARGUMENT),
                                                 ("evil\nid", grpc.StatusCode.INVALID_ARGUMENT)])
def test_unbounded_or_control_character_ids_are_refused(make_server, manual_workers, worker_id, code):
    running = make_server(workers=1, rounds=1)
    worker = manual_workers(f"127.0.0.1:{running.port}")
    with pytest.raises(grpc.RpcError) as err:
        worker.hello(worker_id)
    assert err.value.code() == code
    assert not running.engine.records


def test_a_long_hostname_is_cut_and_escaped_before_the_ledger_keeps_it(make_server, manual_workers):
    running = make_server(workers=1, rounds=1)
    worker = manual_workers(f"127.0.0.1:{running.port}")
    worker.send(pb.WorkerMessage(hello=pb.Hello(protocol=protocol.PROTOCOL, requested_worker_id="w0", codecs=["dense"],
                                                hostname="h\x1b[31m" + "y" * 100_000)))
    assert worker.recv().WhichOneof("body") == "welcome"
    hostname = running.engine.records["w0"].hostname
    assert len(hostname) <= 256 and "\x1b" not in hostname


def test_a_report_with_more_or_longer_codec_stats_than_any_codec_sends_is_refused(make_server, manual_workers):
    """The ledger keeps a worker's last WorkerReport statistics until the run ends (for the summary),
    per worker id: a report as large as the message limit allowed used to be kept whole."""
    running = make_server(workers=1, rounds=1)
    target = f"127.0.0.1:{running.port}"
    for stats in ({f"s{i}": 1.0 for i in range(MAX_CODEC_STATS + 1)}, {"s" * (MAX_CODEC_STAT_CHARS + 1): 1.0}):
        worker = manual_workers(target)
        assert worker.hello("w0").WhichOneof("body") == "welcome"
        worker.send(pb.WorkerMessage(report=pb.WorkerReport(codec_stats=stats)))
        with pytest.raises(grpc.RpcError) as err:
            worker.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert running.engine.records["w0"].codec_stats == {}
        _wait_until(lambda: "w0" not in running.engine.sessions)
    # what an honest worker sends (m22 sends the most: 17, none longer than 33 characters) is kept
    honest = {f"stat_{i}_" + "x" * 40: float(i) for i in range(MAX_CODEC_STATS)}
    worker = manual_workers(target)
    assert worker.hello("w0").WhichOneof("body") == "welcome"
    worker.send(pb.WorkerMessage(report=pb.WorkerReport(codec_stats=honest)))
    _wait_until(lambda: running.engine.records["w0"].codec_stats == honest)


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_printable_cuts_and_escapes():
    assert printable("abc", 10) == "abc"
    assert printable("a\x00b", 10) == "a\\x00b"
    assert printable("z" * 20, 5) == "zzzzz…"


def test_the_message_limit_applies_to_the_decompressed_size_of_a_gzip_message(make_server):
    # 4 MiB of zeros gzip to ~4 KiB; gRPC refuses it against --max-message-mb 1 after decompression.
    running = make_server(workers=1, rounds=1, max_message_mb=1)
    hello = pb.WorkerMessage(hello=pb.Hello(protocol=protocol.PROTOCOL, requested_worker_id="w0", codecs=["dense"],
                                            hostname="\x00" * (4 * 2**20)))
    with grpc.insecure_channel(f"127.0.0.1:{running.port}", compression=grpc.Compression.Gzip) as channel:
        method = channel.stream_stream(f"/{SERVICE_NAME}/Train", request_serializer=pb.WorkerMessage.SerializeToString,
                                       response_deserializer=pb.ServerMessage.FromString)
        with pytest.raises(grpc.RpcError) as err:
            next(method(iter([hello]), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not running.engine.records


def test_records_of_departed_workers_that_never_contributed_are_pruned(make_server, manual_workers, monkeypatch):
    from gradwire.server import admission

    monkeypatch.setattr(admission.prune_records, "__defaults__", (5,))
    running = make_server(workers=50, rounds=1, start_timeout_s=60)
    for i in range(12):
        worker = manual_workers(f"127.0.0.1:{running.port}")
        worker.send(pb.WorkerMessage(hello=pb.Hello(protocol=protocol.PROTOCOL, requested_worker_id=f"cycling-{i}",
                                                    codecs=["dense"])))
        deadline = time.monotonic() + 10
        while f"cycling-{i}" not in running.engine.records and time.monotonic() < deadline:
            time.sleep(0.02)
        worker.close()
        while running.engine.records[f"cycling-{i}"].connected and time.monotonic() < deadline:
            time.sleep(0.02)
    records = running.engine.records
    assert len(records) <= 5 and "cycling-11" in records
    assert len({r.rank for r in records.values()}) == len(records)


_FREE_EVERY_OTHER_MIB = r"""
import sys
from gradwire.server.admission import return_large_buffers_to_the_os

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

if sys.argv[1] == "fixed":
    assert return_large_buffers_to_the_os()
big = bytearray(16 * 2**20)  # freed: glibc's default now serves buffers up to 16 MiB from its heap
del big
before = rss()
keep = [bytearray(2**20) for _ in range(64)]  # 64 message-sized buffers
for i in range(0, 64, 2):
    keep[i] = None  # half of them freed, in the middle of the heap
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_message_sized_buffers_go_back_to_the_os():
    """The PS fixes glibc's mmap threshold: a freed 1 MiB buffer is returned at once, where glibc's
    default keeps it resident in the heap once a larger buffer was freed (the fuzz campaign's RSS creep)."""
    import subprocess

    def resident_mib(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", _FREE_EVERY_OTHER_MIB, mode], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return float(done.stdout)

    default, fixed = resident_mib("default"), resident_mib("fixed")
    assert fixed <= 40, (default, fixed)  # the 32 live buffers and little more
    assert default >= fixed + 16, (default, fixed)


def test_the_receive_limit_is_what_an_honest_worker_can_send_for_the_model(make_server, manual_workers):
    """A message larger than any honest Update for the run's model is refused by gRPC from its
    length prefix (RESOURCE_EXHAUSTED), not buffered up to the fixed --max-message-mb (issue 13:
    `gradwire fuzz`'s 0.8 MB messages to a small model's PS). Honest dense updates still pass."""
    running = make_server(workers=1, rounds=2)
    specs, buffers = running.engine.specs, running.engine.buffer_specs
    limit = receive_limit_bytes(specs, buffers, running.engine.config.max_message_mb * 2**20)
    assert running.receive_limit == limit
    assert limit < running.engine.config.max_message_mb * 2**20  # the embedded task is small
    assert limit >= sum(max_payload_bytes(s) for s in specs)

    honest = manual_workers(f"127.0.0.1:{running.port}")
    assert honest.hello("honest").WhichOneof("body") == "welcome"
    grads = {name: np.zeros_like(a) for name, a in honest.model.items()}
    honest.send(honest.dense_update(grads, round_=0))
    assert honest.recv().WhichOneof("body") in ("round_result", "finished")

    hostile = manual_workers(f"127.0.0.1:{running.port}", raw=True)
    hostile.send(b"\x0a" + b"\x00" * (limit + 1))  # one byte over: gRPC refuses it before it is parsed
    with pytest.raises(grpc.RpcError) as refused:
        hostile.recv()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        assert fetch_status(channel, timeout=5).protocol == protocol.PROTOCOL


def test_the_receive_limit_never_exceeds_the_configured_one():
    from gradwire.compressors.base import TensorSpec

    big = [TensorSpec("w", (4096, 4096))]
    assert receive_limit_bytes(big, [], 64 * 2**20) == 64 * 2**20
    small = [TensorSpec("w", (10, 64)), TensorSpec("b", (10,))]
    assert receive_limit_bytes(small, [], 64 * 2**20) < 2**20


def test_an_ended_session_is_freed_without_waiting_for_the_garbage_collector(make_server, manual_workers):
    """A refused or cancelled stream leaves no reference cycle holding its Session (and the session's
    codec decoder): gRPC's request iterator raises an RpcError that its own frame keeps, and caught in
    the Train handler that cycle used to hold every session until a full collection (issue 13: peak
    RSS growth under `gradwire fuzz`)."""
    import gc

    from gradwire.server.round_engine import Session

    running = make_server(workers=1, rounds=50)
    gc.collect()
    gc.disable()
    try:
        for i in range(5):
            worker = manual_workers(f"127.0.0.1:{running.port}")
            assert worker.hello(f"w{i}").WhichOneof("body") == "welcome"
            worker.replies.cancel()  # the client goes away while the PS waits for its update
            worker.close()
        time.sleep(1.0)  # the handlers finish after the client has gone
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, Session)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not leaked, f"{len(leaked)} sessions were only reachable through reference cycles"


def test_an_update_waiting_in_the_open_round_keeps_its_record_while_ids_cycle(make_server, manual_workers,
                                                                                 monkeypatch):
    """A worker that sent its update and left before the round closed is still aggregated: its record
    must outlive the pruning of departed ids (it has no aggregated update yet). Dropped, the round's
    close found no record for it and the round engine failed ("server error")."""
    from gradwire.server import admission

    monkeypatch.setattr(admission.prune_records, "__defaults__", (5,))
    running = make_server(workers=2, rounds=1, start_timeout_s=60)
    target = f"127.0.0.1:{running.port}"
    a, b = manual_workers(target), manual_workers(target)
    joined = threading.Thread(target=a.hello, args=("a",))
    joined.start()
    assert b.hello("b").WhichOneof("body") == "welcome"
    joined.join(30)
    zeros = {n: np.zeros_like(v) for n, v in a.model.items()}
    a.send(a.dense_update(zeros, 0))
    _wait_until(lambda: "a" in running.engine.contributions)
    a.close()
    _wait_until(lambda: not running.engine.records["a"].connected)
    for i in range(12):
        worker = manual_workers(target)
        assert worker.hello(f"cycling-{i}").WhichOneof("body") == "welcome"
        worker.close()
        _wait_until(lambda i=i: not running.engine.records[f"cycling-{i}"].connected)
    assert "a" in running.engine.records and len(running.engine.records) <= 5
    b.send(b.dense_update(zeros, 0))
    assert b.recv().WhichOneof("body") == "finished"
    running.thread.join(30)
    assert running.engine.finish_reason == "completed 1 rounds"
    assert running.summary()["aggregated_updates"] == 2


def test_departed_contributors_beyond_the_limit_are_summed_into_one_record(monkeypatch):
    """Ids that had updates aggregated used to be kept forever (only those that never contributed
    were dropped): one record per id an attacker cycled through with honest updates."""
    from gradwire.counters import WorkerCounters
    from gradwire.server import admission
    from gradwire.server.ledger import DEPARTED_ID, Ledger

    monkeypatch.setattr(admission.prune_records, "__defaults__", (4,))
    ledger = Ledger()
    ranks = []
    for i in range(20):
        record = ledger.record_for(f"w{i}")
        ranks.append(record.rank)
        record.sessions += 1
        record.counters.rounds_aggregated, record.counters.uplink_payload_bytes = 1, 100 + i
    assert len(ledger.records) <= 4 and "w19" in ledger.records
    assert len(set(ranks)) == 20  # a dropped contributor's rank never comes back
    everyone = ledger.all_records()
    assert everyone[-1].worker_id == DEPARTED_ID
    assert sum(r.counters.uplink_payload_bytes for r in everyone) == sum(100 + i for i in range(20))
    assert sum(r.sessions for r in everyone) == 20 and sum(r.counters.rounds_aggregated for r in everyone) == 20
    # Status carries the departed record too (ranks are uint32 on the wire)
    status = protocol.Status(
        protocol=protocol.PROTOCOL, round=0, total_rounds=1, codec_spec="dense", params=1, finished=False,
        downlink_codec_spec="dense",
        workers=tuple(protocol.WorkerStatus(r.worker_id, r.rank, r.connected, r.hostname, r.counters) for r in everyone))
    assert protocol.status_from_proto(protocol.status_to_proto(status)).workers[-1].worker_id == DEPARTED_ID
    resumed = Ledger()
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.all_records() == everyone
    assert isinstance(everyone[-1].counters, WorkerCounters)
