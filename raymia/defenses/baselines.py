"""Baseline defenses every comparison includes: label smoothing, early stopping, weight decay / dropout."""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raymia.defenses.base import Defense, DefenseContext
from raymia.models.classifiers import ModelSpec
from raymia.training.loop import TrainingPolicy, TrainRecipe, predict_logits


class NoDefenseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["none"] = "none"


# ---------------------------------------------------------------------------------------------- label smoothing


class LabelSmoothingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["label_smoothing"] = "label_smoothing"
    epsilon: float = Field(0.1, gt=0, lt=1)


class LabelSmoothingPolicy(TrainingPolicy):
    """Cross-entropy against (1 - eps) one-hot + eps uniform targets (Szegedy et al. 2016)."""

    name = "label_smoothing"

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, epoch: int) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.epsilon)


class LabelSmoothing(Defense):
    name = "label_smoothing"

    def policy(self, ctx: DefenseContext, recipe: TrainRecipe, n_train: int, seed: int) -> TrainingPolicy:
        return LabelSmoothingPolicy(self.config.epsilon)


# ----------------------------------------------------------------------------------------------- early stopping


class EarlyStoppingConfig(BaseModel):
    """Stop when validation accuracy on the defender-held calibration split has not improved for ``patience``
    epochs and keep the best epoch's weights. The validation split never contains audited samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["early_stopping"] = "early_stopping"
    patience: int = Field(3, ge=1)
    min_epochs: int = Field(1, ge=1)


class EarlyStoppingPolicy(TrainingPolicy):
    name = "early_stopping"
    vmappable = False  # stops each model at its own epoch

    def __init__(self, cfg: EarlyStoppingConfig, x_val: np.ndarray, y_val: np.ndarray, device: torch.device | str):
        self.cfg, self.x_val, self.y_val, self.device = cfg, x_val, y_val, device
        self.best_acc, self.best_epoch, self.best_state = -1.0, -1, None

    def end_epoch(self, model: nn.Module, epoch: int) -> bool:
        acc = float((predict_logits(model, self.x_val, device=self.device).argmax(1) == self.y_val).mean())
        model.train()
        if acc > self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch
            self.best_state = copy.deepcopy(model.state_dict())
        return epoch + 1 >= self.cfg.min_epochs and epoch - self.best_epoch >= self.cfg.patience

    def finish(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    @property
    def extra(self) -> dict[str, float]:
        return {"best_epoch": float(self.best_epoch + 1), "val_acc": self.best_acc}


class EarlyStopping(Defense):
    name = "early_stopping"
    uses_context_rows = True

    def policy(self, ctx: DefenseContext, recipe: TrainRecipe, n_train: int, seed: int) -> TrainingPolicy:
        rows = ctx.required("calibration", "early stopping (its validation set)")
        return EarlyStoppingPolicy(self.config, ctx.dataset.x[rows], ctx.dataset.y[rows], ctx.device)


# --------------------------------------------------------------------------------------- weight decay / dropout


class RegularizationConfig(BaseModel):
    """Classical regularisers as a defense setting: override the recipe's weight decay and/or the model's dropout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["regularization"] = "regularization"
    weight_decay: float | None = Field(None, ge=0)
    dropout: float | None = Field(None, ge=0, lt=1)


class Regularization(Defense):
    name = "regularization"

    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        if self.config.dropout is None:
            return spec
        return spec.model_copy(update={"params": {**spec.params, "dropout": self.config.dropout}})

    def recipe(self, recipe: TrainRecipe) -> TrainRecipe:
        if self.config.weight_decay is None:
            return recipe
        return recipe.model_copy(update={"weight_decay": self.config.weight_decay})
