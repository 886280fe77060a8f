"""The worker loop: gradient on the local shard, encode, send, apply the new model.

Every (re)connection is a new session: the worker resets its encoder and the PS
builds a fresh decoder, so codec state on both ends restarts from the same
point (ALGORITHMS.md §0). A rejected update ends the session with a gRPC status;
the worker logs the reason and reconnects.
"""

from __future__ import annotations

import logging
import socket
import time
import zlib
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from gradwire.compressors.base import RoundContext
from gradwire.compressors.registry import available_codecs, create_codec
from gradwire.compressors.update import InvalidUpdate, UpdateEncoder
from gradwire.worker.client import TrainStream, open_channel, wait_for_server
from gradwire.worker.config import WorkerConfig
from gradwire.worker.guard import SESSION_ERRORS, usable_model

from gradwire import wire
from gradwire.downlink import DownlinkDecoder, model_digest
from gradwire.netstats import read_counters
from gradwire.tasks import Task, make_task, shard_indices, tensor_specs
from gradwire.v1 import exchange_pb2 as pb

log = logging.getLogger("gradwire.worker")
# Model moves remembered for LAG-style triggers (ALGORITHMS.md §1 uses D = 10).
MOTION_HISTORY = 10
# Status codes after which reconnecting cannot help.
FATAL_CODES = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class WorkerFailed(RuntimeError):
    pass


@dataclass
class WorkerResult:
    rounds: int = 0
    sessions: int = 0
    rejections: list[str] = field(default_factory=list)
    finished: bool = False
    last_model: dict[str, np.ndarray] | None = None  # the last model received from the PS

    @property
    def model_digest(self) -> str:
        """sha256 of the last model received: equal to the PS's broadcast reference when in sync."""
        return model_digest(self.last_model) if self.last_model is not None else ""


