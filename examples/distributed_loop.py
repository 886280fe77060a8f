"""The loop of plain_loop.py trained through a gradwire PS: 3 added lines (diff the two files).

    cd examples
    gradwire server --task bn_task:make_task --workers 2 --rounds 45 --lr 0.1 --momentum 0 &
    GRADWIRE_SERVER=127.0.0.1:50051 python distributed_loop.py &      # two workers
    GRADWIRE_SERVER=127.0.0.1:50051 python distributed_loop.py
"""

from __future__ import annotations

import torch
from bn_task import build_net, make_task
from torch.utils.data import DataLoader

import gradwire


def train(epochs: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    data = make_task(seed=0)
    model = build_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = gradwire.DistributedOptimizer(opt, model, codec="ans:bits=4")  # the PS: $GRADWIRE_SERVER
    loader = DataLoader(data.train, batch_size=32, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    opt.close()
    return model


if __name__ == "__main__":
    model = train()
    print("test accuracy", make_task(seed=0).evaluate(model)[1])
