"""Datasets, shards and models, tested on small files of the real formats."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from gradwire.tasks import (
    DatasetError,
    build_model,
    load_dataset,
    make_task,
    read_idx,
    shard_indices,
)


def _write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz=prefix == "train")
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return tmp_path


def test_mnist_idx_loader(mnist_dir):
    ds = load_dataset("mnist", str(mnist_dir))
    assert ds.train_x.shape == (40, 1, 28, 28) and ds.test_x.shape == (12, 1, 28, 28)
    assert ds.train_x.dtype == np.float32 and ds.num_classes == 10
    model = build_model("lenet5", ds, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 61706  # LeNet-5 as in PERF_LIMITS.md
    assert model(torch.from_numpy(ds.train_x[:3])).shape == (3, 10)


def test_idx_errors(tmp_path):
    bad = tmp_path / "x"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(DatasetError, match="3 data bytes, header promises 5"):
        read_idx(bad)
    with pytest.raises(DatasetError, match="found"):
        load_dataset("fashion-mnist", str(tmp_path))
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("mnist")


def test_cifar_binary_loader(tmp_path):
    rng = np.random.default_rng(1)
    for name, n in (("data_batch_1.bin", 6), ("data_batch_2.bin", 4), ("test_batch.bin", 5)):
        records = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], axis=1)
        (tmp_path / name).write_bytes(records.astype(np.uint8).tobytes())
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.train_x.shape == (10, 3, 32, 32) and ds.test_y.shape == (5,)
    model = build_model("resnet", ds, seed=0)
    assert model(torch.from_numpy(ds.train_x[:2])).shape == (2, 10)
    (tmp_path / "test_batch.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DatasetError, match="3073-byte"):
        load_dataset("cifar10", str(tmp_path))


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_shards_are_disjoint_and_cover(partition):
    labels = np.random.default_rng(2).integers(0, 10, 997)
    shards = [shard_indices(labels, 4, i, partition, alpha=0.3, seed=5) for i in range(4)]
    joined = np.concatenate(shards)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert np.array_equal(shards[1], shard_indices(labels, 4, 1, partition, alpha=0.3, seed=5))


def test_dirichlet_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    mix = [np.bincount(labels[shard_indices(labels, 5, i, "dirichlet", 0.1, 0)], minlength=10) for i in range(5)]
    # With alpha = 0.1 most shards are dominated by few classes.
    assert np.mean([m.max() / max(1, m.sum()) for m in mix]) > 0.3


def test_default_task_and_regression():
    t = make_task()
    assert t.dataset.name == "digits" and sum(p.numel() for p in t.build_model().parameters()) == 26122
    r = make_task("diabetes")
    loss, acc = r.evaluate(r.build_model())
    assert acc is None and loss > 0


def test_an_idx_dataset_with_12_classes_gets_12_outputs(tmp_path):
    """Issue 11: the classes come from the labels, not a constant 10 (`Target 10 is out of bounds`)."""
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 48), ("t10k", 24)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 12)
    task = make_task("mnist", data_dir=str(tmp_path))
    assert task.dataset.num_classes == 12
    model = task.build_model()
    x = torch.from_numpy(task.dataset.train_x[:4])
    loss = task.loss_fn(model(x), torch.from_numpy(task.dataset.train_y[:4]) + 8)  # labels 8..11
    assert model(x).shape == (4, 12) and torch.isfinite(loss)


# ---------------------------------------------------------------- real Fashion-MNIST, offline

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _need_fashion_mnist():
    import os
    from pathlib import Path

    if not Path(FASHION_DIR, "t10k-labels-idx1-ubyte.gz").exists():
        # scripts/bootstrap.sh (which .ci/run runs) installs it: in CI its absence is a failure.
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION_DIR} is missing although CI ran scripts/bootstrap.sh")
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")


def test_fashion_mnist_is_read_from_the_debian_package_by_default():
    _need_fashion_mnist()
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and sorted(np.unique(ds.test_y)) == list(range(10))
    # The real data: every class has exactly 1,000 test images and 6,000 training images.
    assert np.bincount(ds.test_y).tolist() == [1000] * 10
    assert np.bincount(ds.train_y).tolist() == [6000] * 10


def test_missing_default_data_folder_names_the_package(monkeypatch):
    import gradwire.tasks as tasks

    monkeypatch.setitem(tasks.DEFAULT_DATA_DIRS, "fashion-mnist", "/nonexistent/fashion-mnist")
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_wide_mlp_has_over_a_million_parameters(mnist_dir):
    ds = load_dataset("mnist", str(mnist_dir))
    model = build_model("mlp-wide", ds, seed=0)
    assert sum(p.numel() for p in model.parameters()) >= 1_000_000
    assert model(torch.from_numpy(ds.test_x[:3])).shape == (3, 10)