class Trainer:
    """Local model and shard; computes the gradient for a round."""

    def __init__(self, task: Task, spec: pb.TaskSpec, rank: int):
        self.task = task
        self.model = task.build_model()
        idx = shard_indices(
            task.dataset.train_y, max(1, spec.num_shards), spec.shard_index, spec.partition or "iid",
            spec.dirichlet_alpha or 0.5, spec.seed,
        )
        self.x = torch.from_numpy(task.dataset.train_x[idx])
        self.y = torch.from_numpy(task.dataset.train_y[idx])
        self.batch_size = int(spec.batch_size)
        self.seed = int(spec.seed)
        self.rank = rank
        self.specs = tensor_specs(self.model)

    def load(self, params: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(torch.from_numpy(params[name]).reshape(p.shape))

    def gradient(self, round_: int) -> tuple[dict[str, np.ndarray], float, int]:
        n = len(self.x)
        if self.batch_size == 0 or self.batch_size >= n:
            xb, yb = self.x, self.y
        else:
            # Seeded by (seed, rank, round): a rerun draws the same batches.
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{self.rank}/{round_}".encode()))
            idx = torch.randperm(n, generator=g)[: self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
        self.model.zero_grad(set_to_none=True)
        loss = self.task.loss_fn(self.model(xb), yb)
        loss.backward()
        grads = {name: p.grad.detach().numpy().copy() for name, p in self.model.named_parameters()}
        return grads, float(loss.detach()), len(xb)


def _motion(prev: dict[str, np.ndarray] | None, new: dict[str, np.ndarray]) -> float | None:
    if prev is None:
        return None
    return float(sum(float(np.sum((new[k].astype(np.float64) - prev[k]) ** 2)) for k in new))


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.worker_id = config.resolved_worker_id
        self.interface = config.interface or None
        self.interface_start = read_counters(self.interface)
        self._task_cache: dict[tuple, Task] = {}
        self.stats: dict[str, float] = {}

    def _task(self, spec: pb.TaskSpec) -> Task:
        key = (spec.dataset, spec.model, spec.seed, spec.data_dir)
        if key not in self._task_cache:
            self._task_cache[key] = make_task(spec.dataset, spec.model, int(spec.seed), spec.data_dir or None)
        return self._task_cache[key]

    def run(self) -> WorkerResult:
        result = WorkerResult()
        channel = open_channel(self.config.server, self.config.max_message_mb, **self.config.security)
        try:
            while not result.finished:
                if result.sessions > self.config.max_reconnects:
                    raise WorkerFailed(f"gave up after {result.sessions} sessions; last rejection: {result.rejections[-1:]}")
                wait_for_server(channel, self.config.connect_timeout_s)
                result.sessions += 1
                try:
                    self._session(channel, result)
                except grpc.RpcError as err:
                    code, details = err.code(), err.details()
                    if code in FATAL_CODES:
                        raise WorkerFailed(f"{code.name}: {details}") from None
                    if code == grpc.StatusCode.UNAVAILABLE:
                        log.warning("connection lost (%s); reconnecting", details)
                    else:
                        log.warning("the PS refused an update: %s: %s; reconnecting with reset codec state", code.name, details)
                        result.rejections.append(f"{code.name}: {details}")
                    time.sleep(0.2)
                except SESSION_ERRORS as exc:
                    log.warning("cannot continue this session (%s: %s); reconnecting", type(exc).__name__, exc)
                    result.rejections.append(f"{type(exc).__name__}: {exc}")
                    time.sleep(0.2)
        finally:
            channel.close()
        return result

    def _session(self, channel, result: WorkerResult) -> None:
        stream = TrainStream(channel)
        try:
            stream.send(pb.WorkerMessage(hello=pb.Hello(
                protocol=wire.PROTOCOL, requested_worker_id=self.worker_id, codecs=available_codecs(),
                hostname=socket.gethostname(), interface_start=wire.counters_to_proto(self.interface_start),
            )))
            opening = stream.receive()
            if opening is None:
                raise WorkerFailed("the PS closed the stream without a Welcome")
            if opening.WhichOneof("body") == "finished":
                self._finish(stream, opening.finished, None, result)
                return
            welcome = opening.welcome
            codec = create_codec(welcome.codec_spec)
            trainer = Trainer(self._task(welcome.task), welcome.task, welcome.rank)
            encoder = UpdateEncoder(codec, trainer.specs)  # fresh state: the session is a resync
            downlink = DownlinkDecoder(welcome.downlink_codec_spec, trainer.specs, int(welcome.task.seed))
            params = usable_model(wire.model_from_proto(welcome.model), "Welcome")
            result.last_model = params
            trainer.load(params)
            round_, directive, workers = int(welcome.round), welcome.directive, int(welcome.workers)
            motions: list[float] = []
            log.info("joined as %s rank %d, shard %d/%d, codec %s, round %d", welcome.worker_id, welcome.rank,
                     welcome.task.shard_index, welcome.task.num_shards, codec.spec, round_)
            while True:
                started = time.perf_counter()
                grads, loss, n = trainer.gradient(round_)
                ctx = RoundContext(
                    round=round_, rank=int(welcome.rank), seed=int(welcome.task.seed), num_workers=max(1, workers),
                    directive=dict(directive.values), directive_blob=bytes(directive.blob),
                    model_motion_sq=tuple(motions[-MOTION_HISTORY:]),
                )
                encoded = encoder.encode(grads, ctx)
                stream.send(pb.WorkerMessage(update=pb.Update(
                    round=round_, tensors=[wire.encoded_to_proto(e) for e in encoded], train_loss=loss,
                    num_examples=n, compute_seconds=time.perf_counter() - started,
                )))
                reply = stream.receive()
                if reply is None:
                    raise WorkerFailed("the PS closed the stream without an answer")
                if reply.WhichOneof("body") == "finished":
                    self._finish(stream, reply.finished, encoder, result)
                    return
                rr = reply.round_result
                if rr.HasField("model_delta"):
                    try:
                        # params is the reference of round_, the round this worker just trained in
                        new_params = downlink.apply(params, round_, rr.model_delta, int(rr.round))
                    except (wire.MalformedMessage, InvalidUpdate) as exc:
                        # Never train on a model we could not rebuild: a new session brings the full one.
                        log.warning("cannot apply the PS's model delta (%s); reconnecting for the full model", exc)
                        return
                else:
                    new_params = wire.model_from_proto(rr.model)
                usable_model(new_params, f"result of round {round_}")
                motion = _motion(params, new_params)
                if motion is not None:
                    motions.append(motion)
                params = new_params
                result.last_model = params
                trainer.load(params)
                round_, directive, workers = int(rr.round), rr.directive, int(rr.workers)
                result.rounds += 1
        finally:
            stream.close()

    def _finish(self, stream: TrainStream, finished: pb.Finished, encoder: UpdateEncoder | None, result: WorkerResult) -> None:
        self.stats = encoder.stats() if encoder is not None else self.stats
        stream.send(pb.WorkerMessage(report=pb.WorkerReport(
            codec_stats=self.stats,
            interface_start=wire.counters_to_proto(self.interface_start),
            interface_end=wire.counters_to_proto(read_counters(self.interface)),
        )))
        stream.close()
        result.finished = True
        # Drain so the PS sees the report before the channel goes away; the PS may
        # already be shutting down, which is no failure of this worker.
        try:
            while stream.receive() is not None:
                pass
        except grpc.RpcError as err:
            log.info("stream closed after the report: %s", err.code().name)
        log.info("finished: %s", finished.reason)


def run_worker(config: WorkerConfig) -> int:
    torch.set_num_threads(max(1, config.threads))
    result = Worker(config).run()
    return 0 if result.finished else 1
