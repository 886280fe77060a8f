"""Hostile messages cost the PS little memory beyond their own bytes (issue 13).

An oversized codec spec costs the PS no copy of it: refused from the wire framing, unparsed.

`gradwire fuzz`'s largest messages are Updates whose codec spec is 800 KB ("dense,k=v,k=v,...").
Parsed, protobuf turns the spec into a str, the decoder's checks copied it twice more (the codec
name split off it, the refusal's text quoting it): Python-side peak 3x the message, on top of
gRPC's buffer, the request bytes and the parsed message, which put the PS's peak RSS over 4x the
largest message (issue 13).
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import grpc
import numpy as np
import pytest

from gradwire import fuzz, protocol
from gradwire.compressors.base import Encoded, RoundContext, TensorSpec
from gradwire.compressors.registry import create_codec
from gradwire.compressors.update import UpdateDecoder, UpdateEncoder
from gradwire.protocol import Update
from gradwire.server.servicer import parse_worker_message

SPECS = [TensorSpec("w", (10, 64), "float32"), TensorSpec("b", (10,), "float32")]


def _update(codec: str) -> Update:
    rng = np.random.default_rng(0)
    grads = {s.name: (rng.standard_normal(s.shape) * 0.01).astype(np.float32) for s in SPECS}
    tensors = UpdateEncoder(create_codec(codec), SPECS).encode(grads, RoundContext(round=0, rank=0, seed=0))
    return Update(round=0, tensors=tuple(tensors), train_loss=1.0, num_examples=1)


def _ps_path(data: bytes, codec: str) -> str:
    """What the PS does with one request's bytes up to its refusal (the servicer's parse, the
    round engine's decode); the refusal's reason."""
    received = parse_worker_message(data)
    if received.message is None:
        return received.error
    try:
        UpdateDecoder(create_codec(codec), SPECS).decode(received.message.tensors, RoundContext(0, 0, 0))
    except Exception as exc:  # noqa: BLE001 - the decoder's refusal is what this path ends in
        return str(exc)
    return ""


@pytest.mark.parametrize("codec", ["dense", "huffman", "tpc"])
def test_a_huge_codec_spec_is_refused_without_copying_it(codec):
    update = _update(codec)
    rng = np.random.default_rng(1)
    data = fuzz.mutate(update, rng, "spec_huge")
    size = len(data)
    assert size > 800_000
    _ps_path(fuzz.mutate(update, rng, "spec_huge"), codec)  # one-time imports and caches
    tracemalloc.start()
    try:
        reason = _ps_path(data, codec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Before the wire check: 3.0x the message (2.4 MB traced for 0.8 MB). Now a few KiB.
    assert peak < size // 20, f"{peak} bytes traced for a {size}-byte message"
    assert "at most" in reason and str(protocol.MAX_TENSOR_HEADER_BYTES) in reason, reason[:300]


def test_honest_updates_and_headers_at_the_limit_pass_the_wire_check():
    for codec in ("dense", "tpc", "lag"):
        data = protocol.worker_message_to_bytes(_update(codec))
        assert protocol.update_header_error(data) is None
        assert _ps_path(data, codec) == ""
    name = "n" * (protocol.MAX_TENSOR_HEADER_BYTES - 40)
    at_limit = Update(round=0, tensors=(Encoded("dense", TensorSpec(name, (4,), "float32"), b"\x00" * 16),),
                      train_loss=1.0, num_examples=1)
    assert protocol.update_header_error(protocol.worker_message_to_bytes(at_limit)) is None


def test_an_oversized_name_or_a_residual_s_spec_is_refused_too():
    inner = Encoded("dense," + "x" * 20_000, TensorSpec("w", (4,), "float32"), b"\x00" * 16)
    nested = Encoded("tpc", TensorSpec("w", (4,), "float32"), b"", coefficients=b"\x00" * 8, residual=inner)
    long_name = Encoded("dense", TensorSpec("w" * 20_000, (4,), "float32"), b"\x00" * 16)
    for tensor in (nested, long_name):
        data = protocol.worker_message_to_bytes(Update(round=0, tensors=(tensor,), train_loss=1.0, num_examples=1))
        assert "at most" in (protocol.update_header_error(data) or "")
        assert "at most" in parse_worker_message(data).error


def test_bytes_that_are_not_protobuf_are_left_to_the_parser():
    for junk in (b"", b"\xff\xff\xff\xff garbage", b"\x12\x80\x80\x80\x80\x10", b"\x0b\x0c", bytes(range(256))):
        assert protocol.update_header_error(junk) is None
    assert "malformed" in parse_worker_message(b"\xff\xff\xff\xff garbage").error


_HEAPS_WITH_EIGHT_THREADS = r"""
import ctypes, sys, threading
from gradwire.memory import keep_large_blocks
from gradwire.server.admission import return_large_buffers_to_the_os

