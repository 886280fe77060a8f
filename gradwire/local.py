"""A worker's local training on its shard: one gradient per round, or K local steps.

``local_steps == 1`` (the default) computes one mini-batch gradient per round, which the PS's
optimizer applies: synchronous data-parallel SGD. ``local_steps = K > 1`` runs K plain SGD steps
with ``local_lr`` on the worker and sends the model delta divided by the local learning rate,
(θ_start − θ_K) / local_lr: the sum of the K gradients along the local path. Dividing by the
learning rate keeps the update on the scale of a gradient, so the PS's ``--lr`` and momentum keep
their meaning; ``--lr`` equal to the local lr with ``--momentum 0`` gives FedAvg (the new global
model is the mean of the workers' local models). See docs/tasks.md.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

from gradwire.task import Task, TaskError
from gradwire.tasks import tensor_specs


class LocalTrainer:
    def __init__(self, task: Task, indices: np.ndarray, batch_size: int, seed: int, rank: int,
                 local_steps: int = 1, local_lr: float = 0.0):
        if local_steps > 1 and local_lr <= 0:
            raise TaskError(f"local_steps={local_steps} needs a local learning rate > 0")
        self.task = task
        self.model = task.build_model(seed)
        train = task.train
        self.shard: TensorDataset | Subset
        if isinstance(train, TensorDataset) and len(train.tensors) == 2:
            # In memory already: slice the shard once, as contiguous tensors.
            idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
            self.shard = TensorDataset(train.tensors[0][idx], train.tensors[1][idx])
        else:
            # A lazy dataset reads only the items of this shard, batch by batch.
            self.shard = Subset(train, [int(i) for i in indices])
            if len(self.shard):
                task.note_target(self.shard[0][1])
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.local_steps = local_steps
        self.local_lr = local_lr
        self.specs = tensor_specs(self.model)

    @property
    def shard_size(self) -> int:
        return len(self.shard)

    def check_model(self, params: Mapping[str, np.ndarray]) -> None:
        """The PS's model must be this task's model: same parameter names and shapes."""
        mine = {s.name: tuple(s.shape) for s in self.specs}
        theirs = {name: tuple(a.shape) for name, a in params.items()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:4]
            raise TaskError(f"the PS's model does not match this task's model (differing name/shape: {diff}); "
                            "run the PS and the workers with the same --task")

    def load(self, params: Mapping[str, np.ndarray]) -> None:
        load_parameters(self.model, params)

    def _batch(self, round_: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.shard)
        if self.batch_size == 0 or self.batch_size >= n:
            if isinstance(self.shard, TensorDataset):
                return self.shard.tensors[0], self.shard.tensors[1]
            return Task.batch(self.shard, range(n))
        # Seeded by (seed, rank, round[, step]): a rerun draws the same batches.
        key = f"{self.seed}/{self.rank}/{round_}" + (f"/{step}" if step else "")
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        idx = torch.randperm(n, generator=g)[: self.batch_size]
        return Task.batch(self.shard, idx)

    def gradient(self, round_: int) -> tuple[dict[str, np.ndarray], float, int]:
        xb, yb = self._batch(round_, 0)
        self.model.zero_grad(set_to_none=True)
        loss = self.task.loss_fn(self.model(xb), yb)
        loss.backward()
        # Views, not copies: zero_grad(set_to_none=True) above makes backward allocate new gradient
        # tensors every call, so nothing writes to these arrays once they are returned.
        grads = {name: p.grad.detach().numpy() for name, p in self.model.named_parameters()}  # type: ignore[union-attr]
        return grads, float(loss.detach()), len(xb)

    def update(self, round_: int) -> tuple[dict[str, np.ndarray], float, int]:
        """What the worker sends for ``round_``: the gradient, or the local delta / local lr."""
        if self.local_steps <= 1:
            return self.gradient(round_)
        start = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        opt = torch.optim.SGD(self.model.parameters(), lr=self.local_lr)
        losses, examples = [], 0
        for step in range(self.local_steps):
            xb, yb = self._batch(round_, step)
            opt.zero_grad(set_to_none=True)
            loss = self.task.loss_fn(self.model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            examples += len(xb)
        scale = 1.0 / self.local_lr
        delta = {name: ((start[name] - p.detach()) * scale).numpy().astype(np.float32)
                 for name, p in self.model.named_parameters()}
        return delta, float(np.mean(losses)), examples


def load_parameters(model: torch.nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Copy ``params`` into the model's parameters (one copy each, through a numpy view of the
    parameter: the arrays may be read-only views of received bytes, which torch.from_numpy warns
    about and would let torch write to)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = np.asarray(params[name], dtype=np.float32).reshape(p.shape)
            if p.device.type == "cpu":
                np.copyto(p.detach().numpy(), value)
            else:  # the values' own copy first: torch must not keep a view of read-only memory
                p.copy_(torch.from_numpy(np.array(value)))
