"""Aggregation of decoded updates and the server-side optimizer."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def mean_update(updates: Mapping[int, Mapping[str, np.ndarray]],
                out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Mean over workers, summed in rank order so the result is reproducible, in float32.

    ``out``: float32 arrays kept from an earlier round to sum into (they are overwritten; a missing
    or misfitting one is allocated and stored in ``out``), so that a round allocates nothing. The
    first two updates are added into the buffer directly (no copy of the first), the others added
    in place, then the sum is scaled by 1/n in place: the same operations in the same order as
    copy, add, scale, so the result is bitwise the same."""
    ranks = sorted(updates)
    if not ranks:
        raise ValueError("no updates to aggregate")
    kept = out if out is not None else {}
    result = {}
    for name, arr in updates[ranks[0]].items():
        first = np.asarray(arr, dtype=np.float32)
        buf = kept.get(name)
        if buf is None or buf.shape != first.shape or buf.dtype != np.float32:
            buf = kept[name] = np.empty(first.shape, dtype=np.float32)
        if len(ranks) > 1:
            np.add(first, updates[ranks[1]][name], out=buf)
        else:
            np.copyto(buf, first)
        for rank in ranks[2:]:
            np.add(buf, updates[rank][name], out=buf)
        result[name] = buf
    if len(ranks) > 1:
        scale = np.float32(1.0 / len(ranks))
        for buf in result.values():
            np.multiply(buf, scale, out=buf)
    return result


def _sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """torch's SGD, fused where torch has the kernel: the momentum and parameter updates in one
    pass over the model instead of three (8.5 M parameters: 10 ms instead of 17, the same bits;
    tests/server/test_hot_path.py compares them)."""
    params = list(model.parameters())
    try:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for these parameters' device or dtype
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


# What a step may reach and still be proven finite: half of float32's largest value, so that the
# rounding of the few float32 operations of a step (each at most 2^-24 relative) cannot cross it.
FINITE_LIMIT = float(np.finfo(np.float32).max) / 2
_ROUNDING = 1 + 2**-20  # the few roundings of one step's operations, generously


def _max_abs(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach(), ord=math.inf)) if t.numel() else 0.0


class ServerOptimizer:
    """SGD with momentum on the global model, with a learning-rate schedule.

    ``step_bound`` proves, when it can, that a step leaves the model and the momentum finite, so
    that the PS skips its rollback copy (``server/robust.py``). It keeps bounds of the largest
    |entry| of the parameters and of the momentum from step to step (no pass over the model): a
    step moves them by at most what the SGD update rule allows. The tensors' version counters
    (torch bumps them on every in-place write) tell when anything else wrote to them (a resume,
    a rollback, a test): then the bounds are measured again, one read of each tensor."""

    def __init__(self, model: nn.Module, lr: float, momentum: float, weight_decay: float,
                 schedule: str, total_rounds: int):
        self.model = model
        self.base_lr = lr
        self.schedule = schedule
        self.total_rounds = total_rounds
        self.opt = _sgd(model, lr, momentum, weight_decay)
        # Kept across rounds by server/robust.py's robust_step: the mean is summed into these arrays
        # and the rollback copy (its ModelGuard) reuses its buffers, so a round allocates nothing large.
        self.gradient_buffers: dict[str, np.ndarray] = {}
        self.guard: object | None = None
        # (max |parameter|, max |momentum|) and the versions they hold for; the bounds after the
        # step step_bound proved, which step() makes current
        self._bounds: tuple[float, float] | None = None
        self._versions: tuple[int, ...] = ()
        self._proven: tuple[float, float] | None = None

    def lr_at(self, round_: int) -> float:
        if self.schedule == "cosine":
            return 0.5 * self.base_lr * (1 + math.cos(math.pi * round_ / max(1, self.total_rounds)))
        if self.schedule == "step":  # ÷10 at 50 % and 75 % of training
            return self.base_lr * (0.1 ** (int(round_ >= 0.5 * self.total_rounds) + int(round_ >= 0.75 * self.total_rounds)))
        return self.base_lr

    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p for group in self.opt.param_groups for p in group["params"]]
        momenta = [s["momentum_buffer"] for s in self.opt.state.values()
                   if isinstance(s.get("momentum_buffer"), torch.Tensor)]
        return params, momenta

    def _current_versions(self) -> tuple[int, ...]:
        params, momenta = self._tensors()
        return tuple(t._version for t in params + momenta)

    def _current_bounds(self) -> tuple[float, float]:
        if self._bounds is None or self._versions != self._current_versions():
            params, momenta = self._tensors()
            with torch.no_grad():
                self._bounds = (max((_max_abs(p) for p in params), default=0.0),
                                max((_max_abs(m) for m in momenta), default=0.0))
            self._versions = self._current_versions()
        return self._bounds

    def step_bound(self, gradient_max_abs: float, round_: int) -> bool:
        """Whether the step of ``round_`` with a gradient whose entries are within
        ±``gradient_max_abs`` provably leaves the parameters and the momentum finite.

        torch's SGD (no dampening, no Nesterov): g' = g + wd·θ, b' = μ·b + g' (g' on the first
        step), θ' = θ − lr·b' (lr·g' without momentum). With |θ| ≤ T and |b| ≤ B, every
        intermediate is bounded by G + wd·T, μ·B + G + wd·T and T + lr·that; when all stay under
        FINITE_LIMIT no operation can overflow. A True answer is for the next ``step`` only."""
        self._proven = None
        if not math.isfinite(gradient_max_abs):
            return False
        theta, momentum = self._current_bounds()
        g, b, t = gradient_max_abs, 0.0, theta
        for group in self.opt.param_groups:
            lr, mu, wd = abs(self.lr_at(round_)), abs(group["momentum"]), abs(group["weight_decay"])
            g = max(g, (gradient_max_abs + wd * theta) * _ROUNDING)
            b = max(b, (mu * momentum + g) * _ROUNDING)
            t = max(t, (theta + lr * (b if mu else g)) * _ROUNDING)
        bounds = (g, b, t)
        if not all(math.isfinite(x) and x <= FINITE_LIMIT for x in bounds):
            return False
        self._proven = (t, max(b, momentum))
        return True

    def step(self, gradient: Mapping[str, np.ndarray], round_: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(round_)
        for name, p in self.model.named_parameters():
            p.grad = torch.from_numpy(np.ascontiguousarray(gradient[name], dtype=np.float32)).reshape(p.shape)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        # the bounds step_bound proved for this step, else none (measured again when asked)
        self._bounds, self._proven = self._proven, None
        if self._bounds is not None:
            self._versions = self._current_versions()

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
        self._bounds = self._proven = None  # new momentum tensors: measured again when asked