if sys.argv[1] == "fixed":
    assert return_large_buffers_to_the_os()
if sys.argv[1] == "large-blocks":  # the worker's setting, and a large model's PS
    assert keep_large_blocks()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
ready, done = threading.Barrier(9), threading.Event()

def hold():
    held = [bytearray(4096) for _ in range(16)]  # malloc'd by this thread: glibc gives it a heap
    ready.wait()
    done.wait()
    del held

threads = [threading.Thread(target=hold) for _ in range(8)]
for t in threads:
    t.start()
ready.wait()
stream = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
done.set()
print(open(sys.argv[2]).read().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_the_ps_keeps_malloc_to_two_heaps(tmp_path):
    """glibc gives each new thread its own heap (up to 8 per core), and each keeps what gRPC's
    threads freed there: with the cap, 60 hostile 0.8 MB messages grew the PS's peak RSS 4.0 MiB
    instead of 10.1 MiB (server/admission.py)."""

    def heaps(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _HEAPS_WITH_EIGHT_THREADS, mode, str(tmp_path / mode)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert heaps("default") > 2  # the measurement sees glibc's default (a heap per thread)
    assert heaps("fixed") <= 2
    # Model-sized blocks too: glibc unmaps a secondary heap once all of it is free, so a block
    # gRPC's threads allocate each round was faulted in again each round (gradwire/memory.py).
    assert heaps("large-blocks") <= 2


def _arena_heaps(pid: int) -> int:
    """glibc's non-main arenas in a process: each is a heap mapped at a 64 MiB boundary (HEAP_MAX_SIZE)."""
    heaps = 0
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if len(fields) == 5 and lo % (64 << 20) == 0 and hi - lo <= (64 << 20) and fields[1].startswith("rw"):
                heaps += 1
    return heaps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_the_server_command_caps_the_heaps_before_its_threads_allocate():
    """The cap takes only for threads that had not allocated yet: set once the gRPC server ran, it
    left 8 heaps in rotation after 64 Status calls (and a huffman fuzz campaign's peak-RSS growth
    was 2.6 MiB instead of 0.8 MiB). `gradwire server` sets it first."""
    from concurrent.futures import ThreadPoolExecutor

    from gradwire.memory import MALLOC_ARENAS
    from gradwire.status import fetch_status

    server = subprocess.Popen(
        [sys.executable, "-m", "gradwire.cli", "server", "--address", "127.0.0.1:0", "--workers", "1",
         "--dataset", "digits", "--model", "linear", "--rounds", "5", "--codec", "dense"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        address = next((line.split()[-1] for line in server.stdout if "listening on" in line), "")
        assert address, "the PS did not start"
        with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(8) as pool:
            assert len(list(pool.map(lambda _: fetch_status(channel), range(64)))) == 64  # threads that allocate
        assert _arena_heaps(server.pid) <= MALLOC_ARENAS
    finally:
        server.terminate()
        server.wait(30)
