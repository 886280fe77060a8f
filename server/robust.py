"""Bounded influence of one worker, robust aggregation and a model that stays finite.

The PS decodes and refuses non-finite updates one by one (``compressors.update``), but
finite values can still do harm: entries of 1e30 drag the mean anywhere, and entries of
3e38 overflow float32 once summed or stepped. Three defences, applied in this order:

1. **Norm clipping** (``clip_multiple``, default 10; 0 = off): each update whose L2 norm
   exceeds ``clip_multiple`` × the round's median update norm is left out of the round
   (``outliers="drop"``, the default, with 3 or more updates) or scaled down to that norm
   (``outliers="scale"``, and always with 2 updates, which have no majority to say which is
   out of line). The median is the *lower* median of the round's norms, so with two workers
   one of which is hostile the honest norm sets the bar. Honest updates of one round have
   norms within a small factor of each other (a 3x bar dropped an honest TPC update whose
   trigger had fired), so a multiple of 10 leaves honest training alone while one worker can
   move the mean by at most ``clip_multiple / n`` honest norms. Scaling
   still lets a worker that pushes one direction every round steer a mean; dropping removes
   any update that is far out of line, at the price of losing an honest outlier's round.
2. **Aggregation** (``aggregate``): ``mean`` (the default), ``trimmed-mean`` (coordinate-wise:
   drop the ``f`` largest and ``f`` smallest values of each coordinate, ``f = max(1, ⌊trim·n⌋)``
   with ``2f < n``; with fewer than 3 workers it is the mean) or ``median`` (coordinate-wise).
   Mean costs O(n·d) time and O(d) memory; trimmed mean and median stack the updates
   (O(n·d) memory) and sort each coordinate (O(n·d·log n) time).
3. **Finiteness guard**: the aggregate and the model after the optimizer step must be finite;
   otherwise the step is rolled back (model and optimizer state), the round is refused and the
   largest updates are named. A non-finite model is never broadcast. When the updates' norms and
   the model's kept bounds prove the step finite beforehand (``aggregate_bound``,
   ``ServerOptimizer.step_bound``), the checks and the rollback copy are skipped: they could not
   change the outcome.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gradwire.compressors.finite import all_finite as array_all_finite
from gradwire.compressors.finite import squared_norm, tensor_all_finite
from gradwire.server.aggregation import mean_update

log = logging.getLogger("gradwire.server")

AGGREGATES = ("mean", "trimmed-mean", "median")
# Dropping needs a majority of the round to define "out of line"; below this, outliers are scaled.
MIN_UPDATES_TO_DROP = 3
DEFAULT_TRIM_FRACTION = 0.2

Update = Mapping[str, np.ndarray]


OUTLIER_MODES = ("scale", "drop")


def check_robust_options(aggregate: str, clip_multiple: float, trim_fraction: float, outliers: str = "scale") -> None:
    if outliers not in OUTLIER_MODES:
        raise ValueError(f"outliers must be one of {', '.join(OUTLIER_MODES)}, got {outliers!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if not (math.isfinite(clip_multiple) and (clip_multiple == 0 or clip_multiple >= 1)):
        raise ValueError(f"clip_multiple must be 0 (off) or >= 1, got {clip_multiple}")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")


def update_norm(update: Update) -> float:
    """L2 norm over every tensor; inf when an entry is not finite (the decoder refuses those first).

    Each tensor's Σa² in one BLAS read, in float32 (relative error about 1e-5: the norm only
    compares updates with each other within a factor ``clip_multiple``), and again in float64
    when that overflows, where float32 entries up to 3.4e38 square without overflow
    (``compressors/finite.py``); the tensors' sums are added in float64."""
    total = 0.0
    for a in update.values():
        s = squared_norm(a)
        if s is None:
            return math.inf
        total += s
    return math.sqrt(total)


@dataclass(frozen=True)
class ClipReport:
    norms: dict[int, float]  # rank -> norm before clipping
    threshold: float  # inf when clipping is off
    clipped: tuple[int, ...]  # ranks whose update was scaled down


