"""Model state beyond parameters: buffers such as BatchNorm running statistics.

Policy (docs/tasks.md, "Buffers"): gradients never touch buffers, so without this the PS's
BatchNorm layers would keep their initial statistics and its evaluation and checkpoints would be
of a model nobody trained. So every worker sends its buffers with each update (float32, in full,
counted as uplink payload), the PS sets its own to the mean over the round's aggregated workers,
and sends them back with the next model (counted as downlink payload). Integer buffers (the
``num_batches_tracked`` counters) travel as float32, exact up to 2**24, and are rounded after
averaging. Only persistent buffers (those in ``state_dict``) take part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from gradwire.compressors.base import TensorSpec
from gradwire.compressors.finite import all_finite


class InvalidBuffers(ValueError):
    """Buffers from the wire that do not fit the model."""


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    keys = set(model.state_dict().keys())
    return [(name, b) for name, b in model.named_buffers() if name in keys]


def buffer_specs(model: nn.Module) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(b.shape)) for name, b in _persistent_buffers(model)]


def buffer_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's persistent buffers as float32 arrays (empty when it has none)."""
    return {name: b.detach().cpu().numpy().astype(np.float32) for name, b in _persistent_buffers(model)}


def load_buffers(model: nn.Module, values: Mapping[str, np.ndarray]) -> None:
    """Copy ``values`` into the model's buffers, cast back to each buffer's dtype (integers rounded)."""
    with torch.no_grad():
        for name, b in _persistent_buffers(model):
            if name not in values:
                continue
            # a copy: the values may be read-only views of received bytes (gradwire.protocol)
            v = torch.from_numpy(np.array(values[name], dtype=np.float32)).reshape(b.shape)
            if not b.is_floating_point():
                v = torch.round(v)
            b.copy_(v.to(b.dtype))


def check_buffers(values: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """Names, shapes and finiteness exactly as the model's; InvalidBuffers says what differs."""
    expected = {s.name: s.shape for s in specs}
    if set(values) != set(expected):
        missing, extra = sorted(set(expected) - set(values)), sorted(set(values) - set(expected))
        raise InvalidBuffers(f"buffers do not match the model's: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, arr in values.items():
        if tuple(arr.shape) != tuple(expected[name]):
            raise InvalidBuffers(f"buffer {name!r} has shape {list(arr.shape)}, the model's is {list(expected[name])}")
        if not all_finite(arr):
            raise InvalidBuffers(f"buffer {name!r} holds non-finite values")


def mean_buffers(states: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise mean over workers, summed in the order given (callers pass rank order)."""
    if not states:
        raise ValueError("no buffers to average")
    out = {name: np.array(arr, dtype=np.float64) for name, arr in states[0].items()}
    for state in states[1:]:
        for name in out:
            out[name] += state[name]
    return {name: (arr / len(states)).astype(np.float32) for name, arr in out.items()}
