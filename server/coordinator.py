"""Synchronous rounds, the byte ledger and the global model.

One coordinator thread runs the rounds: it opens round r, waits until every
expected worker has submitted (or the round timeout passes: missing workers are
counted as stragglers), aggregates, steps the server optimizer, evaluates every
``eval_every`` rounds and publishes round r+1. Worker streams call ``join``,
``submit`` and ``report`` from gRPC handler threads.

Nothing a worker sends touches shared state until it is fully validated and
decoded, so a rejected message never reaches the global model or the other
workers. A rejected worker loses its session (and with it its decoder state);
when it reconnects both ends start from reset codec state (ALGORITHMS.md §0).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gradwire.compressors.base import RoundContext
from gradwire.compressors.registry import create_codec
from gradwire.compressors.update import InvalidUpdate, UpdateDecoder
from gradwire.server.admission import next_rank, prune_records
from gradwire.server.aggregation import ServerOptimizer
from gradwire.server.config import ServerConfig
from gradwire.server.robust import robust_step

from gradwire import wire
from gradwire.downlink import DENSE, Broadcast, DownlinkEncoder, check_downlink_codec
from gradwire.netstats import read_counters
from gradwire.tasks import Task, shard_indices, tensor_specs
from gradwire.v1 import exchange_pb2 as pb

log = logging.getLogger("gradwire.server")


class Rejected(Exception):
    """A message the PS refuses; ``code`` names a grpc.StatusCode."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class WorkerRecord:
    """What the PS keeps about a worker id across its sessions."""

    worker_id: str
    rank: int
    hostname: str = ""
    connected: bool = False
    sessions: int = 0
    rounds_aggregated: int = 0
    uplink_payload_bytes: int = 0
    uplink_message_bytes: int = 0
    uplink_control_bytes: int = 0  # hello and report messages
    downlink_message_bytes: int = 0
    downlink_payload_bytes: int = 0  # model floats, or the downlink codec's delta bytes
    downlink_models: int = 0  # messages that carried a model or a model delta
    rejected_messages: int = 0
    rejected_message_bytes: int = 0
    last_rejection: str = ""
    interface_start: dict | None = None
    interface_end: dict | None = None
    codec_stats: dict[str, float] = field(default_factory=dict)
    decoder_stats: dict[str, float] = field(default_factory=dict)
    shard_size: int = 0


@dataclass
class Session:
    record: WorkerRecord
    decoder: UpdateDecoder
    start_round: int = 0
    alive: bool = True
    reference_round: int = -1  # the broadcast reference the worker holds (downlink deltas)


@dataclass
class Contribution:
    decoded: dict[str, np.ndarray]
    train_loss: float
    num_examples: int
    payload_bytes: int
    message_bytes: int


