"""A user task defined outside gradwire: a BatchNorm network on 12 classes whose inputs are not centred.

Run it with the PS and workers as local processes::

    gradwire simulate --task examples/bn_task.py:make_task --rounds 40 --lr 0.1

or, from this folder on PYTHONPATH (as compose mounts it at /tasks), ``--task bn_task:make_task``.

The data is synthetic and generated here, deterministically: 12 Gaussian clusters in 16
dimensions, shifted far from the origin (mean ≈ 20) and scaled, so a model that normalizes with
stale BatchNorm statistics (the initial mean 0 and variance 1) classifies badly. That is what the
PS would evaluate if the workers' running statistics never reached it (docs/tasks.md, "Buffers").
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import gradwire

NUM_CLASSES = 12
FEATURES = 16
TRAIN_PER_CLASS = 40
TEST_PER_CLASS = 25
DATA_SEED = 1234  # the data is the same whatever the run's seed


def build_net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, NUM_CLASSES),
    )


def _clusters(per_class: int, generator: torch.Generator, centres: torch.Tensor) -> TensorDataset:
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = centres[y] + 0.9 * torch.randn(len(y), FEATURES, generator=generator)
    x = 4.0 * x + 20.0  # far from centred: mean ≈ 20, spread ≈ 5
    return TensorDataset(x.float(), y)


def make_task(seed: int) -> gradwire.Task:
    g = torch.Generator().manual_seed(DATA_SEED)
    centres = 1.5 * torch.randn(NUM_CLASSES, FEATURES, generator=g)
    train = _clusters(TRAIN_PER_CLASS, g, centres)
    test = _clusters(TEST_PER_CLASS, g, centres)
    return gradwire.Task(model=build_net, train=train, test=test)
