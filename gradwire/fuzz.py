"""`gradwire fuzz`: a structured mutation campaign against a real PS on loopback.

For each codec the fuzzer starts `gradwire server` as a child process on 127.0.0.1 (one worker,
no evaluation), joins as a worker and sends honest updates of random gradients, each with one
mutation: flipped bits, extreme header bytes, truncated or padded payloads, oversized or
non-canonical codec specs, residuals and coefficients where the codec has none, wrong names,
shapes, rounds, huge or non-finite values, raw garbage. A refused message ends the session, as for
a real worker; the fuzzer reconnects. It counts what it sent and what came back, and reports

* ``crashes``: an INTERNAL/UNKNOWN status (an exception escaped a handler), or a PS that died
  or stopped answering its health check;
* ``non_finite_models``: models from the PS with NaN or Inf entries;
* the PS's peak RSS (VmHWM) growth over the campaign against the largest message sent.

Bounded in messages and seconds; loopback only (the PS it talks to is its own child).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import grpc
import numpy as np

from gradwire import protocol
from gradwire.compressors.base import Encoded, RoundContext, TensorSpec, as_bytes
from gradwire.compressors.registry import available_codecs, create_codec
from gradwire.compressors.update import UpdateEncoder
from gradwire.protocol import Finished, Hello, RoundResult, ServerMessage, Update, Welcome
from gradwire.status import is_serving

CRASH_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@dataclass
class CodecReport:
    codec: str
    messages: int = 0
    largest_message_bytes: int = 0
    accepted: int = 0
    replies: dict[str, int] = field(default_factory=dict)  # status code (or "ok") -> count
    crashes: list[str] = field(default_factory=list)
    non_finite_models: int = 0
    ps_peak_rss_start_bytes: int = 0  # at the first Welcome
    ps_peak_rss_baseline_bytes: int = 0  # after the warm-up messages
    ps_peak_rss_end_bytes: int = 0
    warmup_messages: int = 0
    encodings: int = 0  # honest updates encoded (fresh sessions of one round share one)
    seconds: float = 0.0

    @property
    def rss_growth_bytes(self) -> int:
        """Peak RSS growth after the warm-up: what the campaign's messages cost beyond one-time buffers."""
        return self.ps_peak_rss_end_bytes - (self.ps_peak_rss_baseline_bytes or self.ps_peak_rss_start_bytes)

    @property
    def rss_growth_from_start_bytes(self) -> int:
        return self.ps_peak_rss_end_bytes - self.ps_peak_rss_start_bytes


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a process: its peak resident set size (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------ mutations


def pick(rng, options):
    """One of ``options`` as it is (numpy's choice would turn lists and bytes into arrays)."""
    return options[int(rng.integers(0, len(options)))]


def _flip_bits(p: bytes, rng) -> bytes:
    if not p:
        return b"\x00"
    q = bytearray(p)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, len(q)))
        q[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(q)


def _extreme_header(p: bytes, rng) -> bytes:
    q = bytearray(p or b"\x00" * 8)
    i = int(rng.integers(0, min(len(q), 16)))
    q[i] = int(pick(rng, [0x00, 0x01, 0x7F, 0x80, 0xFF]))
    return bytes(q)


def _max_u32(p: bytes, rng) -> bytes:
    q = bytearray(p or b"\x00" * 8)
    if len(q) < 5:
        q.extend(b"\x00" * (5 - len(q)))
    i = int(rng.integers(0, min(len(q) - 4, 12) + 1))
    q[i:i + 4] = pick(rng, [b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80"])
    return bytes(q)


def _truncate(p: bytes, rng) -> bytes:
    return p[: int(rng.integers(0, len(p)))] if p else p


def _pad(p: bytes, rng, numel: int) -> bytes:
    size = int(pick(rng, [1, 7, 64, 4096, 8 * numel, 9 * numel + 70_000]))
    return p + (b"\xff" * size if rng.random() < 0.5 else rng.integers(0, 256, size, dtype=np.uint8).tobytes())


PAYLOAD_MUTATIONS = ("flip", "header", "u32", "truncate", "pad")
MESSAGE_MUTATIONS = ("spec_suffix", "spec_huge", "spec_nested", "residual", "coefficients", "name", "shape",
                     "drop_tensor", "duplicate_tensor", "round", "train_loss", "values_3e38", "values_1e30",
                     "garbage", "honest")


def _mutate_tensor(t: Encoded, rng, kind: str) -> Encoded:
    numel = t.spec.numel
    if kind == "flip":
        return replace(t, payload=_flip_bits(as_bytes(t.payload), rng))
    if kind == "header":
        return replace(t, payload=_extreme_header(as_bytes(t.payload), rng))
    if kind == "u32":
        return replace(t, payload=_max_u32(as_bytes(t.payload), rng))
    if kind == "truncate":
        return replace(t, payload=_truncate(as_bytes(t.payload), rng))
    if kind == "pad":
        return replace(t, payload=_pad(as_bytes(t.payload), rng, numel))
    if kind == "spec_suffix":
        return replace(t, codec=t.codec + pick(rng, [",x=1", ":", ":ratio=0.5", " ", "\x00"]))
    if kind == "spec_huge":
        return replace(t, codec=t.codec + "," + "k=v," * 200_000)
    if kind == "spec_nested":
        inner = "dense"
        for _ in range(150):
            inner = f"tpc:residual=({inner})"
        return replace(t, codec=inner)
    if kind == "residual":
        return replace(t, residual=Encoded("dense", TensorSpec(t.spec.name, t.spec.shape, "float32"),
                                           b"\x00" * (4 * numel)))
    if kind == "coefficients":
        return replace(t, coefficients=rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes())
    if kind == "name":
        return replace(t, spec=replace(t.spec, name=pick(rng, ["", "x", t.spec.name + "\x00", "a" * 10_000])))
    if kind == "shape":
        shape = pick(rng, [(2**31 - 1, 2**31 - 1), (0,), (numel + 1,), (-1,), ()])
        return replace(t, spec=replace(t.spec, shape=shape))
    return t


def mutate(update: Update, rng, kind: str) -> bytes:
    """One mutated WorkerMessage, serialized (garbage is not a WorkerMessage at all)."""
    if kind == "garbage":
        return rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
    tensors = list(update.tensors)
    i = int(rng.integers(0, len(tensors)))
    if kind == "drop_tensor":
        del tensors[i]
    elif kind == "duplicate_tensor":
        tensors.append(tensors[0])
    elif kind == "round":
        update = replace(update, round=int(pick(rng, [update.round + 1, max(0, update.round - 1), 2**62])))
    elif kind == "train_loss":
        update = replace(update, train_loss=float(pick(rng, [np.nan, np.inf, -np.inf])))
    elif kind in ("values_3e38", "values_1e30"):
        value = 3e38 if kind == "values_3e38" else 1e30
        tensors = [replace(t, payload=np.full(len(t.payload) // 4, value, "<f4").tobytes()) if t.codec == "dense" else t
                   for t in tensors]
    else:
        tensors[i] = _mutate_tensor(tensors[i], rng, kind)
    return protocol.worker_message_to_bytes(replace(update, tensors=tuple(tensors)))


# ------------------------------------------------------------------ one session at a time


class Session:
    """A Train stream that sends raw bytes (so garbage can be sent) and reads ServerMessages."""

    def __init__(self, channel: grpc.Channel, worker_id: str):
        import queue

        self._q: queue.Queue = queue.Queue()
        method = channel.stream_stream(protocol.TRAIN_METHOD, request_serializer=lambda b: b,
                                       response_deserializer=protocol.server_message_from_bytes)
        self.replies = method(iter(self._q.get, None), timeout=120)
        hello = Hello(protocol=protocol.PROTOCOL, requested_worker_id=worker_id, codecs=tuple(available_codecs()))
        self._q.put(protocol.worker_message_to_bytes(hello))

    def send(self, data: bytes) -> None:
        self._q.put(data)

    def receive(self) -> ServerMessage:
        return next(self.replies)

    def close(self) -> None:
        self._q.put(None)
        self.replies.cancel()


def _specs(model: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(a.shape)) for n, a in model.items()]


def _finite(model: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in model.values())


# The PS of a campaign trains this small real task (a 64x10 linear layer and its bias on the digits
# data, 650 parameters): every codec still sees a matrix and a vector, and a message costs both ends
# little, so a campaign of 100,000 messages takes minutes. --model / --dataset pick another.
FUZZ_DATASET = "digits"
FUZZ_MODEL = "linear"


def fuzz_codec(spec_text: str, messages: int, seconds: float, seed: int, log=None, *,
               dataset: str = FUZZ_DATASET, model: str = FUZZ_MODEL, warmup: int | None = None) -> CodecReport:
    """One codec's campaign against its own PS child process.

    ``warmup`` messages (default: a tenth of them, at most 500) are sent before the PS's peak RSS
    baseline is read, so one-time buffers (gRPC's, the allocator's, first decodes) do not count as
    growth; the report keeps the growth since the first Welcome too.
    """
    codec = create_codec(spec_text)
    report = CodecReport(codec.spec)
    report.warmup_messages = min(500, messages // 10) if warmup is None else warmup
    rng = np.random.default_rng(seed)
    server = subprocess.Popen(
        [sys.executable, "-m", "gradwire.cli", "server", "--address", "127.0.0.1:0", "--workers", "1",
         "--dataset", dataset, "--model", model,
         "--rounds", str(10**9), "--eval-every", str(10**9), "--codec", codec.spec, "--round-timeout-s", "30",
         "--start-timeout-s", "60", "--hello-timeout-s", "30"],
        stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    started = time.monotonic()
    try:
        address = ""
        assert server.stdout is not None  # stdout=PIPE
        for line in server.stdout:
            if "listening on" in line:
                address = line.strip().rsplit(" ", 1)[-1]
                break
        # Keep reading what the PS prints: a full pipe would block it mid-campaign.
        threading.Thread(target=server.stdout.read, daemon=True).start()
        if not address:
            report.crashes.append("the PS did not start")
            return report
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 * 2**20),
                                                     ("grpc.max_receive_message_length", 256 * 2**20)]) as channel:
            _campaign(channel, codec, report, rng, messages, started + seconds, server)
            report.ps_peak_rss_end_bytes = peak_rss_bytes(server.pid)
            if server.poll() is not None:
                report.crashes.append(f"the PS exited with {server.returncode}")
            elif not is_serving("", channel=channel):
                report.crashes.append("the PS stopped answering its health check")
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        report.seconds = time.monotonic() - started
    return report


def _campaign(channel, codec, report: CodecReport, rng, messages: int, deadline: float, server) -> None:
    replies: Counter = Counter()
    session: Session | None = None
    encoder = None
    fresh = False  # the session has sent nothing yet: its codec state is the initial one
    # The honest update a fresh session sends at a round, and the encoder that made it. Most
    # mutations are refused and a refusal ends the session, so most messages come from a fresh
    # session at the same round: encoding once per round (not per message) is what makes entropy
    # codecs' campaigns fast. Rounds only move forward (one worker), so one entry is enough.
    fresh_round, fresh_update, fresh_encoder = -1, None, None
    round_ = 0
    session_codec = codec.spec
    specs: list[TensorSpec] = []
    n = 0
    failed_joins = 0
    while n < messages and time.monotonic() < deadline and server.poll() is None:
        if session is None:
            session = Session(channel, "fuzz")
            try:
                opening = session.receive()
            except grpc.RpcError as err:
                replies[err.code().name] += 1
                session = None
                failed_joins += 1
                if failed_joins > 200:
                    report.crashes.append(f"cannot join the PS: {err.code().name}: {(err.details() or '')[:200]}")
                    break
                time.sleep(0.05)
                continue
            failed_joins = 0
            if not isinstance(opening, Welcome):
                break
            w = opening
            if not _finite(w.model):
                report.non_finite_models += 1
            if not specs:
                specs = _specs(w.model)
                report.ps_peak_rss_start_bytes = peak_rss_bytes(server.pid)
            round_ = int(w.round)
            session_codec = w.codec_spec
            fresh = True
        if n == report.warmup_messages and not report.ps_peak_rss_baseline_bytes:
            report.ps_peak_rss_baseline_bytes = peak_rss_bytes(server.pid)
        if fresh and fresh_round == round_:
            update, encoder = fresh_update, fresh_encoder
        else:
            if fresh:
                encoder = UpdateEncoder(create_codec(session_codec), specs)  # a new session: initial codec state
            assert encoder is not None  # made with the session
            grads = {s.name: (rng.standard_normal(s.shape) * 0.01).astype(np.float32) for s in specs}
            encoded = encoder.encode(grads, RoundContext(round=round_, rank=0, seed=0))
            update = Update(round=round_, tensors=tuple(encoded), train_loss=1.0, num_examples=1)
            report.encodings += 1
            if fresh:
                fresh_round, fresh_update, fresh_encoder = round_, update, encoder
        fresh = False
        assert update is not None
        kind = pick(rng, PAYLOAD_MUTATIONS + MESSAGE_MUTATIONS)
        data = mutate(update, rng, kind)
        n += 1
        report.largest_message_bytes = max(report.largest_message_bytes, len(data))
        session.send(data)
        try:
            reply = session.receive()
        except grpc.RpcError as err:
            replies[err.code().name] += 1
            if err.code() in CRASH_CODES:
                report.crashes.append(f"{kind}: {err.code().name}: {(err.details() or '')[:200]}")
            session.close()
            session = None
            continue
        except StopIteration:
            session = None
            continue
        replies["ok"] += 1
        if isinstance(reply, Finished) or not isinstance(reply, RoundResult):
            break
        if reply.model is not None and not _finite(reply.model):
            report.non_finite_models += 1
        round_ = reply.round
        report.accepted += 1
    if session is not None:
        session.close()
    report.messages = n
    report.replies = dict(replies)


def main(argv: list[str] | None = None) -> int:
    from gradwire.cli import add_fuzz_flags

    p = argparse.ArgumentParser(prog="gradwire fuzz", description=__doc__.splitlines()[0])
    add_fuzz_flags(p)
    return run_fuzz(p.parse_args(argv))


RSS_BOUND_MULTIPLE = 4  # the bound: peak-RSS growth at most 4 x the largest message


def rss_bound_bytes(report: CodecReport) -> int:
    return RSS_BOUND_MULTIPLE * report.largest_message_bytes


def _fuzz_one(job: tuple) -> CodecReport:
    spec, messages, seconds, seed, dataset, model = job
    return fuzz_codec(spec, messages, seconds, seed, dataset=dataset, model=model)


def _print_codec(r: CodecReport) -> None:
    within = "ok" if r.rss_growth_bytes <= rss_bound_bytes(r) else "OVER"
    print(f"{r.codec:24s} sent {r.messages:6d} accepted {r.accepted:6d} crashes {len(r.crashes):3d} "
          f"non-finite models {r.non_finite_models:3d} largest message {r.largest_message_bytes / 2**20:5.2f} MiB "
          f"PS peak RSS +{r.rss_growth_bytes / 2**20:6.2f} MiB after {r.warmup_messages} warm-up messages "
          f"(bound {rss_bound_bytes(r) / 2**20:.2f} MiB: {within}; +{r.rss_growth_from_start_bytes / 2**20:.2f} MiB "
          f"from the first Welcome)  {r.messages / max(r.seconds, 1e-9):5.1f} msg/s ({r.seconds:.0f} s)", flush=True)
    for c in r.crashes[:5]:
        print(f"    crash: {c}", flush=True)


def run_fuzz(args) -> int:
    sep = ";" if ";" in args.codecs else ","
    codecs = [c.strip() for c in args.codecs.split(sep) if c.strip()]
    jobs = max(1, min(args.jobs, len(codecs)))
    # Messages are shared evenly (the remainder to the first codecs), so --messages N sends N in all.
    counts = [args.messages // len(codecs) + (i < args.messages % len(codecs)) for i in range(len(codecs))]
    budget = args.seconds * jobs / len(codecs)  # each codec's share of the wall-clock budget
    work = [(spec, max(1, n), budget, args.seed + i, args.dataset, args.model) for i, (spec, n) in
            enumerate(zip(codecs, counts, strict=True))]
    started = time.monotonic()
    if jobs == 1:
        reports = []
        for job in work:
            reports.append(_fuzz_one(job))
            _print_codec(reports[-1])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Several codecs at once, each campaign in its own process against its own PS: the client's
        # encoding and mutation run in parallel too. Spawned, not forked (gRPC and fork do not mix).
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            reports = list(pool.map(_fuzz_one, work))
        for r in reports:
            _print_codec(r)
    seconds = time.monotonic() - started
    over = [r.codec for r in reports if r.rss_growth_bytes > rss_bound_bytes(r)]
    total = {
        "messages": sum(r.messages for r in reports),
        "crashes": sum(len(r.crashes) for r in reports),
        "non_finite_models": sum(r.non_finite_models for r in reports),
        "largest_message_bytes": max(r.largest_message_bytes for r in reports),
        "max_ps_peak_rss_growth_bytes": max(r.rss_growth_bytes for r in reports),
        "rss_bound_multiple": RSS_BOUND_MULTIPLE,
        "codecs_over_rss_bound": over,
        "seconds": round(seconds, 1),
        "messages_per_second": round(sum(r.messages for r in reports) / max(seconds, 1e-9), 1),
        "jobs": jobs,
        "model": f"{args.dataset}/{args.model}",
    }
    print(f"in all: {total['messages']} messages in {seconds:.0f} s ({total['messages_per_second']} msg/s, "
          f"{jobs} at a time), {total['crashes']} crashes, {total['non_finite_models']} non-finite models, "
          f"largest message {total['largest_message_bytes'] / 2**20:.2f} MiB, PS peak-RSS growth at most "
          f"{RSS_BOUND_MULTIPLE} x each codec's largest message: "
          f"{'held by every codec' if not over else 'EXCEEDED by ' + ', '.join(over)}", flush=True)
    print(json.dumps(total))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"total": total, "codecs": [asdict(r) | {"rss_growth_bytes": r.rss_growth_bytes,
                                                              "rss_growth_from_start_bytes": r.rss_growth_from_start_bytes,
                                                              "rss_bound_bytes": rss_bound_bytes(r)}
                                                  for r in reports]}, f, indent=2)
    return 1 if total["crashes"] or total["non_finite_models"] or over else 0


if __name__ == "__main__":
    sys.exit(main())
