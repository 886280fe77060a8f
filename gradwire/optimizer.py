"""Keep your own training loop: wrap its optimizer, and every ``step()`` is a gradwire round.

::

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = gradwire.DistributedOptimizer(opt, model, server="ps:50051", codec="ans:bits=4")
    for x, y in loader:                      # the loop is unchanged
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()                           # local step; every local_steps: push the update, pull the model
    opt.close()

The optimizer speaks the same ``gradwire.v1`` stream as ``gradwire worker`` (Hello, Welcome,
Update, RoundResult, Finished, WorkerReport), so the PS counts its bytes in the same ledger and
the same codecs, downlink codecs and buffer averaging apply. The PS must run a task with the
same model (``gradwire server --task mymodule:make_task``): it evaluates and checkpoints it.

What is sent: after the wrapped optimizer's step (every ``local_steps`` steps), the model delta
since the last synchronisation divided by each parameter group's learning rate,
(θ_sync − θ) / lr: the gradient itself for one plain SGD step, the sum of the local gradients for
several. The PS's optimizer applies the mean of these like a gradient (its ``--lr``, momentum and
schedule), and the new model replaces the local one. ``--lr`` equal to the local lr and
``--momentum 0`` make the PS a plain model average (FedAvg). docs/tasks.md has the details.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from gradwire import protocol
from gradwire.buffers import buffer_state, load_buffers
from gradwire.compressors.base import RoundContext
from gradwire.compressors.registry import available_codecs, create_codec
from gradwire.compressors.update import UpdateEncoder
from gradwire.downlink import DownlinkDecoder
from gradwire.local import load_parameters
from gradwire.protocol import Finished, Hello, RoundResult, Update, Welcome, WorkerReport
from gradwire.taskref import TaskError
from gradwire.tasks import tensor_specs
from gradwire.worker.client import TrainStream, open_channel, wait_for_server

log = logging.getLogger("gradwire.optimizer")


class DistributedOptimizer:
    """Wraps a ``torch.optim.Optimizer``; ``step()`` also exchanges the update with a gradwire PS.

    ``server``: the PS's host:port; default ``$GRADWIRE_SERVER``, else 127.0.0.1:50051.
    ``local_steps``: wrapped-optimizer steps per round; default: the PS's ``--local-steps`` (1).
    ``codec``: the codec spec this process expects the PS to run (``None``: whatever it runs); a
    mismatch is refused at connection, as a misconfiguration. Everything else the PS decides.
    Attributes, ``zero_grad``, ``param_groups``, ``state_dict`` ... are the wrapped optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, server: str | None = None,
                 codec: str | None = None, local_steps: int | None = None, worker_id: str = "",
                 connect_timeout_s: float = 60.0, max_message_mb: int = 64):
        if local_steps is not None and local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        server = server or os.environ.get("GRADWIRE_SERVER") or "127.0.0.1:50051"
        self.optimizer = optimizer
        self.model = model
        self.finished = False
        self.rounds = 0
        self._steps = 0
        self._warned = False
        self._names = {id(p): name for name, p in model.named_parameters()}
        self.specs = tensor_specs(model)
        self._channel = open_channel(server, max_message_mb)
        wait_for_server(self._channel, connect_timeout_s)
        self._stream = TrainStream(self._channel)
        self._stream.send(Hello(
            protocol=protocol.PROTOCOL, requested_worker_id=worker_id or f"{socket.gethostname()}-opt-{id(self):x}",
            codecs=tuple(available_codecs()), hostname=socket.gethostname(),
        ))
        opening = self._stream.receive()
        if not isinstance(opening, Welcome):
            self.close()
            raise ConnectionError("the PS did not welcome this optimizer (the run is over or it refused)")
        welcome = opening
        if codec is not None and create_codec(codec).spec != create_codec(welcome.codec_spec).spec:
            self.close()
            raise ValueError(f"the PS runs codec {welcome.codec_spec!r}, this optimizer expects {codec!r}")
        self.codec = create_codec(welcome.codec_spec)
        # As given, else what the PS's run says (--local-steps), else one step per round.
        self.local_steps = local_steps or max(1, int(welcome.task.local_steps))
        self.rank = int(welcome.rank)
        self.seed = int(welcome.task.seed)
        self.worker_id = welcome.worker_id
        self._encoder = UpdateEncoder(self.codec, self.specs)
        self._downlink = DownlinkDecoder(welcome.downlink_codec_spec, self.specs, self.seed)
        params = welcome.model
        mine = {s.name: tuple(s.shape) for s in self.specs}
        if mine != {n: tuple(a.shape) for n, a in params.items()}:
            self.close()
            raise TaskError("the PS's model does not match this model (parameter names or shapes differ); "
                            "run the PS with a --task that builds the same model")
        self._adopt(params, welcome.buffers)
        self._round, self._directive, self._workers = welcome.round, welcome.directive, welcome.workers
        log.info("joined %s as %s (rank %d), codec %s", server, self.worker_id, self.rank, self.codec.spec)

    # ------------------------------------------------------------ the wrapped optimizer

    def __getattr__(self, name: str):
        if name == "optimizer":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], torch.Tensor] | None = None, loss: float | None = None):
        """The wrapped optimizer's step; every ``local_steps`` steps also one gradwire round.

        ``loss`` (or the closure's result) is reported to the PS as the round's training loss.
        """
        # torch's stubs type a closure as returning float; in practice (and here) it returns the loss tensor.
        result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()  # type: ignore[arg-type]
        if loss is None and result is not None:
            loss = float(result)
        if self.finished:
            if not self._warned:
                log.warning("the PS finished its rounds; further steps are local only")
                self._warned = True
            return result
        self._steps += 1
        if self._steps % self.local_steps == 0:
            self._exchange(0.0 if loss is None else float(loss))
        return result

    # ------------------------------------------------------------ the exchange

    def _adopt(self, params: dict[str, np.ndarray], buffers: dict[str, np.ndarray] | None) -> None:
        load_parameters(self.model, params)
        if buffers is not None:
            load_buffers(self.model, buffers)
        self._encoder.model_received(params)  # the model motion, for codecs that declare they need it
        self._reference = params  # what the PS sent: the base of the next delta and downlink delta

    def _update(self) -> dict[str, np.ndarray]:
        update = {}
        for group in self.optimizer.param_groups:
            lr = float(group["lr"])
            if lr <= 0:
                raise ValueError("DistributedOptimizer needs a learning rate > 0 in every parameter group")
            for p in group["params"]:
                name = self._names.get(id(p))
                if name is not None:
                    update[name] = ((self._reference[name] - p.detach().cpu().numpy()) / lr).astype(np.float32)
        missing = [s.name for s in self.specs if s.name not in update]
        if missing:
            raise ValueError(f"parameters not in the wrapped optimizer: {missing[:5]}")
        return update

    def _exchange(self, loss: float) -> None:
        started = time.perf_counter()
        ctx = RoundContext(round=self._round, rank=self.rank, seed=self.seed, num_workers=max(1, self._workers))
        encoded = self._encoder.encode(self._update(), ctx, self._directive)
        buffers = buffer_state(self.model)
        self._stream.send(Update(
            round=self._round, tensors=tuple(encoded), train_loss=loss, num_examples=0,
            compute_seconds=time.perf_counter() - started, buffers=buffers or None,
        ))
        reply = self._stream.receive()
        if reply is None:
            raise ConnectionError("the PS closed the stream without an answer")
        if isinstance(reply, Finished):
            self._finish()
            return
        if not isinstance(reply, RoundResult):
            raise ConnectionError(f"the PS answered an update with a {type(reply).__name__}")
        if reply.model_delta is not None:
            params = self._downlink.apply(self._reference, self._round, reply.model_delta, reply.round)
        elif reply.model is not None:
            params = reply.model
        else:
            raise ConnectionError(f"the PS's result for round {reply.round} carries no model")
        self._adopt(params, reply.buffers)
        self._round, self._directive, self._workers = reply.round, reply.directive, reply.workers
        self.rounds += 1

    def _finish(self) -> None:
        self.finished = True
        self._stream.send(WorkerReport(codec_stats=self._encoder.stats()))
        self._stream.close()
        try:
            while self._stream.receive() is not None:
                pass
        except Exception as exc:  # noqa: BLE001 - the PS may already be gone; the run is over either way
            log.info("stream closed after the report: %s", exc)

    @property
    def sent_bytes(self) -> int:
        """Protobuf bytes this optimizer sent (the PS's ledger counts the same messages)."""
        return self._stream.sent_bytes

    def close(self) -> None:
        """Leave the run (the PS counts this worker as gone); idempotent."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if not self.finished and hasattr(self, "_stream"):
            self._stream.close()
        self._channel.close()

    def __enter__(self) -> DistributedOptimizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
