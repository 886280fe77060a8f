"""A plain PyTorch training loop, as a user has it before gradwire (compare distributed_loop.py).

    python examples/plain_loop.py
"""

from __future__ import annotations

import torch
from bn_task import build_net, make_task
from torch.utils.data import DataLoader


def train(epochs: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    data = make_task(seed=0)
    model = build_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data.train, batch_size=32, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    return model


if __name__ == "__main__":
    model = train()
    print("test accuracy", make_task(seed=0).evaluate(model)[1])
