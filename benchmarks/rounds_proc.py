"""The processes of the round benchmark (``benchmarks/rounds.py``), one per ``python -m`` call.

    python -m benchmarks.rounds_proc gradwire-server|gradwire-worker ARGS...   # gradwire's CLI, timed
    python -m benchmarks.rounds_proc raw-server PORT WORKERS ROUNDS DOWN_BYTES
    python -m benchmarks.rounds_proc raw-client PORT ROUNDS UP_BYTES
    python -m benchmarks.rounds_proc emulated-workers PORT WORKERS ROUNDS TASK
    python -m benchmarks.rounds_proc necessary-work TASK WORKERS REPEATS

Every process writes what it measured as JSON to ``$GRADWIRE_BENCH_OUT`` when it exits:

* ``rounds``: [round, process CPU seconds] at the start of each round (a worker: when it starts
  training for the round; the PS: when it opens the round), so the benchmark sums the CPU of all
  processes between two round starts. CPU from ``getrusage(RUSAGE_SELF)``: all threads;
* ``stages``: per stage, [round, CPU seconds of the calling thread] per call (``time.thread_time``),
  for the per-stage split. Stages are measured by wrapping gradwire's functions in place (below);
  work that runs on gRPC's own threads (framing, socket writes, and a serializer given to gRPC)
  is in none of them: the benchmark reports it as "transfer", the rest of the non-training CPU;
* ``bytes``: message sizes as gradwire counts them (uplink per Update, downlink per reply).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import atexit  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent import futures  # noqa: E402

RECORD: dict = {"rounds": [], "stages": {}, "bytes": {}, "maxrss_kb": 0}
_current_round = [-1]


def process_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def mark_round(round_: int) -> None:
    _current_round[0] = int(round_)
    RECORD["rounds"].append([int(round_), process_cpu()])


def _dump() -> None:
    RECORD["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = os.environ.get("GRADWIRE_BENCH_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(RECORD, f)


def timed(owner, attr: str, stage: str, on_call=None) -> None:
    """Wrap ``owner.attr`` so each call adds its thread CPU time to ``stage``."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if on_call is not None:
            on_call(*args, **kwargs)
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            RECORD["stages"].setdefault(stage, []).append([_current_round[0], time.thread_time() - t0])

    setattr(owner, attr, wrapper)


