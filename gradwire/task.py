"""The task interface: what a user brings (a model factory, a training set, a test set).

A task is found by a reference ``MODULE:FACTORY`` (or ``path/to/file.py:FACTORY``, or the name of
a built-in task such as ``digits``); the factory is called with the run's seed and returns a
:class:`Task`. The PS, every worker and ``gradwire simulate`` resolve the same reference, so a user
task runs wherever its module can be imported (docs/tasks.md)::

    # mytask.py, anywhere on PYTHONPATH (or in the current folder)
    import gradwire

    def make_task(seed: int) -> gradwire.Task:
        return gradwire.Task(model=build_net, train=train_dataset, test=test_dataset)

Classification or regression, and the number of classes, come from the data: integer targets
are class labels (classes = largest label + 1), floating-point targets are regression.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from gradwire.taskref import TaskError, resolve_factory

__all__ = ["Task", "TaskError", "load_task", "resolve_factory"]

EVAL_BATCH = 2048




def _targets_of(dataset: Dataset) -> np.ndarray | None:
    """All targets without touching the inputs, where the dataset allows it (else None)."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].numpy()
    if isinstance(dataset, Subset):
        inner = _targets_of(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices)]
    targets = getattr(dataset, "targets", None)  # torchvision's convention
    if targets is not None:
        return np.asarray(targets)
    return None


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


