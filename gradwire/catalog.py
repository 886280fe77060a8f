"""Names of the datasets and models (kept light: no torch import, for fast CLI start-up)."""

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "diabetes")
MODELS = ("mlp", "mlp-wide", "lenet5", "resnet", "linear")
DEFAULT_MODEL = {"digits": "mlp", "mnist": "lenet5", "fashion-mnist": "lenet5", "cifar10": "resnet", "diabetes": "linear"}
# Where a file dataset is read from when no --data-dir is given: Debian's dataset-fashion-mnist
# package installs the real Fashion-MNIST (70,000 images) here, so it works offline.
DEFAULT_DATA_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
