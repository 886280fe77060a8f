"""The models of the round benchmark, as gradwire user tasks on synthetic data.

torchvision is not a dependency (and not installed here), so ResNet-18 is written out below: the
CIFAR-style ResNet-18 of He et al. (3x3 stem, no max-pool, [2, 2, 2, 2] basic blocks, widths
64-512), 11,173,962 parameters for 10 classes, as torchvision's ``resnet18`` with its stem adapted
to 32x32 inputs. The data are seeded random tensors: the benchmark measures CPU per round, which
depends on shapes and sizes, not on what the pixels show.

Tasks (``MODULE:FACTORY`` references for ``gradwire server --task``):

* ``benchmarks.models:mlp8m`` - MLP 3072-2048-1024-128-10 (8,524,170 parameters), batch 64;
* ``benchmarks.models:resnet18`` - ResNet-18 on 3x32x32, batch 32;
* ``benchmarks.models:mlp1m`` - MLP 1024-896-128-10 (1,035,786 parameters), for the worker
  scaling sweep, where 16 workers share the machine.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import gradwire

TRAIN_EXAMPLES = 512
TEST_EXAMPLES = 64
BATCH = {"mlp8m": 64, "resnet18": 32, "mlp1m": 64}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


MODELS = {
    "mlp8m": (lambda: mlp((3072, 2048, 1024, 128, 10)), (3, 32, 32)),
    "resnet18": (ResNet18, (3, 32, 32)),
    "mlp1m": (lambda: mlp((1024, 896, 128, 10)), (1024,)),
}


def synthetic(shape: tuple[int, ...], n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g))


def make(name: str, seed: int = 0) -> gradwire.Task:
    factory, shape = MODELS[name]
    return gradwire.Task(model=factory, train=synthetic(shape, TRAIN_EXAMPLES, seed),
                         test=synthetic(shape, TEST_EXAMPLES, seed + 1), name=name)


def mlp8m(seed: int = 0) -> gradwire.Task:
    return make("mlp8m", seed)


def resnet18(seed: int = 0) -> gradwire.Task:
    return make("resnet18", seed)


def mlp1m(seed: int = 0) -> gradwire.Task:
    return make("mlp1m", seed)