@dataclass
class Task:
    """A model factory, a training set and a test set; loss and metric are optional.

    ``model``: a zero-argument callable returning a fresh ``torch.nn.Module`` (called under a
    fixed seed, so every process builds the same initial weights). ``train``/``test``: map-style
    ``torch.utils.data.Dataset`` s whose items are ``(x, y)``. ``loss(outputs, targets)``: default
    cross-entropy for class labels, mean squared error for float targets. ``metric(outputs,
    targets)``: the batch mean of a score; default accuracy for class labels, none for regression.
    """

    model: Callable[[], nn.Module]
    train: Dataset
    test: Dataset
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None
    name: str = ""
    model_name: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.model) or isinstance(self.model, nn.Module):
            raise TaskError("Task(model=...) must be a zero-argument factory of a torch.nn.Module "
                            "(pass the class or a function, not an instance)")
        for split in ("train", "test"):
            ds = getattr(self, split)
            if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
                raise TaskError(f"Task({split}=...) must be a map-style torch.utils.data.Dataset of (x, y)")
            if len(ds) == 0:
                raise TaskError(f"Task({split}=...) is empty")

    @property
    def train_size(self) -> int:
        return len(self.train)  # type: ignore[arg-type]  # __post_init__ checked that it has a length

    @property
    def test_size(self) -> int:
        return len(self.test)  # type: ignore[arg-type]  # __post_init__ checked that it has a length

    # ------------------------------------------------------------ what the data says

    def _first_target(self) -> torch.Tensor:
        if "first_target" not in self._cache:
            item = self.train[0]
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise TaskError("a training item must be an (x, y) pair")
            self._cache["first_target"] = _as_tensor(item[1])
        return self._cache["first_target"]

    def note_target(self, target: Any) -> None:
        """Tell the task one target from the data at hand (a worker's own shard), so that deciding
        classification vs regression reads no item outside it."""
        self._cache.setdefault("first_target", _as_tensor(target))

    @property
    def is_classification(self) -> bool:
        """Integer (or bool) targets are class labels; floating-point targets are regression."""
        t = self._first_target()
        return not (t.is_floating_point() or t.is_complex())

    def train_targets(self) -> np.ndarray:
        """Every training target (reads the items where the dataset keeps no target array)."""
        if "train_targets" not in self._cache:
            targets = _targets_of(self.train)
            if targets is None:
                targets = np.array([np.asarray(self.train[i][1]) for i in range(self.train_size)])
            self._cache["train_targets"] = targets
        return self._cache["train_targets"]

    @property
    def num_classes(self) -> int | None:
        """Largest label over train and test + 1; None for regression."""
        if not self.is_classification:
            return None
        if "num_classes" not in self._cache:
            test = _targets_of(self.test)
            if test is None:
                test = np.array([np.asarray(self.test[i][1]) for i in range(self.test_size)])
            self._cache["num_classes"] = int(max(self.train_targets().max(), test.max())) + 1
        return self._cache["num_classes"]

    # ------------------------------------------------------------ model, loss, evaluation

    def build_model(self, seed: int = 0) -> nn.Module:
        """A freshly initialized model; the same seed gives the same weights in every process."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model()
        if not isinstance(model, nn.Module):
            raise TaskError(f"the task's model factory returned {type(model).__name__}, not a torch.nn.Module")
        if not self.model_name:
            self.model_name = type(model).__name__
        return model

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.loss is not None:
            return self.loss
        if self.is_classification:
            return nn.functional.cross_entropy
        return lambda out, y: nn.functional.mse_loss(out.reshape(y.shape), y)

    def check_outputs(self, model: nn.Module) -> None:
        """Refuse, with the reason, a classifier with fewer outputs than the data has classes."""
        if not self.is_classification or self.loss is not None:
            return
        x, _ = self.batch(self.test, range(1))
        with torch.no_grad():
            was_training = model.training
            model.eval()
            out = model(x)
            model.train(was_training)
        classes = self.num_classes
        if classes is None:
            return
        if out.ndim != 2 or out.shape[1] < classes:
            raise TaskError(f"the data has {classes} classes (labels 0..{classes - 1}) but the model's output "
                            f"has shape {tuple(out.shape)}: it needs (batch, {classes})")

    @staticmethod
    def batch(dataset: Dataset, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` of ``dataset`` stacked into (x, y); a TensorDataset is sliced directly."""
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
            idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(list(indices), dtype=torch.long)
            return dataset.tensors[0][idx], dataset.tensors[1][idx]
        items = [dataset[int(i)] for i in indices]
        x, y = default_collate(items)
        return x, y

    def evaluate(self, model: nn.Module, batch: int = EVAL_BATCH) -> tuple[float, float | None]:
        """(test loss, test metric; accuracy by default, None for regression without a metric)."""
        model.eval()
        n = self.test_size
        total_loss, correct, score = 0.0, 0, 0.0
        classification = self.is_classification
        with torch.no_grad():
            for start in range(0, n, batch):
                if isinstance(self.test, TensorDataset):
                    x, y = (t[start:start + batch] for t in self.test.tensors[:2])
                else:
                    x, y = self.batch(self.test, range(start, min(n, start + batch)))
                out = model(x)
                total_loss += float(self.loss_fn(out, y)) * len(x)
                if self.metric is not None:
                    score += float(self.metric(out, y)) * len(x)
                elif classification:
                    correct += int((out.argmax(1) == y).sum())  # integer count: exact, as before
        model.train()
        if self.metric is not None:
            return total_loss / n, score / n
        return total_loss / n, (correct / n if classification else None)


# ---------------------------------------------------------------- references
# Resolving a reference lives in gradwire.taskref, which imports no torch: an unknown task fails
# in a fraction of a second.


def load_task(ref: str, seed: int = 0, data_dir: str | None = None, model: str | None = None) -> Task:
    """Resolve ``ref`` and call its factory with the seed (and ``data_dir``/``model`` where it takes them)."""
    factory = resolve_factory(ref)
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    if data_dir and ("data_dir" in params or takes_any):
        kwargs["data_dir"] = data_dir
    if model:
        if not ("model" in params or takes_any):
            raise TaskError(f"task {ref!r} takes no model name (got --model {model})")
        kwargs["model"] = model
    task = factory(seed, **kwargs)
    if not isinstance(task, Task):
        raise TaskError(f"task factory {ref!r} returned {type(task).__name__}, not a gradwire.Task")
    if not task.name:
        task.name = ref
    return task
