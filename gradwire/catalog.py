"""Names of the datasets and models (kept light: no torch import, for fast CLI start-up)."""

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "diabetes")
MODELS = ("mlp", "lenet5", "resnet", "linear")
DEFAULT_MODEL = {"digits": "mlp", "mnist": "lenet5", "fashion-mnist": "lenet5", "cifar10": "resnet", "diabetes": "linear"}