class Coordinator:
    def __init__(self, config: ServerConfig, task: Task):
        self.config = config
        self.task = task
        self.codec = create_codec(config.codec)
        self.downlink_codec = check_downlink_codec(config.downlink_codec)
        self.codec_coordinator = self.codec.make_coordinator()
        torch.manual_seed(config.seed)
        self.model = task.build_model()
        self.specs = tensor_specs(self.model)
        self.params = sum(s.numel for s in self.specs)
        self.server_momentum = config.server_momentum(self.codec.worker_momentum)
        if self.codec.worker_momentum and self.server_momentum:
            log.warning("codec %s applies momentum %g at the workers and the PS adds momentum %g: momentum is "
                        "applied twice (use --momentum auto or 0)", self.codec.spec, self.codec.worker_momentum,
                        self.server_momentum)
        self.optimizer = ServerOptimizer(
            self.model, config.lr, self.server_momentum, config.weight_decay, config.lr_schedule, config.rounds
        )
        self.cond = threading.Condition()
        self.phase = "waiting"  # waiting -> collecting <-> aggregating -> finished
        self.round = 0
        self.num_shards = 0
        self.records: dict[str, WorkerRecord] = {}
        self.sessions: dict[str, Session] = {}
        self.expected: set[str] = set()
        self.contributions: dict[str, Contribution] = {}
        self.aggregated_last: set[str] = set()
        self.directive: dict[str, float] = {}
        self.rounds_log: list[dict[str, Any]] = []
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
        if config.resume:
            self._load_checkpoint(config.resume)
        # Dense downlink: the model itself goes out in full (model_msg). With a downlink codec the
        # workers hold the broadcast reference θ̂ instead, moved by encoded deltas; it starts (and,
        # after a resume, restarts) as the model itself.
        self.model_msg: pb.Model | None = None
        self.downlink: DownlinkEncoder | None = None
        self.broadcast: Broadcast | None = None
        if self.downlink_codec.spec != DENSE:
            self.downlink = DownlinkEncoder(self.downlink_codec, self.specs, config.seed)
            self.broadcast = self.downlink.start(self._params(), len(self.rounds_log))
        else:
            self.model_msg = self._model_proto()

    # ------------------------------------------------------------ helpers

    def _params(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy() for n, p in self.model.named_parameters()}

    def _model_proto(self) -> pb.Model:
        return wire.model_to_proto(self._params())

    def _model_reply(self, session: Session, **fields) -> pb.RoundResult:
        """A RoundResult with the model delta when the worker holds its base, else the full model."""
        b = self.broadcast
        if b is not None and b.delta is not None and session.reference_round == b.delta.base_round:
            result = pb.RoundResult(model_delta=b.delta, **fields)
        else:
            result = pb.RoundResult(model=self._full_model(), **fields)
        session.reference_round = b.round if b is not None else -1
        return result

    def _full_model(self) -> pb.Model:
        """What a worker trains on, in full: the broadcast reference, or the model itself."""
        return self.broadcast.model if self.broadcast is not None else self.model_msg

    def _ctx(self, rank: int, round_: int) -> RoundContext:
        return RoundContext(
            round=round_, rank=rank, seed=self.config.seed, num_workers=max(1, len(self.expected)),
            directive=dict(self.directive),
        )

    def _directive_proto(self, rank: int, round_: int) -> pb.CodecDirective:
        blob = self.codec_coordinator.blob_for(rank, round_) if self.codec_coordinator else b""
        return pb.CodecDirective(values=self.directive, blob=blob)

    def _task_spec(self, rank: int) -> pb.TaskSpec:
        c = self.config
        return pb.TaskSpec(
            dataset=c.dataset, model=self.task.model_name, batch_size=c.batch_size,
            num_shards=self.num_shards, shard_index=rank % self.num_shards, partition=c.partition,
            dirichlet_alpha=c.dirichlet_alpha, seed=c.seed, data_dir=c.data_dir,
        )

    # ------------------------------------------------------------ worker side

    def join(self, hello: pb.Hello, message_bytes: int) -> Session:
        if hello.protocol != wire.PROTOCOL:
            raise Rejected("FAILED_PRECONDITION", f"protocol {hello.protocol!r} is not supported; this PS speaks {wire.PROTOCOL}")
        if hello.codecs and self.codec.name not in hello.codecs:
            raise Rejected(
                "FAILED_PRECONDITION",
                f"this run uses codec {self.codec.spec!r}, which the worker does not support (it offers {list(hello.codecs)})",
            )
        with self.cond:
            worker_id = hello.requested_worker_id or f"worker-{len(self.records)}"
            if worker_id in self.sessions:
                raise Rejected("ALREADY_EXISTS", f"worker id {worker_id!r} is already connected")
            record = self.records.get(worker_id)
            if record is None:
                prune_records(self.records)
                record = WorkerRecord(worker_id, rank=next_rank(self.records))
                self.records[worker_id] = record
            record.hostname = hello.hostname
            record.connected = True
            record.sessions += 1
            record.uplink_control_bytes += message_bytes
            if record.interface_start is None:
                record.interface_start = wire.counters_from_proto(hello.interface_start)
            session = Session(record, UpdateDecoder(self.codec, self.specs, self.codec_coordinator))
            self.sessions[worker_id] = session
            self.last_join = time.monotonic()
            self.cond.notify_all()
            log.info("worker %s joined as rank %d (session %d)", worker_id, record.rank, record.sessions)
            return session

    def welcome(self, session: Session) -> pb.ServerMessage:
        """Blocks until the run has started; returns Welcome (or Finished)."""
        with self.cond:
            while session.alive and (self.phase in ("waiting", "aggregating")) and not self.stop_requested.is_set():
                self.cond.wait(0.5)
            if self.phase == "finished" or self.stop_requested.is_set():
                return pb.ServerMessage(finished=pb.Finished(rounds=self.round, reason=self.finish_reason or "finished"))
            rank = session.record.rank
            session.start_round = self.round
            session.reference_round = self.broadcast.round if self.broadcast is not None else -1
            self.expected.add(session.record.worker_id)
            return pb.ServerMessage(
                welcome=pb.Welcome(
                    protocol=wire.PROTOCOL, worker_id=session.record.worker_id, rank=rank,
                    task=self._task_spec(rank), codec_spec=self.codec.spec, round=self.round,
                    total_rounds=self.config.rounds, model=self._full_model(),
                    directive=self._directive_proto(rank, self.round), workers=len(self.expected),
                    downlink_codec_spec=self.downlink_codec.spec,
                )
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
                if self.codec_coordinator is not None:
                    self.codec_coordinator.forget_worker(session.record.rank)
                log.info("worker %s (rank %d) left", wid, session.record.rank)
            self.cond.notify_all()

    def reject(self, session: Session | None, reason: str, message_bytes: int) -> None:
        if session is None:
            return
        with self.cond:
            session.record.rejected_messages += 1
            session.record.rejected_message_bytes += message_bytes
            session.record.last_rejection = reason
        log.warning("rejected a message from %s: %s", session.record.worker_id, reason)

    def submit(self, session: Session, update: pb.Update, message_bytes: int) -> pb.ServerMessage:
        """Validate, decode and file one update; block until the round closes."""
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
            tensors = [wire.encoded_from_proto(t) for t in update.tensors]
            decoded = session.decoder.decode(tensors, self._ctx(record.rank, current))
        except (wire.MalformedMessage, InvalidUpdate) as exc:
            raise Rejected("INVALID_ARGUMENT", str(exc)) from None
        payload = wire.payload_bytes(tensors)
        with self.cond:
            if self.round != current or self.phase != "collecting" or not session.alive:
                raise Rejected("FAILED_PRECONDITION", f"stale update for round {current}: the round closed while it was decoded")
            self.contributions[record.worker_id] = Contribution(
                decoded, float(update.train_loss), int(update.num_examples), payload, message_bytes
            )
            record.uplink_payload_bytes += payload
            record.uplink_message_bytes += message_bytes
            self.cond.notify_all()
            while self.round == current and self.phase != "finished" and session.alive:
                self.cond.wait(0.5)
            if self.phase == "finished":
                return pb.ServerMessage(finished=pb.Finished(rounds=self.round, reason=self.finish_reason))
            return pb.ServerMessage(
                round_result=self._model_reply(
                    session, round=self.round, directive=self._directive_proto(record.rank, self.round),
                    update_aggregated=record.worker_id in self.aggregated_last, workers=len(self.expected),
                )
            )

    def count_downlink(self, session: Session, nbytes: int, payload: int = 0, models: int = 0) -> None:
        """``payload``: model bytes the message carries (floats, or delta codec bytes) in ``models`` models."""
        with self.cond:
            session.record.downlink_message_bytes += nbytes
            session.record.downlink_payload_bytes += payload
            session.record.downlink_models += models
            if self.rounds_log and self.phase != "waiting":
                entry = self.rounds_log[-1]
                entry["downlink_message_bytes"] += nbytes
                entry["downlink_payload_bytes"] = entry.get("downlink_payload_bytes", 0) + payload

    def report(self, session: Session, report: pb.WorkerReport, message_bytes: int) -> None:
        with self.cond:
            rec = session.record
            rec.uplink_control_bytes += message_bytes
            rec.codec_stats = {k: float(v) for k, v in report.codec_stats.items()}
            rec.interface_start = wire.counters_from_proto(report.interface_start) or rec.interface_start
            rec.interface_end = wire.counters_from_proto(report.interface_end)
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
        self.round = round_
        self.phase = "collecting"
        self.expected = set(self.sessions)
        self.contributions = {}
        if self.codec_coordinator is not None:
            ranks = sorted(self.sessions[w].record.rank for w in self.expected)
            self.directive = {k: float(v) for k, v in self.codec_coordinator.directive(round_, ranks).items()}
        self.rounds_log.append({
            "round": round_, "uplink_payload_bytes": 0, "uplink_message_bytes": 0, "downlink_message_bytes": 0,
            "downlink_payload_bytes": 0, "workers": 0, "stragglers": 0, "train_loss": None, "test_accuracy": None, "test_loss": None,
            "lr": self.optimizer.lr_at(round_),
        })

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
            log.exception("coordinator failed")
            self.finish_reason = "server error"
            raise
        finally:
            with self.cond:
                self.phase = "finished"
                self.finished_at = time.monotonic()
                self.cond.notify_all()
            self._wait_for_reports()
            self.interface_end = read_counters()

    def _run(self) -> None:
        if self.initial_accuracy is None and self.initial_loss is None:
            self.initial_loss, self.initial_accuracy = self._evaluate()
        if not self._wait_for_start():
            return
        self.started_at = time.monotonic()
        first = len(self.rounds_log)  # > 0 when resumed from a checkpoint
        with self.cond:
            self._open_round(first)
            self.cond.notify_all()
        log.info("run started with %d workers (%d shards), codec %s, %d params", len(self.sessions), self.num_shards, self.codec.spec, self.params)
        for r in range(first, self.config.rounds):
            collected = self._collect(r)
            if collected is None:
                self.rounds_log.pop()
                return
            contributions, stragglers = collected
            if self.stop_requested.is_set():
                self.finish_reason = "stopped (SIGTERM)"
                self.rounds_log.pop()
                return
            by_rank = {self.records[w].rank: c.decoded for w, c in contributions.items()}
            if self.codec_coordinator is not None:
                by_rank = self._finalize(r, by_rank)
            step = robust_step(by_rank, {self.records[w].rank: w for w in contributions}, self.optimizer, self.model,
                               r, self.config.aggregate, self.config.clip_multiple, self.config.trim_fraction,
                               self.config.outliers)
            if self.codec_coordinator is not None:
                self.codec_coordinator.observe(r, by_rank)
            entry = self.rounds_log[-1]
            entry["uplink_payload_bytes"] = sum(c.payload_bytes for c in contributions.values())
            entry["uplink_message_bytes"] = sum(c.message_bytes for c in contributions.values())
            entry["workers"] = len(contributions)
            entry["stragglers"] = len(stragglers)
            entry.update(refused=step.refused, clipped=step.clipped, suspects=step.suspects)
            entry["train_loss"] = float(np.mean([c.train_loss for c in contributions.values()]))
            if (r + 1) % self.config.eval_every == 0 or r + 1 == self.config.rounds:
                entry["test_loss"], entry["test_accuracy"] = self._evaluate()
            for w in contributions:
                self.records[w].rounds_aggregated += 1
            new_model = broadcast = None
            if self.downlink is None:
                new_model = self._model_proto()
            elif r + 1 < self.config.rounds:  # after the last round the workers get Finished
                broadcast = self.downlink.advance(self.broadcast, self._params(), r + 1)
            if self.config.checkpoint_every and self.config.out and (r + 1) % self.config.checkpoint_every == 0:
                self.save_checkpoint(Path(self.config.out) / "checkpoint.pt")
            with self.cond:
                if new_model is not None:
                    self.model_msg = new_model
                if broadcast is not None:
                    self.broadcast = broadcast
                self.aggregated_last = set(contributions)
                if r + 1 < self.config.rounds:
                    self._open_round(r + 1)
                else:
                    self.round = r + 1
                    self.finish_reason = f"completed {self.config.rounds} rounds"
                    self.phase = "finished"
                self.cond.notify_all()
            log.info(
                "round %d: %d workers, %d payload bytes, loss %.4f%s", r, entry["workers"], entry["uplink_payload_bytes"],
                entry["train_loss"], f", test accuracy {entry['test_accuracy']:.4f}" if entry["test_accuracy"] is not None else "",
            )

    def _finalize(self, round_: int, by_rank: dict[int, dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
        """The codec's cross-worker decoding; anything non-finite is left out of the round."""
        out = self.codec_coordinator.finalize(round_, by_rank)
        clean = {}
        for rank, update in out.items():
            if all(np.isfinite(a).all() for a in update.values()):
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

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "config": self.config.to_json(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rounds_log": self.rounds_log,
            "initial": (self.initial_loss, self.initial_accuracy),
            "records": {w: vars(r).copy() for w, r in self.records.items()},
            "codec_coordinator": self.codec_coordinator.state_dict() if self.codec_coordinator else None,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def _load_checkpoint(self, path: str) -> None:
        # Workers reconnect after a PS restart, so every decoder starts fresh and
        # the workers reset their encoders: the resync rule of ALGORITHMS.md §0.
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds_log = [e for e in state["rounds_log"] if e["workers"] > 0]
        self.initial_loss, self.initial_accuracy = state["initial"]
        for w, fields in state["records"].items():
            rec = WorkerRecord(**{**fields, "connected": False})
            self.records[w] = rec
        if self.codec_coordinator is not None and state["codec_coordinator"] is not None:
            self.codec_coordinator.load_state_dict(state["codec_coordinator"])
        log.info("resumed from %s at round %d", path, len(self.rounds_log))

    # ------------------------------------------------------------ reporting

    def snapshot(self) -> dict[str, Any]:
        with self.cond:
            return {
                "round": self.round,
                "phase": self.phase,
                "records": [vars(r).copy() for r in sorted(self.records.values(), key=lambda r: r.rank)],
                "rounds_log": [dict(e) for e in self.rounds_log],
            }

    def shard_sizes(self) -> dict[int, int]:
        labels = self.task.dataset.train_y
        n = max(1, self.num_shards)
        return {i: len(shard_indices(labels, n, i, self.config.partition, self.config.dirichlet_alpha, self.config.seed)) for i in range(n)}
