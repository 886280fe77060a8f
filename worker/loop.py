"""The worker loop: gradient on the local shard, encode, send, apply the new model.

Every (re)connection is a new session: the worker resets its encoder and the PS
builds a fresh decoder, so codec state on both ends restarts from the same
point (docs/algorithms.md §0). A rejected update ends the session with a gRPC status;
the worker logs the reason and reconnects.
"""

from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np

from gradwire import links, protocol
from gradwire.buffers import buffer_state, load_buffers
from gradwire.compressors.base import RoundContext
from gradwire.compressors.registry import available_codecs, create_codec
from gradwire.compressors.update import InvalidUpdate, UpdateEncoder
from gradwire.downlink import DownlinkDecoder, model_digest
from gradwire.local import LocalTrainer
from gradwire.netstats import read_counters
from gradwire.protocol import (
    Finished,
    Hello,
    MalformedMessage,
    RoundResult,
    TaskSpec,
    Update,
    Welcome,
    WorkerReport,
    WorkerTiming,
)
from gradwire.task import Task, load_task
from gradwire.tasks import shard_indices
from gradwire.threads import limit_cpu_threads
from gradwire.worker.client import TrainStream, open_channel, wait_for_server
from gradwire.worker.config import WorkerConfig
from gradwire.worker.guard import SESSION_ERRORS, usable_model

log = logging.getLogger("gradwire.worker")
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
    last_buffers: dict[str, np.ndarray] | None = None  # this worker's buffers after its last update

    @property
    def model_digest(self) -> str:
        """sha256 of the last model received: equal to the PS's broadcast reference when in sync."""
        return model_digest(self.last_model) if self.last_model is not None else ""


