"""One training loop for every classifier (targets, shadow and reference models, defended models).

Data stays resident on the device as tensors and batches are index slices of a seeded permutation, so there
is no DataLoader in the hot loop. Training-time defenses do not copy this loop: they supply a
:class:`TrainingPolicy` that may wrap the model/optimizer, replace the per-batch objective, and stop early.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class TrainRecipe(BaseModel):
    """Optimisation hyper-parameters shared by a target and every shadow/reference model trained like it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    augment: Literal["none", "flip", "flip_crop"] = "none"
    crop_padding: int = Field(4, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    fn: str | None = Field(None, description="your own training function 'package.module:fit', called as "
                           "fit(model, x, y, *, seed, device) -> model instead of raymia's loop (the fields above "
                           "are then unused)")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast on ``device`` when ``precision: bf16``, else a no-op."""
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def augment_batch(x: torch.Tensor, kind: str, padding: int = 4) -> torch.Tensor:
    """Random horizontal flips (and, for ``flip_crop``, random crops after zero padding) of images
    ``[..., C, H, W]`` on their device, drawn from the global torch RNG; other inputs pass through."""
    if kind == "none" or x.dim() < 4:
        return x
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    x = x.reshape(-1, c, h, w)
    b = x.shape[0]
    flip = torch.rand(b, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if kind == "flip_crop":
        p = padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), device=x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
        x = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    return x.reshape(*lead, c, h, w)


class TrainingPolicy:
    """How a training-time defense changes the loop. The base class is ordinary cross-entropy training.

    Subclasses override any of:

    - :meth:`attach` to wrap the model / optimizer before the first step (e.g. DP-SGD);
    - :meth:`loss` to replace the per-batch objective (e.g. RelaxLoss, label smoothing, distillation);
    - :meth:`end_epoch` to stop early (e.g. early stopping on a validation split);
    - :meth:`finish` to clean up or pick the final weights once training ends;
    - :attr:`extra` to report numbers about the run (e.g. the achieved DP epsilon).
    """

    name = "none"
    #: True when :meth:`loss` is a pure tensor function (no data-dependent Python branches), so the
    #: ensemble trainer may ``vmap`` it across models.
    vmappable = True

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, epoch: int) -> torch.Tensor:
        """Objective to minimise for one batch. ``logits [B, C]``; ``targets [B]`` class ids or ``[B, C]`` soft labels."""
        return F.cross_entropy(logits, targets)

    def end_epoch(self, model: nn.Module, epoch: int) -> bool:
        """Called after every epoch; return True to stop training."""
        return False

    def finish(self, model: nn.Module) -> None:
        """Called once after the last epoch, before the model is put in eval mode."""

    @property
    def extra(self) -> dict[str, float]:
        """Numbers this policy reports about the finished run (logged as metrics ``defense.<name>``)."""
        return {}


@dataclass(frozen=True)
class TrainResult:
    """What training reports back: epochs actually run and the mean objective of the last epoch."""

    epochs_run: int
    final_loss: float


def make_optimizer(params: Iterable[torch.Tensor], recipe: TrainRecipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params`` (elementwise updates, so stacked ensembles train identically)."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def make_lr_schedule(optimizer: torch.optim.Optimizer, recipe: TrainRecipe, steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step LR schedule (``None`` for a constant rate)."""
    if recipe.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
    return None


def epoch_orders(n: int, seed: int) -> Iterator[torch.Tensor]:
    """The batch order of every epoch: a fresh ``randperm(n)`` from a generator seeded once with ``seed``.

    Shared by :func:`train_classifier` and the ensemble trainer, so a model trained in an ensemble sees
    exactly the batches it would see trained alone.
    """
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randperm(n, generator=gen)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: TrainRecipe, *, seed: int,
                     policy: TrainingPolicy | None = None, device: torch.device | str = "cpu",
                     progress: bool = False, desc: str = "train",
                     on_epoch: Callable[[int, nn.Module], None] | None = None) -> TrainResult:
    """Train ``model`` in place on ``x [n, *shape]`` and targets ``y [n]`` (or soft labels ``[n, C]``).

    Deterministic under ``seed`` on a given device: the batch order comes from a seeded generator and the
    global torch RNG (dropout) is reseeded. Shows a progress bar when ``progress`` and stderr is a terminal.
    ``on_epoch(epoch, model)`` is called after every epoch (e.g. to report validation accuracy to a scheduler).
    """
    policy = policy or TrainingPolicy()
    device = torch.device(device)
    torch.manual_seed(seed)
    model.to(device).train()
    x, y = x.to(device), y.to(device)
    optimizer = make_optimizer(model.parameters(), recipe)
    model, optimizer = policy.attach(model, optimizer)
    steps_per_epoch = max(1, -(-len(x) // recipe.batch_size))
    scheduler = make_lr_schedule(optimizer, recipe, steps_per_epoch)
    orders = epoch_orders(len(x), seed)
    epochs = range(recipe.epochs)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(epochs, desc=desc, leave=False, unit="ep")
        epochs = bar
    epochs_run, epoch_loss = 0, float("nan")
    for epoch in epochs:
        order = next(orders).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, len(x), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            with recipe.autocast(device):
                logits = model(augment_batch(x[idx], recipe.augment, recipe.crop_padding))
            loss = policy.loss(logits.float(), y[idx], epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.detach()
        epochs_run, epoch_loss = epoch + 1, float(total) / steps_per_epoch
        if bar is not None:
            bar.set_postfix(loss=f"{epoch_loss:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, model)
        if policy.end_epoch(model, epoch):
            break
    policy.finish(model)
    model.eval()
    return TrainResult(epochs_run=epochs_run, final_loss=epoch_loss)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor | np.ndarray, *, device: torch.device | str = "cpu",
                   batch_size: int = 1024) -> np.ndarray:
    """Eval-mode logits ``[n, C]`` (float32 numpy) for inputs ``x [n, *shape]``."""
    device = torch.device(device)
    model.to(device).eval()
    x = torch.as_tensor(x)
    outs = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy()