def clip_updates(by_rank: Mapping[int, Update], multiple: float, mode: str = "scale",
                 norms: Mapping[int, float] | None = None) -> tuple[dict[int, dict[str, np.ndarray]], ClipReport]:
    """Scale each update with norm > multiple × (lower) median norm down to that norm, or with
    ``mode="drop"`` leave it out of the round (the median update itself always stays).
    ``norms``: each update's ``update_norm``, when already known (the PS computes them as updates
    arrive, in parallel)."""
    norms = {rank: norms[rank] if norms is not None else update_norm(u) for rank, u in by_rank.items()}
    ordered = sorted(norms.values())
    median = ordered[(len(ordered) - 1) // 2] if ordered else 0.0
    threshold = multiple * median if multiple > 0 else math.inf
    if len(norms) < MIN_UPDATES_TO_DROP:
        # Two updates have no majority to say which one is out of line: bound the larger, never drop it
        # (an honest worker's gradient can be several times the other's, e.g. when TPC's trigger fires).
        mode = "scale"
    out: dict[int, dict[str, np.ndarray]] = {}
    clipped = []
    for rank, update in by_rank.items():
        norm = norms[rank]
        if norm > threshold and mode == "drop":
            clipped.append(rank)
        elif norm > threshold:
            # in float64: the scale of a 3e38-entry update is below float32's normal range
            scale = threshold / norm
            out[rank] = {name: (a.astype(np.float64) * scale).astype(np.float32) for name, a in update.items()}
            clipped.append(rank)
        else:
            out[rank] = dict(update)
    return out, ClipReport(norms, threshold, tuple(sorted(clipped)))


def _norm_slack(entries: int) -> float:
    """How much larger than the computed norm the true norm of ``entries`` float32 values may be.

    squared_norm sums in float32: the sum of n positive terms is off by at most γ_n = n·u/(1 − n·u)
    of itself (u = 2^-24, the standard bound for recursive summation; BLAS's blocked sums do
    better), so Σa² ≤ computed / (1 − γ_n) and the norm ≤ computed / √(1 − γ_n). inf when the
    bound says nothing (n·u ≥ 0.45: tensors of over 7.5 M entries)."""
    nu = entries * 2.0**-24
    gamma = nu / (1 - nu) if nu < 0.45 else 1.0
    return 1 / math.sqrt(1 - gamma) if gamma < 1 else math.inf


def aggregate_bound(clipped: Mapping[int, Update], report: ClipReport) -> float:
    """A bound of every |entry| of the round's aggregate of ``clipped`` (mean, trimmed mean or
    median), from the updates' norms alone (no pass over them); inf when there is none.

    An entry is at most its update's L2 norm; each coordinate of a mean, a trimmed mean or a
    median lies within the updates' values at that coordinate. A scaled-down update's norm is
    the threshold. The float32 sum of the mean's n updates stays within n times the largest (times
    its n roundings, each at most 2^-24 relative)."""
    if not clipped:
        return math.inf
    entries = max((np.asarray(a).size for u in clipped.values() for a in u.values()), default=0)
    largest = max(min(report.norms[rank], report.threshold) for rank in clipped)
    n = len(clipped)
    return n * largest * _norm_slack(entries) * (1 + 2**-20) * (1 + n * 2.0**-23)


def trimmed_count(workers: int, fraction: float) -> int:
    """Values dropped at each end of a coordinate: max(1, ⌊fraction·n⌋) while 2f < n; 0 under 3 workers."""
    if workers < 3:
        return 0
    return min(max(1, int(fraction * workers)), (workers - 1) // 2)


def aggregate_updates(by_rank: Mapping[int, Update], method: str, trim_fraction: float = DEFAULT_TRIM_FRACTION,
                      out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The round's aggregate, in rank order (reproducible). ``out``: buffers for the mean to reuse
    (``mean_update``)."""
    if method == "mean":
        return mean_update(by_rank, out)
    ranks = sorted(by_rank)
    if not ranks:
        raise ValueError("no updates to aggregate")
    out = {}
    for name in by_rank[ranks[0]]:
        stacked = np.stack([np.asarray(by_rank[r][name], dtype=np.float32) for r in ranks])
        if method == "median":
            out[name] = np.median(stacked, axis=0).astype(np.float32)
        else:
            f = trimmed_count(len(ranks), trim_fraction)
            if f:
                stacked.sort(axis=0)
                stacked = stacked[f: len(ranks) - f]
            out[name] = stacked.mean(axis=0, dtype=np.float64).astype(np.float32)
    return out


def all_finite(tensors: Mapping[str, np.ndarray]) -> bool:
    return all(array_all_finite(a) for a in tensors.values())


def model_is_finite(model: nn.Module) -> bool:
    with torch.no_grad():
        return all(tensor_all_finite(p) for p in model.parameters())


class ModelGuard:
    """A copy of the model and optimizer state to roll a refused step back to.

    ``save`` copies into buffers kept from the previous round (allocated once): a fresh clone of
    the model and a deep copy of the momentum each round cost twice the CPU of the copies alone
    (every page of a new 34 MB block is faulted in). The optimizer state is copied tensor by
    tensor into its kept twin when its structure is unchanged, else deep-copied anew."""

    def __init__(self, model: nn.Module | None = None, optimizer_state: dict | None = None):
        self.params: dict[str, torch.Tensor] = {}
        self.optimizer_state: dict = {}
        if model is not None:
            self.save(model, optimizer_state or {})

    def save(self, model: nn.Module, optimizer_state: dict) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                kept = self.params.get(n)
                if kept is None or kept.shape != p.shape or kept.dtype != p.dtype:
                    self.params[n] = p.detach().clone()
                else:
                    kept.copy_(p.detach())
            if not _copy_into(self.optimizer_state, optimizer_state):
                self.optimizer_state = copy.deepcopy(optimizer_state)

    def restore(self, model: nn.Module, optimizer) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.params[n])
        # a deep copy: the kept state is overwritten by the next save, the optimizer's must not be
        optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))


def rollback_buffers(optimizer, model: nn.Module, *, save: bool = False) -> ModelGuard:
    """The optimizer's rollback guard (kept on it: its buffers serve every round), with buffers for
    the model and the optimizer's state as they are now; ``save``: with their values too (before a
    step no proof covers).

    Called after every step the PS proved finite, too: the buffers are allocated (and written once)
    at the first step, when torch's SGD makes its momentum buffers, not when a peer's first update
    that no proof covers arrives. That update can be a few bytes (one flipped bit of a codec's
    scale), and would otherwise make the PS allocate a copy of the model and of its momentum, twice
    the model's size, at a moment the peer picks; now that memory is the PS's from the first round
    on. Afterwards a call compares the optimizer state's entries with the kept ones and copies
    nothing."""
    guard = getattr(optimizer, "guard", None)
    if not isinstance(guard, ModelGuard):
        guard = ModelGuard()
        if hasattr(optimizer, "guard"):  # ServerOptimizer keeps it
            optimizer.guard = guard
    state = optimizer.state_dict()
    if save or not guard.params or len(guard.optimizer_state.get("state", {})) != len(state.get("state", {})):
        guard.save(model, state)
    return guard


def _copy_into(kept, new) -> bool:
    """Copy the nested dicts and lists ``new`` into ``kept`` in place: tensors into the kept tensors
    of the same shape and dtype (others cloned), other values deep-copied. False when the top-level
    structure differs (nothing usable was kept)."""
    if isinstance(new, dict):
        if not isinstance(kept, dict) or kept.keys() != new.keys():
            return False
        keys: list = list(new)
    elif isinstance(new, list):
        if not isinstance(kept, list) or len(kept) != len(new):
            return False
        keys = list(range(len(new)))
    else:
        return False
    for key in keys:
        old, value = kept[key], new[key]
        if isinstance(value, torch.Tensor):
            if isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype:
                old.copy_(value)
            else:
                kept[key] = value.detach().clone()
        elif not (isinstance(value, dict | list) and _copy_into(old, value)):
            kept[key] = copy.deepcopy(value)
    return True


def describe_suspects(report: ClipReport, names: Mapping[int, str], limit: int = 3) -> list[str]:
    """The workers with the largest update norms, largest first: the likely cause of a refused round."""
    ranked = sorted(report.norms.items(), key=lambda kv: -kv[1])[:limit]
    return [f"{names.get(rank, rank)} (norm {norm:.3g})" for rank, norm in ranked]


@dataclass
class RobustStep:
    """What ``robust_step`` did in one round (for the rounds log and the summary)."""

    refused: bool
    clipped: list[str]
    suspects: list[str]
    median_norm: float


def robust_step(by_rank: Mapping[int, Update], names: Mapping[int, str], optimizer, model: nn.Module,
                round_: int, aggregate: str, clip_multiple: float, trim_fraction: float,
                outliers: str = "scale", norms: Mapping[int, float] | None = None) -> RobustStep:
    """Clip, aggregate and step the server optimizer; roll back and refuse a step that is not finite.
    ``norms``: the updates' norms if known (``clip_updates``)."""
    clipped, report = clip_updates(by_rank, clip_multiple, outliers, norms)
    ordered = sorted(report.norms.values())
    median = ordered[(len(ordered) - 1) // 2]
    clipped_names = [str(names.get(r, r)) for r in report.clipped]
    if clipped_names:
        log.warning("round %d: %s %d update(s) with norm above %.3g (%g x median norm %.3g): %s", round_,
                    "dropped" if outliers == "drop" else "clipped", len(clipped_names), report.threshold,
                    clip_multiple, median, ", ".join(clipped_names))
    gradient = aggregate_updates(clipped, aggregate, trim_fraction, getattr(optimizer, "gradient_buffers", None))
    # When the step is proven finite beforehand (ServerOptimizer.step_bound), the checks and the
    # rollback copy below cannot change the outcome: they are skipped (a copy of the model and the
    # momentum and two reads of the model and the aggregate per round).
    step_bound = getattr(optimizer, "step_bound", None)
    if step_bound is not None and step_bound(aggregate_bound(clipped, report), round_):
        optimizer.step(gradient, round_)
        rollback_buffers(optimizer, model)
        return RobustStep(False, clipped_names, [], median)
    if not all_finite(gradient):
        suspects = describe_suspects(report, names)
        log.error("round %d refused: the aggregate is not finite; largest updates: %s", round_, ", ".join(suspects))
        return RobustStep(True, clipped_names, suspects, median)
    guard = rollback_buffers(optimizer, model, save=True)
    optimizer.step(gradient, round_)
    if not model_is_finite(model):
        guard.restore(model, optimizer)
        suspects = describe_suspects(report, names)
        log.error("round %d refused: the stepped model is not finite (rolled back); largest updates: %s",
                  round_, ", ".join(suspects))
        return RobustStep(True, clipped_names, suspects, median)
    return RobustStep(False, clipped_names, [], median)