class Trainer(LocalTrainer):
    """Local model and shard (gradwire/local.py) as a TaskSpec describes them."""

    def __init__(self, task: Task, spec: TaskSpec, rank: int):
        n = task.train_size
        partition = spec.partition or "iid"
        # Only a dirichlet partition needs the labels; an iid shard needs the length alone, so a
        # lazy dataset reads nothing but this worker's own items.
        labels = task.train_targets() if partition == "dirichlet" else np.zeros(n, dtype=np.int64)
        idx = shard_indices(labels, max(1, spec.num_shards), spec.shard_index, partition,
                            spec.dirichlet_alpha or 0.5, spec.seed)
        super().__init__(task, idx, batch_size=int(spec.batch_size), seed=int(spec.seed), rank=rank,
                         local_steps=max(1, int(spec.local_steps)), local_lr=float(spec.local_lr))


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.worker_id = config.resolved_worker_id
        self.interface = config.interface or None
        self.interface_start = read_counters(self.interface)
        self._task_cache: dict[tuple, Task] = {}
        self.task_ref = config.task  # this worker's own way to import the PS's task, if given
        self.stats: dict[str, float] = {}

    def _task(self, spec: TaskSpec) -> Task:
        ref = self.task_ref or spec.task or spec.dataset
        key = (ref, spec.model, spec.seed, spec.data_dir)
        if key not in self._task_cache:
            self._task_cache[key] = load_task(ref, int(spec.seed), spec.data_dir or None, spec.model or None)
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
        pool = ThreadPoolExecutor(1, thread_name_prefix="stale-gradient") if self.config.stale_updates else None
        try:
            stream.send(Hello(
                protocol=protocol.PROTOCOL, requested_worker_id=self.worker_id, codecs=tuple(available_codecs()),
                hostname=socket.gethostname(), interface_start=self.interface_start,
            ))
            opening = stream.receive()
            if opening is None:
                raise WorkerFailed("the PS closed the stream without a Welcome")
            if isinstance(opening, Finished):
                self._finish(stream, opening, None, result)
                return
            if not isinstance(opening, Welcome):
                raise WorkerFailed(f"the PS opened the stream with a {type(opening).__name__}, not a Welcome")
            welcome = opening
            codec = create_codec(welcome.codec_spec)
            trainer = Trainer(self._task(welcome.task), welcome.task, welcome.rank)
            encoder = UpdateEncoder(codec, trainer.specs)  # fresh state: the session is a resync
            downlink = DownlinkDecoder(welcome.downlink_codec_spec, trainer.specs, int(welcome.task.seed))
            params = usable_model(welcome.model, "Welcome")
            trainer.check_model(params)
            result.last_model = params
            trainer.load(params)
            if welcome.buffers is not None:
                load_buffers(trainer.model, welcome.buffers)
            encoder.model_received(params)
            round_, directive, workers = welcome.round, welcome.directive, welcome.workers
            if self.config.link or self.config.links:
                # Shaped once the rank is known (GRADWIRE_LINKS is by rank); only the Hello crossed unshaped.
                profile = links.profile_for_rank(self.config.link, self.config.links, welcome.rank)
                try:
                    links.apply(profile, self.config.interface or "eth0")
                except links.LinkError as exc:
                    raise WorkerFailed(str(exc)) from None
                log.info("link of %s shaped to %s (up/down)", self.config.interface or "eth0", profile)
            log.info("joined as %s rank %d, shard %d/%d, codec %s, round %d%s", welcome.worker_id, welcome.rank,
                     welcome.task.shard_index, welcome.task.num_shards, codec.spec, round_,
                     ", stale updates" if self.config.stale_updates else "")
            previous: WorkerTiming | None = None  # the worker's clock around its previous update
            ahead: Future | None = None  # --stale-updates: the next gradient, computed while the update flies
            while True:
                trained = ahead.result() if ahead is not None else _train(trainer, round_)
                grads, loss, n, buffers, compute_s = trained
                ctx = RoundContext(round=round_, rank=welcome.rank, seed=int(welcome.task.seed),
                                   num_workers=max(1, workers))
                encode_started = time.perf_counter()
                encoded = encoder.encode(grads, ctx, directive)
                encode_s = time.perf_counter() - encode_started
                result.last_buffers = buffers
                sent_at = time.perf_counter()
                stream.send(Update(
                    round=round_, tensors=tuple(encoded), train_loss=loss, num_examples=n,
                    compute_seconds=compute_s, buffers=buffers or None, encode_seconds=encode_s,
                    previous_round=previous,
                ))
                # One-round-stale updates: the gradient for the next round is computed on the model at
                # hand while this update is in flight and the PS aggregates; the PS applies it one
                # round late. The trainer's model is not touched again until it is done.
                ahead = pool.submit(_train, trainer, round_ + 1) if pool is not None else None
                try:
                    reply = stream.receive()
                except MalformedMessage as exc:
                    # Never train on a model we could not read: a new session brings the full one.
                    log.warning("cannot read the PS's answer (%s); reconnecting for the full model", exc)
                    return
                reply_wait_s = time.perf_counter() - sent_at
                if reply is None:
                    raise WorkerFailed("the PS closed the stream without an answer")
                if isinstance(reply, Finished):
                    self._finish(stream, reply, encoder, result)
                    return
                if not isinstance(reply, RoundResult):
                    raise WorkerFailed(f"the PS answered an update with a {type(reply).__name__}")
                decode_started = time.perf_counter()
                if reply.model_delta is not None:
                    try:
                        # params is the reference of round_, the round this worker just trained in
                        new_params = downlink.apply(params, round_, reply.model_delta, reply.round)
                    except (MalformedMessage, InvalidUpdate) as exc:
                        # Never train on a model we could not rebuild: a new session brings the full one.
                        log.warning("cannot apply the PS's model delta (%s); reconnecting for the full model", exc)
                        self._end_session(stream)
                        return
                elif reply.model is not None:
                    new_params = reply.model
                else:
                    # A result with neither model nor delta: nothing to train on; a new session brings one.
                    log.warning("round %d result carries no model; reconnecting for the full model", reply.round)
                    self._end_session(stream)
                    return
                usable_model(new_params, f"result of round {round_}")
                decode_s = time.perf_counter() - decode_started
                if ahead is not None:
                    ahead.result()  # the trainer's model is free again (an error surfaces here)
                    if reply.round != round_ + 1:
                        ahead = None  # computed for a round the PS moved this worker past: recompute
                load_started = time.perf_counter()
                params = new_params
                result.last_model = params
                trainer.load(params)
                if reply.buffers is not None:
                    load_buffers(trainer.model, reply.buffers)
                encoder.model_received(params)
                previous = WorkerTiming(reply_wait_s, decode_s + time.perf_counter() - load_started)
                round_, directive, workers = reply.round, reply.directive, reply.workers
                result.rounds += 1
        except SESSION_ERRORS:
            self._end_session(stream)  # the PS must forget this session before the next Hello
            raise
        finally:
            stream.close()
            if pool is not None:
                pool.shutdown(wait=True)

    @staticmethod
    def _end_session(stream: TrainStream) -> None:
        """Half-close the stream and wait until the PS ends it. The PS forgets a session only when
        its stream ends: a Hello sent before that is refused as a duplicate (ALREADY_EXISTS)."""
        stream.close()
        try:
            while stream.receive() is not None:
                pass
        except grpc.RpcError as err:
            log.info("stream closed: %s", err.code().name)

    def _finish(self, stream: TrainStream, finished: Finished, encoder: UpdateEncoder | None, result: WorkerResult) -> None:
        self.stats = encoder.stats() if encoder is not None else self.stats
        stream.send(WorkerReport(
            codec_stats=self.stats, interface_start=self.interface_start,
            interface_end=read_counters(self.interface),
        ))
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


def _train(trainer: Trainer, round_: int) -> tuple[dict[str, np.ndarray], float, int, dict | None, float]:
    """The update for ``round_`` on the trainer's current model, its buffers and the compute seconds."""
    started = time.perf_counter()
    grads, loss, n = trainer.update(round_)
    buffers = buffer_state(trainer.model)
    return grads, loss, n, buffers, time.perf_counter() - started


def run_worker(config: WorkerConfig) -> int:
    limit_cpu_threads(config.threads)
    result = Worker(config).run()
    return 0 if result.finished else 1
