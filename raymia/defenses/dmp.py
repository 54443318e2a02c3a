"""DMP — Distillation for Membership Privacy (Shejwalkar & Houmansadr, AAAI 2021).

1. Train an unprotected teacher on the private training set (the protected rows).
2. Label an unlabeled reference set — rows disjoint from the training set, from every audited sample and from
   the attacker's population (split role ``defender_reference``) — with the teacher's softened outputs
   softmax(z / T).
3. Keep the ``k`` reference samples whose soft labels have the LOWEST entropy (the paper's selection criterion;
   ``selection: random | high`` for ablation; the official Purchase code uses a random reference set).
4. Train the protected student from scratch on the selected reference samples only, minimising
   KL(teacher_T || softmax(student / T)) (batch-mean, no hard labels, no T^2 factor). The student never sees a
   training sample; it is the model that is deployed and audited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raymia.defenses.base import Defense, DefenseContext, FitResult
from raymia.training.loop import (
    TrainingPolicy,
    TrainRecipe,
    predict_logits,
    train_classifier,
)


class DMPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["dmp"] = "dmp"
    k: int | None = Field(None, ge=1, description="reference samples kept (None: all)")
    selection: Literal["low", "random", "high"] = "low"
    temperature: float = Field(1.0, gt=0)
    student_epochs: int | None = Field(None, ge=1, description="default: the recipe's epochs")


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy ``[n]`` of probability rows ``[n, C]`` (natural log)."""
    p = np.clip(probs, 1e-30, 1.0)
    return -(probs * np.log(p)).sum(axis=1)


def select_reference(probs: np.ndarray, k: int | None, selection: str, seed: int) -> np.ndarray:
    """Positions of the ``k`` reference samples to distil on: lowest / highest entropy, or random."""
    n = len(probs)
    k = n if k is None else min(k, n)
    if selection == "random":
        return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    order = np.argsort(entropy(probs), kind="stable")
    return np.sort(order[:k] if selection == "low" else order[::-1][:k])


class DistillationPolicy(TrainingPolicy):
    """KL(teacher || student) at temperature T, with soft targets ``[B, C]`` in place of labels."""

    name = "distillation"

    def __init__(self, temperature: float):
        self.t = temperature

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, epoch: int) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits / self.t, dim=1), targets, reduction="batchmean")


class DMP(Defense):
    name = "dmp"
    uses_context_rows = True

    def training_passes(self, recipe: TrainRecipe, n_train: int, n_reference: int) -> tuple[int, float]:
        """The teacher on the protected rows, then the student on the k kept reference rows."""
        cfg = self.config
        kept = n_reference if cfg.k is None else min(cfg.k, n_reference)
        return 2, float(recipe.epochs * n_train + (cfg.student_epochs or recipe.epochs) * kept)

    def fit(self, build: Callable[[int], nn.Module], rows: np.ndarray, recipe: TrainRecipe, seed: int,
            ctx: DefenseContext) -> FitResult:
        cfg = self.config
        ref = np.asarray(ctx.required("reference", "DMP (its unlabeled reference set)"))
        if np.intersect1d(ref, rows).size:
            raise AssertionError("DMP reference set overlaps the protected training rows")
        x, y = torch.from_numpy(ctx.dataset.x), torch.from_numpy(ctx.dataset.y)
        teacher = build(seed)
        train_classifier(teacher, x[rows], y[rows], recipe, seed=seed, device=ctx.device)
        soft = torch.softmax(torch.from_numpy(predict_logits(teacher, ctx.dataset.x[ref], device=ctx.device))
                             .double() / cfg.temperature, dim=1).numpy()
        chosen = select_reference(soft, cfg.k, cfg.selection, seed)
        student = build(seed + 1)
        student_recipe = recipe if cfg.student_epochs is None else recipe.model_copy(update={"epochs": cfg.student_epochs})
        train_classifier(student, x[ref[chosen]], torch.from_numpy(soft[chosen]).float(), student_recipe, seed=seed + 1,
                         policy=DistillationPolicy(cfg.temperature), device=ctx.device)
        return FitResult(student, {"reference_used": float(len(chosen)),
                                   "mean_reference_entropy": float(entropy(soft[chosen]).mean())}, ref[chosen])
