"""What every training-time defense shares: the context it may use and the two ways it can act.

A defense either supplies a :class:`~raymia.training.loop.TrainingPolicy` for the one training loop (RelaxLoss,
label smoothing, early stopping, DP-SGD, adversarial regularisation), or — when it changes what data the final
model learns from — orchestrates several runs of that loop in :meth:`Defense.fit` (DMP, SELENA). It never copies
the loop. The same defense object trains the target and every reference model, so the attacker is adaptive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from raymia.data.datasets import Dataset
from raymia.errors import UserError
from raymia.models.classifiers import ModelSpec
from raymia.training.ensemble import train_many
from raymia.training.loop import TrainingPolicy, TrainRecipe


@dataclass(frozen=True, eq=False)
class DefenseContext:
    """Data a defense may use besides the rows it protects.

    Attributes:
        dataset: the whole dataset (features and labels).
        calibration: defender-held rows never audited (validation for early stopping).
        reference: the defender's own public data (split role ``defender_reference``), disjoint from every audited
            sample and from the attacker's population (DMP's unlabeled reference set, AdvReg's non-members).
        device: where to train.
    """

    dataset: Dataset
    calibration: np.ndarray
    reference: np.ndarray
    device: torch.device | str = "cpu"

    def required(self, kind: str, who: str) -> np.ndarray:
        """The ``calibration`` or ``reference`` rows, or a :class:`UserError` naming the split to enlarge."""
        rows = getattr(self, kind)
        split = {"calibration": "calibration", "reference": "defender_reference"}[kind]
        if len(rows) == 0:
            raise UserError(f"{who} needs rows from the {split} split, which is empty; set split.{split} > 0",
                            field=f"split.{split}")
        return rows


@dataclass
class FitResult:
    """A defended model, numbers about its training, and the rows its final training loss touched."""

    model: nn.Module
    extra: dict[str, float] = field(default_factory=dict)
    data_rows: np.ndarray | None = None


class Defense:
    """No defense: ordinary cross-entropy training. Subclasses override :meth:`policy` and/or :meth:`fit`."""

    name = "none"
    #: True when training depends on :class:`DefenseContext` rows (so they belong in the cache key).
    uses_context_rows = False

    def __init__(self, config: Any = None):
        self.config = config

    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        """The architecture actually trained (regularisation may add dropout)."""
        return spec

    def recipe(self, recipe: TrainRecipe) -> TrainRecipe:
        """The optimisation recipe actually used (regularisation may change weight decay)."""
        return recipe

    def policy(self, ctx: DefenseContext, recipe: TrainRecipe, n_train: int, seed: int) -> TrainingPolicy | None:
        """A fresh policy for one model trained on ``n_train`` rows with ``seed`` (``None``: plain cross-entropy)."""
        return None

    def check(self, model: nn.Module, *, field: str) -> None:
        """Raise :class:`~raymia.errors.UserError` if this defense cannot train ``model`` (before any training)."""

    def training_passes(self, recipe: TrainRecipe, n_train: int, n_reference: int) -> tuple[int, float]:
        """Networks trained for one defended model on ``n_train`` rows (``n_reference``: the defender's reference
        rows) and their training sample-passes (one sample forward and backward once): the cost plan's count."""
        return 1, float(self.recipe(recipe).epochs * n_train)

    @property
    def multi_stage(self) -> bool:
        """True when :meth:`fit` is overridden, i.e. the defense is more than a policy for one loop."""
        return type(self).fit is not Defense.fit

    def fit(self, build: Callable[[int], nn.Module], rows: np.ndarray, recipe: TrainRecipe, seed: int,
            ctx: DefenseContext) -> FitResult:
        """Train one defended model on ``rows``; ``build(seed)`` makes a fresh network of the target's architecture."""
        model = build(seed)
        recipe = self.recipe(recipe)
        x, y = torch.from_numpy(ctx.dataset.x), torch.from_numpy(ctx.dataset.y)
        _, extras = train_many([model], x, y, [rows], recipe, [seed],
                               make_policy=lambda n, s: self.policy(ctx, recipe, n, s), strategy="loop", device=ctx.device)
        return FitResult(model, extras[0], rows)
