"""A user's own code, as a privacy engineer would have it: an architecture and a plain PyTorch training loop.

The tests of "audit your own model" train a target with :func:`fit` outside raymia, save it, and let raymia
train the reference models with the same function (``train.fn: tests.own_model:fit``).
"""

from __future__ import annotations

import torch
from torch import nn

CALLS: list[int] = []  # training-set size of every call of fit in this process (the tests read it)


def build(input_shape: tuple[int, ...], num_classes: int, hidden: int = 256) -> nn.Module:
    """A one-hidden-layer MLP on flattened inputs."""
    d = 1
    for s in input_shape:
        d *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int, device: torch.device,
        epochs: int = 60) -> nn.Module:
    """Full-batch-free plain Adam loop: shuffled mini-batches of 32, no regularisation (it overfits)."""
    CALLS.append(len(x))
    g = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx].to(device)), y[idx].to(device)).backward()
            opt.step()
    return model.eval()


def fit_returns_nothing(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int,
                        device: torch.device) -> None:
    """A broken training function: it forgets to return the model."""
    fit(model, x, y, seed=seed, device=device, epochs=1)
