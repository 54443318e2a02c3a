"""SELENA (Tang et al., USENIX Security 2022): Split-AI ensemble, then self-distillation.

1. Split-AI: train K sub-models; each training sample is left out of exactly L of them (cyclic assignment over a
   seeded permutation, so every sub-model trains on about (K - L) / K of the data). The sub-models are a many-
   models job: they train together with ``vmap`` where that is faster.
2. Adaptive inference for training samples: the soft label of sample i is the mean softmax of the L sub-models
   that did NOT train on it — a prediction that never saw i.
3. Self-distillation: the deployed model trains on the training samples with those soft labels (cross-entropy
   against probability targets). Only it is released and audited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from raymia.defenses.base import Defense, DefenseContext, FitResult
from raymia.training.ensemble import train_many
from raymia.training.loop import TrainRecipe, predict_logits, train_classifier


class SELENAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["selena"] = "selena"
    submodels: int = Field(25, ge=2, description="K")
    excluded: int = Field(10, ge=1, description="L: sub-models that never see a given sample")

    @model_validator(mode="after")
    def _l_below_k(self) -> "SELENAConfig":
        if self.excluded >= self.submodels:
            raise ValueError("excluded (L) must be smaller than submodels (K)")
        return self


def split_ai_exclusions(n: int, k: int, l: int, seed: int) -> np.ndarray:
    """Bool ``[k, n]``: ``excl[j, i]`` iff sub-model j does not train on sample i; every column has exactly l."""
    order = np.random.default_rng(seed).permutation(n)
    excl = np.zeros((k, n), dtype=bool)
    for pos, i in enumerate(order):
        excl[(pos + np.arange(l)) % k, i] = True
    return excl


def split_ai_soft_labels(probs: np.ndarray, excl: np.ndarray) -> np.ndarray:
    """Soft labels ``[n, C]`` from sub-model probabilities ``[K, n, C]``: sample i's is the mean over the sub-models
    ``excl[:, i]`` marks, the ones that did not train on it."""
    return (probs * excl[..., None]).sum(axis=0) / excl.sum(axis=0)[:, None]


class SELENA(Defense):
    name = "selena"

    def training_passes(self, recipe: TrainRecipe, n_train: int, n_reference: int) -> tuple[int, float]:
        """K sub-models, each on the (K − L)/K of the rows it may see, then the student on all of them."""
        cfg = self.config
        per_sub = n_train * (cfg.submodels - cfg.excluded) / cfg.submodels
        return cfg.submodels + 1, recipe.epochs * (cfg.submodels * per_sub + n_train)

    def fit(self, build: Callable[[int], nn.Module], rows: np.ndarray, recipe: TrainRecipe, seed: int,
            ctx: DefenseContext) -> FitResult:
        cfg = self.config
        rows = np.asarray(rows)
        excl = split_ai_exclusions(len(rows), cfg.submodels, cfg.excluded, seed)
        x, y = torch.from_numpy(ctx.dataset.x), torch.from_numpy(ctx.dataset.y)
        seeds = [seed * 1000 + j + 1 for j in range(cfg.submodels)]
        subs = [build(s) for s in seeds]
        train_many(subs, x, y, [rows[~excl[j]] for j in range(cfg.submodels)], recipe, seeds, device=ctx.device)
        probs = np.stack([torch.softmax(torch.from_numpy(predict_logits(m, ctx.dataset.x[rows], device=ctx.device))
                                        .double(), dim=1).numpy() for m in subs])  # [K, n, C]
        soft = split_ai_soft_labels(probs, excl)
        student = build(seed)
        train_classifier(student, x[rows], torch.from_numpy(soft).float(), recipe, seed=seed, device=ctx.device)
        return FitResult(student, {"submodels": float(cfg.submodels)}, rows)