def count_bytes(owner, attr: str, key: str, arg_index: int | None) -> None:
    """Record a message size: the call's argument ``arg_index``, or (None) its return value."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        RECORD["bytes"].setdefault(key, []).append(int(out if arg_index is None else args[arg_index]))
        return out

    setattr(owner, attr, wrapper)


def instrument_server() -> None:
    from gradwire.server import round_engine, servicer

    engine = round_engine.RoundEngine
    timed(engine, "_open_round", "ps:open", on_call=lambda self, r: mark_round(r))
    timed(servicer, "parse_worker_message", "decode")
    timed(round_engine.UpdateDecoder, "decode_with_norm", "decode")  # the PS's decoding (decode calls it too)
    timed(engine, "_finalize", "aggregate")
    timed(round_engine, "robust_step", "aggregate")
    timed(engine, "_params_copy", "broadcast")
    timed(engine, "_snapshot_model", "broadcast")
    timed(servicer.GradientExchangeServicer, "_send", "broadcast")
    count_bytes(engine, "count_downlink", "downlink", 2)


def instrument_worker() -> None:
    from gradwire import local
    from gradwire.compressors import update
    from gradwire.worker import client

    timed(local.LocalTrainer, "update", "train", on_call=lambda self, r: mark_round(r))
    timed(local.LocalTrainer, "load", "broadcast")
    timed(update.UpdateEncoder, "encode", "encode")
    timed(update.UpdateEncoder, "model_received", "encode")
    timed(client.TrainStream, "send", "serialize")
    timed(client.TrainStream, "receive", "broadcast")
    count_bytes(client.TrainStream, "send", "uplink", None)


# ---------------------------------------------------------------- raw gRPC: bytes in, bytes out

RAW_METHOD = "/rawbench.Bytes/Exchange"


def raw_server(port: int, workers: int, rounds: int, down_bytes: int) -> None:
    """A minimal synchronous-rounds server: each stream sends one message per round; when all
    ``workers`` messages of a round are in, every stream gets ``down_bytes`` back."""
    import grpc

    from gradwire.channel import flow_control_options

    reply = os.urandom(down_bytes)
    cond = threading.Condition()
    state = {"round": 0, "arrived": 0, "ended": 0}
    done = threading.Event()
    mark_round(0)

    def exchange(request_iterator, _context):
        try:
            for _message in request_iterator:
                with cond:
                    r = state["round"]
                    state["arrived"] += 1
                    if state["arrived"] == workers:
                        state["round"], state["arrived"] = r + 1, 0
                        mark_round(r + 1)
                        cond.notify_all()
                    while state["round"] == r:
                        cond.wait()
                yield reply
        finally:  # stop only once every client has closed its stream
            with cond:
                state["ended"] += 1
                if state["ended"] == workers:
                    done.set()

    limit = 2 * max(down_bytes, 1) + 2**20
    # The same HTTP/2 flow control as gradwire's server and worker (gradwire.channel), so the
    # ratio measures gradwire's own work, not a transport setting.
    opts = [("grpc.max_receive_message_length", 64 * 2**20 * 4), ("grpc.max_send_message_length", limit),
            *flow_control_options(64 * 2**20 * 4)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers + 4), options=opts)
    handler = grpc.stream_stream_rpc_method_handler(exchange)  # no (de)serializer: bytes as they are
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("rawbench.Bytes", {"Exchange": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    done.wait()
    time.sleep(0.2)
    server.stop(1).wait()


def raw_client(port: int, rounds: int, up_bytes: int) -> None:
    import grpc

    from gradwire.channel import flow_control_options

    payload = os.urandom(up_bytes)
    limit = 64 * 2**20 * 4
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        *flow_control_options(limit)])
    grpc.channel_ready_future(channel).result(timeout=60)
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    replies = channel.stream_stream(RAW_METHOD)(requests())
    for r in range(rounds):
        mark_round(r)
        outbox.put(payload)
        next(replies)
    outbox.put(None)
    for _ in replies:
        pass
    channel.close()


# ---------------------------------------------------------------- emulated workers (PS scaling)


def emulated_workers(port: int, workers: int, rounds: int, task_ref: str) -> None:
    """``workers`` gradwire workers in threads of this process, each sending a dense Update built
    from one real gradient every round: the PS sees real messages, and the emulation costs no
    training, so many workers fit on a small machine. Only the PS's CPU is measured."""
    import grpc
    import numpy as np

    from gradwire import protocol
    from gradwire.channel import flow_control_options
    from gradwire.compressors.base import RoundContext
    from gradwire.compressors.registry import create_codec
    from gradwire.compressors.update import UpdateEncoder
    from gradwire.task import load_task
    from gradwire.tasks import tensor_specs

    task = load_task(task_ref, 0)
    model = task.build_model(0)
    specs = tensor_specs(model)
    rng = np.random.default_rng(0)
    grads = {s.name: (rng.standard_normal(s.shape) * 1e-3).astype(np.float32) for s in specs}
    tensors = tuple(UpdateEncoder(create_codec("dense"), specs).encode(grads, RoundContext(0, 0, 0, 1), None))
    limit = 64 * 2**20
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        *flow_control_options(limit)])
    grpc.channel_ready_future(channel).result(timeout=60)

    def one(rank: int) -> None:
        outbox: queue.Queue = queue.Queue()

        def requests():
            while (item := outbox.get()) is not None:
                yield item

        replies = channel.stream_stream(protocol.TRAIN_METHOD)(requests())
        outbox.put(protocol.worker_message_to_bytes(protocol.Hello(protocol=protocol.PROTOCOL,
                                                                   requested_worker_id=f"emulated-{rank}")))
        welcome = protocol.server_message_from_bytes(next(replies))
        round_ = welcome.round
        for _ in range(rounds):
            outbox.put(protocol.worker_message_to_bytes(protocol.Update(
                round=round_, tensors=tensors, train_loss=1.0, num_examples=1)))
            reply = next(replies, None)
            if reply is None:
                break
            message = protocol.server_message_from_bytes(reply)
            if not isinstance(message, protocol.RoundResult):
                break
            round_ = message.round
        outbox.put(protocol.worker_message_to_bytes(protocol.WorkerReport()))
        outbox.put(None)
        for _ in replies:
            pass

    threads = [threading.Thread(target=one, args=(rank,)) for rank in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()


# ---------------------------------------------------------------- the work any such PS adds


def necessary_work(task_ref: str, workers: int, repeats: int) -> None:
    """CPU of the work a dense round needs beyond moving its bytes, for any parameter server that
    keeps gradwire's guarantees, each operation alone on this process's one core (median of
    ``repeats`` after two warm-ups; blocks kept in the heap as in the benchmark's other processes):

    * each worker: the one copy of its gradient into the bytes gRPC's Python API sends (it takes
      only ``bytes``), its check that the update is finite, its check that the model it received is
      finite (a hostile or broken PS), the one copy of that model into its trainable parameters;
    * the PS: each update's check and norm (finiteness, clipping), the mean of the updates (sum,
      scale), the server optimizer's step (torch's fused SGD, momentum 0.9), the one copy of the
      model into the broadcast's bytes.

    Written to ``RECORD["necessary"]`` (seconds per round, by operation, all workers summed)."""
    import numpy as np
    import torch

    from gradwire.compressors.finite import all_finite, squared_norm
    from gradwire.server.aggregation import ServerOptimizer, mean_update
    from gradwire.task import load_task

    torch.set_num_threads(1)
    model = load_task(task_ref, 0).build_model(0)
    live = [p.detach().numpy() for p in model.parameters()]
    rng = np.random.default_rng(0)
    grads = [(rng.standard_normal(a.shape) * 1e-3).astype(np.float32) for a in live]
    received = [a.copy() for a in live]  # aligned, as gradwire's wire format puts them (protocol.ALIGNMENT)
    names = [n for n, _ in model.named_parameters()]
    updates = {rank: {n: g.copy() for n, g in zip(names, grads, strict=True)} for rank in range(workers)}
    # The PS's own mean (into buffers kept across rounds) and its optimizer (torch's fused SGD)
    mean: dict[str, np.ndarray] = {}
    optimizer = ServerOptimizer(model, lr=1e-3, momentum=0.9, weight_decay=0.0, schedule="constant", total_rounds=1)

    def serialize() -> None:
        b"".join(memoryview(g).cast("B") for g in grads)

    operations = {  # name: (function, times per round)
        "worker: gradient into the message (one copy)": (serialize, workers),
        "worker: update is finite": (lambda: all(all_finite(g) for g in grads), workers),
        "worker: received model is finite": (lambda: all(all_finite(r) for r in received), workers),
        "worker: model into its parameters (one copy)": (lambda: [np.copyto(a, r) for a, r in zip(live, received, strict=True)], workers),
        "PS: each update's norm and finiteness": (lambda: sum(squared_norm(u) or 0.0 for u in updates[0].values()), workers),
        "PS: mean of the updates": (lambda: mean_update(updates, out=mean), 1),
        "PS: optimizer step (fused SGD)": (lambda: optimizer.step(mean, 0), 1),
        "PS: model into the broadcast (one copy)": (lambda: b"".join(memoryview(a).cast("B") for a in live), 1),
    }
    out = {}
    for name, (fn, times) in operations.items():
        samples = []
        for i in range(repeats + 2):
            t0 = time.thread_time()
            fn()
            if i >= 2:
                samples.append(time.thread_time() - t0)
        samples.sort()
        out[name] = samples[len(samples) // 2] * times
    RECORD["necessary"] = out


def main(argv: list[str]) -> int:
    atexit.register(_dump)
    role, rest = argv[0], argv[1:]
    if role in ("gradwire-server", "gradwire-worker"):
        (instrument_server if role == "gradwire-server" else instrument_worker)()
        from gradwire.cli import main as cli_main

        return cli_main(rest)
    # The raw gRPC processes keep large blocks in the heap as gradwire's server and worker do
    # (gradwire/memory.py, set by their CLI): gRPC's own buffers cost the same in both, and the
    # ratio measures what gradwire adds.
    from gradwire.memory import keep_large_blocks

    keep_large_blocks()
    if role == "raw-server":
        raw_server(int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
    elif role == "raw-client":
        raw_client(int(rest[0]), int(rest[1]), int(rest[2]))
    elif role == "necessary-work":
        necessary_work(rest[0], int(rest[1]), int(rest[2]))
    elif role == "emulated-workers":
        emulated_workers(int(rest[0]), int(rest[1]), int(rest[2]), rest[3])
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
