"""The round engine: synchronous rounds and the global model.

One engine thread runs the rounds: it opens round r, waits until every
expected worker has submitted (or the round timeout passes: missing workers are
counted as stragglers), aggregates, steps the server optimizer, evaluates every
``eval_every`` rounds and publishes round r+1. Worker streams call ``join``,
``submit`` and ``report`` from gRPC handler threads, with typed messages
(``gradwire.protocol``); the servicer converts them from and to protobuf.

Nothing a worker sends touches shared state until it is fully validated and
decoded, so a rejected message never reaches the global model or the other
workers. A rejected worker loses its session (and with it its decoder state);
when it reconnects both ends start from reset codec state (docs/algorithms.md §0).

The codec's PS-wide state is reached through one interface
(``compressors.base.CrossWorkerState``), whose hooks run for every codec: the
engine has no codec-specific branch. Bytes are counted in the ledger
(``server/ledger.py``); checkpoints are ``server/checkpoint.py``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradwire import protocol
from gradwire.buffers import (
    InvalidBuffers,
    buffer_specs,
    buffer_state,
    check_buffers,
    load_buffers,
    mean_buffers,
)
from gradwire.compressors.base import CrossWorkerState, Directive, LinkSample, RoundContext
from gradwire.compressors.finite import all_finite
from gradwire.compressors.registry import create_codec
from gradwire.compressors.update import InvalidUpdate, UpdateDecoder
from gradwire.downlink import DENSE, Broadcast, DownlinkEncoder, check_downlink_codec
from gradwire.netstats import read_counters
from gradwire.protocol import (
    Finished,
    Hello,
    RoundResult,
    ServerMessage,
    TaskSpec,
    Update,
    Welcome,
    WorkerReport,
)
from gradwire.server.admission import check_codec_stats
from gradwire.server.aggregation import ServerOptimizer
from gradwire.server.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from gradwire.server.config import ServerConfig
from gradwire.server.history import LinkLog
from gradwire.server.ledger import Ledger, LedgerSnapshot, WorkerRecord
from gradwire.server.robust import robust_step
from gradwire.server.timing import RoundClock, WorkerRound
from gradwire.task import Task
from gradwire.tasks import BUILTIN_TASKS, shard_indices, tensor_specs

log = logging.getLogger("gradwire.server")
# A handler blocked in submit is woken when its round closes (or its session or the run ends):
# every such change notifies ``round_closed``, so this timeout is only a guard.
HANDLER_WAIT_S = 5.0


class Rejected(Exception):
    """A message the PS refuses; ``code`` names a grpc.StatusCode."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Session:
    record: WorkerRecord
    decoder: UpdateDecoder
    start_round: int = 0
    alive: bool = True
    reference_round: int = -1  # the broadcast reference the worker holds (downlink deltas)
    # When the last model message (Welcome or RoundResult) was handed to gRPC, and its bytes: the
    # start of the worker's next round trip, for the link measurement (CrossWorkerState.observe_link).
    model_sent_at: float | None = None
    model_sent_bytes: int = 0


@dataclass
class Contribution:
    decoded: dict[str, np.ndarray]
    train_loss: float
    num_examples: int
    payload_bytes: int
    message_bytes: int
    buffers: dict[str, np.ndarray] | None = None  # the worker's buffers (BatchNorm statistics), if any
    norm: float | None = None  # the update's L2 norm, computed on the handler's thread (see submit)


