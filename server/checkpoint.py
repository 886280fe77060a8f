"""PS checkpoints: the model, the optimizer, the ledger and the codec's cross-worker state.

Workers reconnect after a PS restart, so every decoder starts fresh and the workers reset
their encoders (the resync rule of docs/algorithms.md §0): no per-worker codec state is saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class Checkpoint:
    config_json: str  # the run's ServerConfig, for the record
    model: Mapping[str, Any]  # state_dict of the global model
    optimizer: Mapping[str, Any]
    ledger: Mapping[str, Any]  # Ledger.state_dict()
    initial_loss: float | None
    initial_accuracy: float | None
    codec_state: Mapping[str, Any]  # CrossWorkerState.state_dict()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(vars(checkpoint), tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    state = torch.load(path, weights_only=False)
    return Checkpoint(**state)
