"""Aggregation of decoded updates and the server-side optimizer."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def mean_update(updates: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean over workers, summed in rank order so the result is reproducible."""
    ranks = sorted(updates)
    if not ranks:
        raise ValueError("no updates to aggregate")
    out = {name: np.array(arr, dtype=np.float32, copy=True) for name, arr in updates[ranks[0]].items()}
    for rank in ranks[1:]:
        for name, arr in updates[rank].items():
            out[name] += arr
    scale = np.float32(1.0 / len(ranks))
    for name in out:
        out[name] *= scale
    return out


class ServerOptimizer:
    """SGD with momentum on the global model, with a learning-rate schedule."""

    def __init__(self, model: nn.Module, lr: float, momentum: float, weight_decay: float,
                 schedule: str, total_rounds: int):
        self.model = model
        self.base_lr = lr
        self.schedule = schedule
        self.total_rounds = total_rounds
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def lr_at(self, round_: int) -> float:
        if self.schedule == "cosine":
            return 0.5 * self.base_lr * (1 + math.cos(math.pi * round_ / max(1, self.total_rounds)))
        if self.schedule == "step":  # ÷10 at 50 % and 75 % of training
            return self.base_lr * (0.1 ** (int(round_ >= 0.5 * self.total_rounds) + int(round_ >= 0.75 * self.total_rounds)))
        return self.base_lr

    def step(self, gradient: Mapping[str, np.ndarray], round_: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(round_)
        for name, p in self.model.named_parameters():
            p.grad = torch.from_numpy(np.ascontiguousarray(gradient[name], dtype=np.float32)).reshape(p.shape)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
