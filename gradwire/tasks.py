"""Training tasks: datasets, shards and models.

The default task (scikit-learn's digits with a small MLP) ships with scikit-learn
and needs no download. MNIST / Fashion-MNIST (IDX files) and CIFAR-10 (binary
batches) are read from a folder the user gives; ``diabetes`` with a ``linear``
model is the convex full-batch regime of the predictive-coding and LAG papers.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradwire.catalog import DATASETS, DEFAULT_DATA_DIRS, DEFAULT_MODEL, MODELS  # noqa: F401 - re-exported
from gradwire.compressors.base import TensorSpec

# The split of the datasets that come without one is fixed, independent of the
# run's seed, so that runs with different seeds are scored on the same examples.
SPLIT_SEED = 20240601
TEST_FRACTION = 0.2


class DatasetError(ValueError):
    """A dataset cannot be found or read; the message says which file and why."""


@dataclass
class Dataset:
    name: str
    train_x: np.ndarray  # float32, (n, ...) as the model consumes it
    train_y: np.ndarray  # int64 labels, or float32 targets for regression
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int | None  # None: regression

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None


# ---------------------------------------------------------------- readers


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed."""
    path = Path(path)
    with _open_maybe_gz(path) as fh:
        data = fh.read()
    if len(data) < 4:
        raise DatasetError(f"{path}: too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise DatasetError(f"{path}: not an IDX file (magic {data[:4].hex()})")
    header_end = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header_end])
    dtype = np.dtype(dtypes[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header_end != expected:
        raise DatasetError(f"{path}: {len(data) - header_end} data bytes, header promises {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header_end).reshape(dims)


def _find(folder: Path, stems: list[str]) -> Path:
    for stem in stems:
        for candidate in (folder / stem, folder / (stem + ".gz")):
            if candidate.exists():
                return candidate
    raise DatasetError(f"none of {stems} (optionally .gz) found in {folder}")


def load_idx_dataset(name: str, folder: str | Path) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist (give it with --data-dir)")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]))
        labels = read_idx(_find(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        x = (images.astype(np.float32) / 255.0 - 0.1307) / 0.3081
        parts[split] = (x[:, None, :, :], labels.astype(np.int64))
    # The classes come from the labels (an IDX set with 12 classes gets 12 outputs), not a constant.
    classes = int(max(parts["train"][1].max(), parts["test"][1].max())) + 1
    return Dataset(name, *parts["train"], *parts["test"], num_classes=classes)


CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)[:, None, None]
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)[:, None, None]


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DatasetError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte CIFAR-10 records")
    records = raw.reshape(-1, 3073)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DatasetError(f"{path}: label {labels.max()} out of range 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return (images - CIFAR_MEAN) / CIFAR_STD, labels


def load_cifar10(folder: str | Path) -> Dataset:
    folder = Path(folder)
    base = folder / "cifar-10-batches-bin" if (folder / "cifar-10-batches-bin").is_dir() else folder
    train_files = sorted(base.glob("data_batch_*.bin"))
    if not train_files or not (base / "test_batch.bin").exists():
        raise DatasetError(f"{base}: expected data_batch_*.bin and test_batch.bin (CIFAR-10 binary version)")
    train = [read_cifar_batch(p) for p in train_files]
    test_x, test_y = read_cifar_batch(base / "test_batch.bin")
    return Dataset(
        "cifar10",
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        test_x,
        test_y,
        num_classes=10,
    )


def _fixed_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(TEST_FRACTION * n))
    return order[n_test:], order[:n_test]


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data.astype(np.float32) / 16.0 - 0.5) / 0.5
    y = bunch.target.astype(np.int64)
    train, test = _fixed_split(len(x))
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def load_diabetes() -> Dataset:
    from sklearn.datasets import load_diabetes as sk_diabetes

    bunch = sk_diabetes()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.float64)
    train, test = _fixed_split(len(x))
    # Standardize with training statistics only: features and target.
    mu, sd = x[train].mean(0), x[train].std(0)
    ymu, ysd = y[train].mean(), y[train].std()
    x = ((x - mu) / sd).astype(np.float32)
    y = ((y - ymu) / ysd).astype(np.float32)
    return Dataset("diabetes", x[train], y[train], x[test], y[test], num_classes=None)


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    name = name.lower()
    if name == "digits":
        return load_digits()
    if name == "diabetes":
        return load_diabetes()
    if name in ("mnist", "fashion-mnist", "cifar10"):
        data_dir = data_dir or DEFAULT_DATA_DIRS.get(name)
        if not data_dir:
            raise DatasetError(f"dataset {name!r} is read from files: give their folder with --data-dir")
        if name in DEFAULT_DATA_DIRS and data_dir == DEFAULT_DATA_DIRS[name] and not Path(data_dir).is_dir():
            raise DatasetError(f"dataset {name!r} is not in {data_dir}: install Debian's dataset-{name} package "
                               "(scripts/bootstrap.sh does) or give its folder with --data-dir")
        return load_cifar10(data_dir) if name == "cifar10" else load_idx_dataset(name, data_dir)
    raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


# ---------------------------------------------------------------- shards


def shard_indices(
    labels: np.ndarray,
    num_shards: int,
    shard_index: int,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Indices of one worker's shard. Shards are disjoint and cover the data.

    ``iid``: a seeded permutation cut into equal parts. ``dirichlet``: per class,
    the examples are split across shards with proportions drawn from Dir(alpha)
    (smaller alpha = more skewed label mixes).
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard {shard_index} out of range for {num_shards} shards")
    n = len(labels)
    rng = np.random.default_rng([seed, 7919])
    if partition == "iid":
        return np.sort(np.array_split(rng.permutation(n), num_shards)[shard_index])
    if partition != "dirichlet":
        raise ValueError(f"unknown partition {partition!r}; use iid or dirichlet")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("a dirichlet partition needs class labels")
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    mine = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_shards, alpha))) * len(members)).astype(int)[:-1]
        mine.append(np.split(members, cuts)[shard_index])
    return np.sort(np.concatenate(mine))


