"""RelaxLoss (Chen, Yu & Fritz, ICLR 2022): keep the training loss near a target level instead of driving it to 0.

Per minibatch with mean cross-entropy L (epochs counted from 0):

- even epochs: minimise |L - alpha| — gradient descent above alpha, gradient *ascent* below it;
- odd epochs: plain descent while L > alpha; otherwise *posterior flattening*: soft target t with
  t_y = min(p_y, upper) and the rest (1 - t_y) / (C - 1) on every other class, then
  - ``variant: image`` (official CIFAR code, the default): mean[(1 - correct) * soft_CE(t) - CE], i.e. pure ascent
    on correctly classified samples;
  - ``variant: nonimage`` (official Texas/Purchase code): mean soft_CE(t) over all samples.
  As in the official code the soft target is not detached (``detach_target: true`` detaches it).

alpha = 0 is ordinary training (L > 0 always, so the branches reduce to descent on L).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from raymia.defenses.base import Defense, DefenseContext
from raymia.training.loop import TrainingPolicy, TrainRecipe


class RelaxLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["relaxloss"] = "relaxloss"
    alpha: float = Field(1.0, ge=0)
    upper: float = Field(1.0, gt=0, le=1)
    variant: Literal["image", "nonimage"] = "image"
    detach_target: bool = False


def flattened_target(logits: torch.Tensor, y: torch.Tensor, upper: float, detach: bool = False) -> torch.Tensor:
    """``[B, C]`` soft targets: min(p_y, upper) on the true class, the remainder spread evenly over the others."""
    p = torch.softmax(logits, dim=1)
    if detach:
        p = p.detach()
    c = logits.shape[1]
    q = p.gather(1, y[:, None]).clamp(max=upper)  # [B, 1]
    onehot = F.one_hot(y, c).to(p.dtype)
    return onehot * q + (1 - onehot) * (1 - q) / (c - 1)


class RelaxLossPolicy(TrainingPolicy):
    name = "relaxloss"
    vmappable = False  # the branch depends on the batch's loss value

    def __init__(self, cfg: RelaxLossConfig):
        self.cfg = cfg

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, epoch: int) -> torch.Tensor:
        alpha = self.cfg.alpha
        ce = F.cross_entropy(logits, targets, reduction="none")
        mean = ce.mean()
        if epoch % 2 == 0:
            return (mean - alpha).abs()
        if mean > alpha:
            return mean
        t = flattened_target(logits, targets, self.cfg.upper, self.cfg.detach_target)
        soft = -(t * F.log_softmax(logits, dim=1)).sum(dim=1)
        if self.cfg.variant == "nonimage":
            return soft.mean()
        correct = (logits.argmax(dim=1) == targets).to(logits.dtype)
        return ((1 - correct) * soft - ce).mean()


class RelaxLoss(Defense):
    name = "relaxloss"

    def policy(self, ctx: DefenseContext, recipe: TrainRecipe, n_train: int, seed: int) -> TrainingPolicy:
        return RelaxLossPolicy(self.config)
