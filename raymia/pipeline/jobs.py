"""Training jobs: one classifier to train, with everything that determines its weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

import raymia
from raymia.cache import content_key
from raymia.config import TargetConfig


@dataclass(frozen=True, eq=False)
class TrainJob:
    """A target or one of its reference models, and its content-addressed cache key.

    The key covers architecture, recipe, defense, data fingerprint, the exact training indices, the seed and
    the raymia version: change any of them and the model is retrained.
    """

    job_id: str
    target: TargetConfig
    role: Literal["target", "reference"]
    index: int
    train_indices: np.ndarray
    seed: int
    data_fingerprint: str

    @property
    def key(self) -> str:
        return content_key({
            "model": self.target.model.model_dump(mode="json"),
            "train": self.target.train.model_dump(mode="json"),
            "defense": "none",
            "data": self.data_fingerprint,
            "indices": np.asarray(self.train_indices, dtype=np.int64),
            "seed": self.seed,
            "code": raymia.__version__,
        })
