"""Containers for what attacks consume: a model's logits on labelled samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class ModelOutputs:
    """Logits ``[n, C]`` of one model on ``n`` samples with true labels ``[n]``."""

    logits: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.logits.ndim != 2 or len(self.logits) != len(self.labels):
            raise ValueError(f"logits {self.logits.shape} and labels {self.labels.shape} do not match")

    def __len__(self) -> int:
        return len(self.labels)

    def log_probs(self) -> np.ndarray:
        """Log-softmax in float64, ``[n, C]``, computed stably."""
        z = self.logits.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@dataclass(frozen=True, eq=False)
class ShadowOutputs:
    """Shadow models' outputs on their own IN and OUT samples, pooled over models.

    ``is_member[i]`` says whether the shadow that produced row ``i`` trained on that sample.
    """

    outputs: ModelOutputs
    is_member: np.ndarray

    def split(self) -> tuple[ModelOutputs, ModelOutputs]:
        """``(IN rows, OUT rows)``."""
        m = self.is_member.astype(bool)
        o = self.outputs
        return ModelOutputs(o.logits[m], o.labels[m]), ModelOutputs(o.logits[~m], o.labels[~m])