class RoundEngine:
    def __init__(self, config: ServerConfig, task: Task):
        self.config = config
        self.task = task
        self.codec = create_codec(config.codec)
        self.downlink_codec = check_downlink_codec(config.downlink_codec)
        self.codec_state = self.codec.make_cross_worker_state()
        torch.manual_seed(config.seed)
        self.model = task.build_model(config.seed)
        task.check_outputs(self.model)
        self.specs = tensor_specs(self.model)
        # Buffers (BatchNorm statistics) are averaged from the workers each round (gradwire/buffers.py).
        self.buffer_specs = buffer_specs(self.model)
        self.params = sum(s.numel for s in self.specs)
        self.server_momentum = config.server_momentum(self.codec.worker_momentum)
        if self.codec.worker_momentum and self.server_momentum:
            log.warning("codec %s applies momentum %g at the workers and the PS adds momentum %g: momentum is "
                        "applied twice (use --momentum auto or 0)", self.codec.spec, self.codec.worker_momentum,
                        self.server_momentum)
        self.optimizer = ServerOptimizer(
            self.model, config.lr, self.server_momentum, config.weight_decay, config.lr_schedule, config.rounds
        )
        lock = threading.RLock()
        self.cond = threading.Condition(lock)  # engine state: the rounds thread, joins, welcomes
        # Handlers waiting for their round to close wait here, not on ``cond``: a submit wakes the
        # rounds thread only, and each handler wakes once per round (not W times: W² a round).
        self.round_closed = threading.Condition(lock)
        # Norms for clipping are computed as updates arrive, in parallel on the handlers' threads,
        # when the codec's cross-worker finalize is the identity (it cannot change the updates).
        self.finalize_is_identity = type(self.codec_state).finalize is CrossWorkerState.finalize
        self.norms_on_arrival = self.finalize_is_identity
        self.phase = "waiting"  # waiting -> collecting <-> aggregating -> finished
        self.round = 0
        self.num_shards = 0
        self.ledger = Ledger()
        self.sessions: dict[str, Session] = {}
        self.expected: set[str] = set()
        self.contributions: dict[str, Contribution] = {}
        self.aggregated_last: set[str] = set()
        self.directive_values: dict[str, float] = {}
        # every link measurement with the worker's rank, for the summary (compact: server/history.py)
        self.link_samples = LinkLog()
        self.initial_loss: float | None = None
        self.initial_accuracy: float | None = None
        self.last_join = 0.0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason = ""
        self.stop_requested = threading.Event()
        self.reports_done = threading.Event()
        self.interface_start = read_counters()
        self.interface_end: dict | None = None
        self.clock = RoundClock()  # where each round's wall time goes (server/timing.py)
        self.eval_seconds = 0.0  # evaluations so far: not training time
        if config.resume:
            self._resume(config.resume)
        # Dense downlink: the model itself goes out in full (model_sent: views of the round's
        # serialized RoundResult, taken when a round opens, _snapshot_model; a copy at the start).
        # With a downlink codec the workers hold the broadcast reference θ̂ instead, moved by
        # encoded deltas; it starts (and, after a resume, restarts) as the model itself.
        self.serializer = protocol.BroadcastSerializer()  # the servicer serializes RoundResults with it
        self.model_sent: dict[str, np.ndarray] | None = None
        self.downlink: DownlinkEncoder | None = None
        self.broadcast: Broadcast | None = None
        if self.downlink_codec.spec != DENSE:
            self.downlink = DownlinkEncoder(self.downlink_codec, self.specs, config.seed)
            self.broadcast = self.downlink.start(self._params(), self.ledger.round_count())
        else:
            self.model_sent = self._params_copy()
        # The buffers go out in full with every model (gradwire/buffers.py), as of the last closed round.
        self.buffers_sent = buffer_state(self.model)

    @property
    def records(self) -> dict[str, WorkerRecord]:
        return self.ledger.records

    # ------------------------------------------------------------ helpers

    def _params(self) -> dict[str, np.ndarray]:
        """Views of the live parameters."""
        return {n: p.detach().numpy() for n, p in self.model.named_parameters()}

    def _params_copy(self) -> dict[str, np.ndarray]:
        """The model as it is now, for messages sent while the next round steps it."""
        return {n: np.array(a, dtype=np.float32) for n, a in self._params().items()}

    def _snapshot_model(self) -> None:
        """Caller holds the lock; a round has just opened. The model and buffers as the round's
        RoundResult carries them, serialized once (one copy of the live model, into the bytes
        gRPC sends: no copy of its own beside them) for the fields most workers get (their update
        aggregated, the round's directive values without a blob); model_sent and buffers_sent
        become views of those bytes, so every such worker's reply is those bytes
        (protocol.BroadcastSerializer). The directive is not asked of the codec's state here: its
        directive_for may keep state per call (LGC ships its encoder to a worker once); a worker
        whose directive differs gets its own serialization of the same views."""
        message = self.serializer.snapshot(RoundResult(
            round=self.round, directive=Directive(values=dict(self.directive_values)), update_aggregated=True,
            workers=len(self.expected), model=self._params(), buffers=self._buffers_sent(),
        ))
        self.model_sent = message.model
        if message.buffers is not None:
            self.buffers_sent = message.buffers

    def _buffers_sent(self) -> dict[str, np.ndarray] | None:
        """The PS's buffers as of the last closed round, or None when the model has none."""
        return self.buffers_sent if self.buffer_specs else None

    def _model_reply(self, session: Session, **fields) -> RoundResult:
        """A RoundResult with the model delta when the worker holds its base, else the full model."""
        b = self.broadcast
        if b is not None and b.delta is not None and session.reference_round == b.delta.base_round:
            result = RoundResult(model_delta=b.delta, buffers=self._buffers_sent(), **fields)
        else:
            result = RoundResult(model=self._full_model(), buffers=self._buffers_sent(), **fields)
        session.reference_round = b.round if b is not None else -1
        return result

    def _full_model(self) -> dict[str, np.ndarray]:
        """What a worker trains on, in full: the broadcast reference, or the model itself."""
        return self.broadcast.reference if self.broadcast is not None else self.model_sent  # type: ignore[return-value]  # set whenever there is no broadcast

    def _ctx(self, rank: int, round_: int) -> RoundContext:
        return RoundContext(
            round=round_, rank=rank, seed=self.config.seed, num_workers=max(1, len(self.expected)),
            directive=dict(self.directive_values),
        )

    def _directive_for(self, rank: int, round_: int) -> Directive:
        return self.codec_state.directive_for(rank, round_, self.directive_values)

    def _task_spec(self, rank: int) -> TaskSpec:
        c = self.config
        # A built-in task goes out as before (dataset and model names); a user task as its reference.
        builtin = not c.task or c.task in BUILTIN_TASKS
        return TaskSpec(
            dataset=(c.task or c.dataset) if builtin else "", model=self.task.model_name if builtin else c.model,
            batch_size=c.batch_size, num_shards=self.num_shards, shard_index=rank % self.num_shards,
            partition=c.partition, dirichlet_alpha=c.dirichlet_alpha, seed=c.seed, data_dir=c.data_dir,
            task="" if builtin else c.task, local_steps=c.local_steps if c.local_steps > 1 else 0,
            local_lr=c.effective_local_lr if c.local_steps > 1 else 0.0,
        )

    # ------------------------------------------------------------ worker side

    def join(self, hello: Hello, message_bytes: int) -> Session:
        if hello.protocol != protocol.PROTOCOL:
            raise Rejected("FAILED_PRECONDITION", f"protocol {hello.protocol!r} is not supported; this PS speaks {protocol.PROTOCOL}")
        if hello.codecs and self.codec.name not in hello.codecs:
            raise Rejected(
                "FAILED_PRECONDITION",
                f"this run uses codec {self.codec.spec!r}, which the worker does not support (it offers {list(hello.codecs)})",
            )
        with self.cond:
            worker_id = hello.requested_worker_id or f"worker-{len(self.records)}"
            if worker_id in self.sessions:
                raise Rejected("ALREADY_EXISTS", f"worker id {worker_id!r} is already connected")
            record = self.ledger.record_for(worker_id, keep=self.contributions)  # their round needs them
            record.hostname = hello.hostname
            record.connected = True
            record.sessions += 1
            self.ledger.count_control(record, message_bytes)
            if record.interface_start is None:
                record.interface_start = hello.interface_start
            session = Session(record, UpdateDecoder(self.codec, self.specs, self.codec_state))
            self.sessions[worker_id] = session
            self.last_join = time.monotonic()
            self.cond.notify_all()
            log.info("worker %s joined as rank %d (session %d)", worker_id, record.rank, record.sessions)
            return session

    def welcome(self, session: Session) -> ServerMessage:
        """Blocks until the run has started; returns Welcome (or Finished)."""
        with self.cond:
            while session.alive and (self.phase in ("waiting", "aggregating")) and not self.stop_requested.is_set():
                self.cond.wait(0.5)
            if self.phase == "finished" or self.stop_requested.is_set():
                return Finished(rounds=self.round, reason=self.finish_reason or "finished")
            rank = session.record.rank
            session.start_round = self.round
            session.reference_round = self.broadcast.round if self.broadcast is not None else -1
            self.expected.add(session.record.worker_id)
            return Welcome(
                protocol=protocol.PROTOCOL, worker_id=session.record.worker_id, rank=rank,
                task=self._task_spec(rank), codec_spec=self.codec.spec, round=self.round,
                total_rounds=self.config.rounds, model=self._full_model(),
                directive=self._directive_for(rank, self.round), workers=len(self.expected),
                downlink_codec_spec=self.downlink_codec.spec, buffers=self._buffers_sent(),
            )

    def leave(self, session: Session) -> None:
        with self.cond:
            session.alive = False
            wid = session.record.worker_id
            if self.sessions.get(wid) is session:
                del self.sessions[wid]
                session.record.connected = False
                session.record.decoder_stats = session.decoder.stats()
                self.expected.discard(wid)
                self.clock.forget_worker(wid)
                self.codec_state.forget_worker(session.record.rank)
                log.info("worker %s (rank %d) left", wid, session.record.rank)
            self.cond.notify_all()
            self.round_closed.notify_all()  # its handler may be waiting for the round

    def reject(self, session: Session | None, reason: str, message_bytes: int) -> None:
        if session is None:
            return
        with self.cond:
            self.ledger.count_rejection(session.record, reason, message_bytes)
        log.warning("rejected a message from %s: %s", session.record.worker_id, reason)

    def submit(self, session: Session, update: Update, message_bytes: int) -> ServerMessage:
        """Validate, decode and file one update; block until the round closes."""
        arrived_at = time.monotonic()
        record = session.record
        with self.cond:
            current, phase = self.round, self.phase
        if phase == "finished":
            raise Rejected("FAILED_PRECONDITION", f"training finished after round {current - 1}; update for round {update.round} refused")
        if update.round < current or (update.round == current and phase != "collecting"):
            raise Rejected("FAILED_PRECONDITION", f"stale update for round {update.round}: the PS is at round {current} (it closed round {update.round} without this worker)")
        if update.round > current:
            raise Rejected("FAILED_PRECONDITION", f"update for future round {update.round}: the PS is at round {current}")
        if record.worker_id in self.contributions:
            raise Rejected("ALREADY_EXISTS", f"worker {record.worker_id!r} already sent an update for round {current}")
        if not math.isfinite(update.train_loss):
            raise Rejected("INVALID_ARGUMENT", f"train_loss is {update.train_loss}; refusing an update from a diverged worker")
        try:
            decode_started = time.monotonic()
            # the norm clipping needs comes with the decoding's finiteness read (no pass of its own)
            decoded, decoded_norm = session.decoder.decode_with_norm(update.tensors, self._ctx(record.rank, current))
            decode_s = time.monotonic() - decode_started
        except InvalidUpdate as exc:
            raise Rejected("INVALID_ARGUMENT", str(exc)) from None
        payload = protocol.payload_bytes(update.tensors)
        buffers = None
        if update.buffers is not None and self.buffer_specs:
            try:
                check_buffers(update.buffers, self.buffer_specs)
            except InvalidBuffers as exc:
                raise Rejected("INVALID_ARGUMENT", f"buffers: {exc}") from None
            buffers = update.buffers
            payload += protocol.model_payload_bytes(buffers)  # buffers are model payload too
        norm = decoded_norm if self.norms_on_arrival else None  # clip_updates and the step proof read it
        with self.cond:
            if self.round != current or self.phase != "collecting" or not session.alive:
                raise Rejected("FAILED_PRECONDITION", f"stale update for round {current}: the round closed while it was decoded")
            self.contributions[record.worker_id] = Contribution(
                decoded, float(update.train_loss), int(update.num_examples), payload, message_bytes, buffers, norm
            )
            self.ledger.count_update(record, payload, message_bytes)
            timed = self.clock.arrived(current, record.worker_id, update, arrived_at, decode_s)
            self._observe_link(session, update.round, timed, message_bytes)
            self.cond.notify_all()
            while self.round == current and self.phase != "finished" and session.alive:
                self.round_closed.wait(HANDLER_WAIT_S)
            if self.phase == "finished":
                timed.answered_at = time.monotonic()
                return Finished(rounds=self.round, reason=self.finish_reason)
            reply = self._model_reply(
                session, round=self.round, directive=self._directive_for(record.rank, self.round),
                update_aggregated=record.worker_id in self.aggregated_last, workers=len(self.expected),
            )
            timed.answered_at = time.monotonic()
            return reply

    def _observe_link(self, session: Session, round_: int, timed: WorkerRound, message_bytes: int) -> None:
        """The worker's round trip since its last model message, for the codec (caller holds the lock).

        Not after a Welcome: the first round of a session also loads the data, which the worker's
        compute time does not cover. The worker's times are those the round clock checked
        (``timing.reported``); one it could not use counts as 0 (the transfer then includes it,
        which only makes the link look slower).
        """
        if session.model_sent_at is None or round_ <= session.start_round:
            return
        # The worker's own time: its training and its encoding, which differs a lot by codec
        # level; what is left of the round trip is the link.
        compute = (timed.compute_s or 0.0) + (timed.encode_s or 0.0)
        elapsed = timed.arrived_at - session.model_sent_at
        sample = LinkSample(round=round_, downlink_bytes=session.model_sent_bytes, uplink_bytes=message_bytes,
                            transfer_seconds=max(0.0, elapsed - compute), compute_seconds=min(compute, elapsed))
        self.link_samples.append(session.record.rank, sample)
        self.codec_state.observe_link(session.record.rank, sample)

    def count_downlink(self, session: Session, nbytes: int, payload: int = 0, models: int = 0) -> None:
        """``payload``: model bytes the message carries (floats, or delta codec bytes) in ``models`` models."""
        with self.cond:
            if models:
                session.model_sent_at, session.model_sent_bytes = time.monotonic(), nbytes
            self.ledger.count_downlink(session.record, nbytes, payload, models, in_round=self.phase != "waiting")

    def report(self, session: Session, report: WorkerReport, message_bytes: int) -> None:
        refusal = check_codec_stats(report.codec_stats)
        if refusal:
            raise Rejected("INVALID_ARGUMENT", refusal)
        with self.cond:
            rec = session.record
            self.ledger.count_control(rec, message_bytes)
            rec.codec_stats = dict(report.codec_stats)
            rec.interface_start = report.interface_start or rec.interface_start
            rec.interface_end = report.interface_end
            rec.decoder_stats = session.decoder.stats()
            self.cond.notify_all()

    # ------------------------------------------------------------ the rounds

    def _wait_for_start(self) -> bool:
        deadline = time.monotonic() + self.config.start_timeout_s
        with self.cond:
            while not self.stop_requested.is_set():
                now = time.monotonic()
                enough = len(self.sessions) >= self.config.workers
                quiet = now - self.last_join >= self.config.join_grace_s
                if enough and quiet:
                    break
                if now >= deadline:
                    if self.sessions:
                        log.warning("start timeout: starting with %d of %d workers", len(self.sessions), self.config.workers)
                        break
                    self.finish_reason = "no worker joined before the start timeout"
                    return False
                self.cond.wait(0.2)
            else:
                return False
            self.num_shards = len(self.sessions)
        return True

    def _evaluate(self) -> tuple[float, float | None]:
        loss, acc = self.task.evaluate(self.model)
        return float(loss), acc

    def _open_round(self, round_: int) -> None:
        """Caller holds the lock."""
        self.clock.open(round_, time.monotonic())
        self.round = round_
        self.phase = "collecting"
        self.expected = set(self.sessions)
        self.contributions = {}
        ranks = sorted(self.sessions[w].record.rank for w in self.expected)
        self.directive_values = {k: float(v) for k, v in self.codec_state.open_round(round_, ranks).items()}
        self.ledger.open_round(round_, self.optimizer.lr_at(round_))

    def _collect(self, round_: int) -> tuple[dict[str, Contribution], set[str]] | None:
        """The round's contributions and stragglers; None when every worker is gone."""
        deadline = time.monotonic() + self.config.round_timeout_s
        alone_since: float | None = None
        with self.cond:
            while not self.stop_requested.is_set():
                arrived = set(self.contributions)
                if self.expected and self.expected <= arrived:
                    break
                if not self.expected and arrived:
                    break  # everyone who was expected left, some had submitted
                if time.monotonic() >= deadline and arrived:
                    break
                # No worker connected and nothing to aggregate: wait one round
                # timeout for a reconnect, then end the run rather than hang.
                if not self.sessions and not arrived:
                    alone_since = alone_since or time.monotonic()
                    if time.monotonic() - alone_since >= self.config.round_timeout_s:
                        self.finish_reason = f"every worker left during round {round_}"
                        log.error("%s; ending the run", self.finish_reason)
                        return None
                else:
                    alone_since = None
                self.cond.wait(0.2)
            self.phase = "aggregating"
            stragglers = self.expected - set(self.contributions)
            if stragglers:
                log.warning("round %d: %d straggler(s) not aggregated: %s", round_, len(stragglers), sorted(stragglers))
            return dict(self.contributions), stragglers

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("round engine failed")
            self.finish_reason = "server error"
            raise
        finally:
            with self.cond:
                self.phase = "finished"
                self.finished_at = time.monotonic()
                self.clock.close_run(self.finished_at)
                self.cond.notify_all()
                self.round_closed.notify_all()
            self._wait_for_reports()
            self.interface_end = read_counters()

    def _run(self) -> None:
        if self.initial_accuracy is None and self.initial_loss is None:
            self.initial_loss, self.initial_accuracy = self._evaluate()
        if not self._wait_for_start():
            return
        self.started_at = time.monotonic()
        first = self.ledger.round_count()  # > 0 when resumed from a checkpoint
        with self.cond:
            self._open_round(first)
            self.cond.notify_all()
        log.info("run started with %d workers (%d shards), codec %s, %d params", len(self.sessions), self.num_shards, self.codec.spec, self.params)
        for r in range(first, self.config.rounds):
            collected = self._collect(r)
            if collected is None:
                with self.cond:
                    self.ledger.drop_open_round()
                return
            contributions, stragglers = collected
            aggregate_started = time.monotonic()
            if self.stop_requested.is_set():
                self.finish_reason = "stopped (SIGTERM)"
                with self.cond:
                    self.ledger.drop_open_round()
                return
            by_rank = self._finalize(r, {self.records[w].rank: c.decoded for w, c in contributions.items()})
            norms = {self.records[w].rank: c.norm for w, c in contributions.items() if c.norm is not None}
            step = robust_step(by_rank, {self.records[w].rank: w for w in contributions}, self.optimizer, self.model,
                               r, self.config.aggregate, self.config.clip_multiple, self.config.trim_fraction,
                               self.config.outliers, norms=norms if set(norms) >= set(by_rank) else None)
            sent = [contributions[w].buffers for w in sorted(contributions, key=lambda w: self.records[w].rank)]
            if not step.refused and any(b is not None for b in sent):  # a refused round leaves the model alone
                load_buffers(self.model, mean_buffers([b for b in sent if b is not None]))
            self.codec_state.observe(r, by_rank)
            train_loss = float(np.mean([c.train_loss for c in contributions.values()]))
            evaluated = (r + 1) % self.config.eval_every == 0 or r + 1 == self.config.rounds
            eval_started = time.monotonic()
            test_loss, test_accuracy = self._evaluate() if evaluated else (None, None)
            eval_s = time.monotonic() - eval_started if evaluated else 0.0
            with self.cond:
                entry = self.ledger.close_round(
                    {w: (c.payload_bytes, c.message_bytes) for w, c in contributions.items()}, len(stragglers), train_loss
                )
                entry.test_loss, entry.test_accuracy = test_loss, test_accuracy
                entry.refused, entry.clipped, entry.suspects = step.refused, step.clipped, step.suspects
            broadcast = None
            buffers_sent = buffer_state(self.model)
            downlink_started = time.monotonic()
            if self.downlink is not None and r + 1 < self.config.rounds:  # after the last round: Finished
                broadcast = self.downlink.advance(self.broadcast, self._params(), r + 1)  # type: ignore[arg-type]
            downlink_s = time.monotonic() - downlink_started
            if self.config.checkpoint_every and self.config.out and (r + 1) % self.config.checkpoint_every == 0:
                self.save_checkpoint(Path(self.config.out) / CHECKPOINT_NAME)
            with self.cond:
                if broadcast is not None:
                    self.broadcast = broadcast
                self.buffers_sent = buffers_sent
                self.aggregated_last = set(contributions)
                if r + 1 < self.config.rounds:
                    self._open_round(r + 1)
                    if self.downlink is None:
                        snapshot_started = time.monotonic()
                        self._snapshot_model()
                        downlink_s += time.monotonic() - snapshot_started
                self._time_round(r, aggregate_started, eval_started, eval_s, downlink_s)
                if r + 1 >= self.config.rounds:
                    self.round = r + 1
                    self.finish_reason = f"completed {self.config.rounds} rounds"
                    self.phase = "finished"
                self.cond.notify_all()
                self.round_closed.notify_all()  # each waiting handler, once
            log.info(
                "round %d: %d workers, %d payload bytes, loss %.4f%s", r, entry.workers, entry.uplink_payload_bytes,
                entry.train_loss, f", test accuracy {entry.test_accuracy:.4f}" if entry.test_accuracy is not None else "",
            )

    def _time_round(self, round_: int, aggregate_started: float, eval_started: float, eval_s: float,
                    downlink_s: float) -> None:
        """Caller holds the lock. The PS's parts of round ``round_`` (server/timing.py)."""
        timing = self.clock.rounds.get(round_)
        if timing is None:
            return
        timing.eval_s = eval_s
        timing.aggregate_s = eval_started - aggregate_started  # finalize, robust step, buffers
        if self.downlink is not None:
            timing.downlink_encode_s = downlink_s
        else:
            timing.aggregate_s += downlink_s  # the copy of the model that goes out
        timing.stepped_at, timing.evals_before = eval_started, self.eval_seconds
        self.eval_seconds += eval_s

    def _finalize(self, round_: int, by_rank: dict[int, dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
        """The codec's cross-worker decoding; anything non-finite is left out of the round."""
        out = self.codec_state.finalize(round_, by_rank)
        if self.finalize_is_identity:
            return out  # the updates as decoded: UpdateDecoder refused any non-finite one already
        clean = {}
        for rank, update in out.items():
            if all(all_finite(a) for a in update.values()):
                clean[rank] = update
            else:
                log.error("round %d: rank %d decodes to non-finite values after finalize; left out", round_, rank)
        if not clean:
            raise RuntimeError(f"round {round_}: no finite update left after the codec's finalize")
        return clean

    def _wait_for_reports(self) -> None:
        deadline = time.monotonic() + self.config.report_timeout_s
        with self.cond:
            while self.sessions and time.monotonic() < deadline:
                self.cond.wait(0.2)
        self.reports_done.set()

    def stop(self) -> None:
        self.stop_requested.set()
        with self.cond:
            self.cond.notify_all()
            self.round_closed.notify_all()

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: Path) -> None:
        with self.cond:
            ledger = self.ledger.state_dict()
        save_checkpoint(path, Checkpoint(
            config_json=self.config.to_json(), model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            ledger=ledger, initial_loss=self.initial_loss, initial_accuracy=self.initial_accuracy,
            codec_state=self.codec_state.state_dict(),
        ))

    def _resume(self, path: str) -> None:
        # Workers reconnect after a PS restart, so every decoder starts fresh and
        # the workers reset their encoders: the resync rule of docs/algorithms.md §0.
        checkpoint = load_checkpoint(path)
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(dict(checkpoint.optimizer))
        self.ledger.load_state_dict(checkpoint.ledger)
        self.initial_loss, self.initial_accuracy = checkpoint.initial_loss, checkpoint.initial_accuracy
        self.codec_state.load_state_dict(checkpoint.codec_state)
        log.info("resumed from %s at round %d", path, self.ledger.round_count())

    # ------------------------------------------------------------ reporting

    def snapshot(self) -> LedgerSnapshot:
        with self.cond:
            return self.ledger.snapshot(self.round, self.phase)

    def shard_sizes(self) -> dict[int, int]:
        c = self.config
        labels = self.task.train_targets() if c.partition == "dirichlet" else np.zeros(self.task.train_size)
        n = max(1, self.num_shards)
        return {i: len(shard_indices(labels, n, i, self.config.partition, self.config.dirichlet_alpha, self.config.seed)) for i in range(n)}