# ---------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, in_features: int, num_outputs: int, hidden: tuple[int, ...] = (128, 128)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class LeNet5(nn.Module):
    def __init__(self, in_channels: int, side: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2 if side == 28 else 0), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 16 * 5 * 5
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        # GroupNorm, not BatchNorm: running statistics are buffers that a gradient
        # exchange would not synchronize.
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(8, cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8-style network for 32×32 images (three stages of one block)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.GroupNorm(8, width), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def build_model(name: str, dataset: Dataset, seed: int) -> nn.Module:
    """A freshly initialized model; the same seed gives the same weights."""
    shape = dataset.input_shape
    outputs = dataset.num_classes or 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            return MLP(int(np.prod(shape)), outputs)
        if name == "mlp-wide":
            # 1.3 M parameters on 28x28 inputs: large enough that bytes and codec costs are realistic.
            return MLP(int(np.prod(shape)), outputs, hidden=(1024, 512))
        if name == "linear":
            return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), outputs))
        if name in ("lenet5", "resnet"):
            if len(shape) != 3:
                raise ValueError(f"model {name!r} needs image input (C, H, W); {dataset.name} has shape {shape}")
            if name == "lenet5":
                return LeNet5(shape[0], shape[1], outputs)
            return SmallResNet(shape[0], outputs)
    raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")


# ---------------------------------------------------------------- task


@dataclass
class Task:
    dataset: Dataset
    model_name: str
    seed: int

    def build_model(self) -> nn.Module:
        return build_model(self.model_name, self.dataset, self.seed)

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.dataset.is_classification:
            return nn.functional.cross_entropy
        return lambda out, y: nn.functional.mse_loss(out.reshape(-1), y)

    def evaluate(self, model: nn.Module, batch: int = 2048) -> tuple[float, float | None]:
        """(test loss, test accuracy or None for regression)."""
        model.eval()
        total_loss, correct, n = 0.0, 0, len(self.dataset.test_x)
        with torch.no_grad():
            for start in range(0, n, batch):
                x = torch.from_numpy(self.dataset.test_x[start : start + batch])
                y = torch.from_numpy(self.dataset.test_y[start : start + batch])
                out = model(x)
                total_loss += float(self.loss_fn(out, y)) * len(x)
                if self.dataset.is_classification:
                    correct += int((out.argmax(1) == y).sum())
        model.train()
        acc = correct / n if self.dataset.is_classification else None
        return total_loss / n, acc


def make_task(dataset: str = "digits", model: str | None = None, seed: int = 0, data_dir: str | None = None) -> Task:
    ds = load_dataset(dataset, data_dir)
    return Task(ds, model or DEFAULT_MODEL[ds.name], seed)


# ---------------------------------------------------------------- built-in tasks as gradwire.Task


def builtin_task(dataset: str, seed: int = 0, data_dir: str | None = None, model: str | None = None):
    """A built-in dataset and model as a :class:`gradwire.task.Task`, the interface user tasks implement.

    The arrays become TensorDatasets and the model factory is ``build_model`` under the run's seed,
    so a run through this interface draws the same weights and batches (same numbers) as before.
    """
    from torch.utils.data import TensorDataset

    from gradwire.task import Task as UserTask

    if model and model not in MODELS:
        raise ValueError(f"unknown model {model!r}; available: {', '.join(MODELS)}")
    legacy = make_task(dataset, model, seed, data_dir)
    ds = legacy.dataset
    return UserTask(
        model=legacy.build_model,
        train=TensorDataset(torch.from_numpy(ds.train_x), torch.from_numpy(ds.train_y)),
        test=TensorDataset(torch.from_numpy(ds.test_x), torch.from_numpy(ds.test_y)),
        name=ds.name,
        model_name=legacy.model_name,
    )


def _builtin_factory(dataset: str):
    def factory(seed: int, data_dir: str | None = None, model: str | None = None):
        return builtin_task(dataset, seed, data_dir, model)

    factory.__name__ = factory.__qualname__ = dataset.replace("-", "_")
    factory.__doc__ = f"The built-in {dataset} task (model: --model, default {DEFAULT_MODEL[dataset]})."
    return factory


# The built-in tasks, by name: `--task digits` is `--dataset digits`; they resolve through the same
# gradwire.task.load_task as a user's MODULE:FACTORY.
BUILTIN_TASKS = {name: _builtin_factory(name) for name in DATASETS}


def tensor_specs(model: nn.Module) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(p.shape)) for name, p in model.named_parameters()]
