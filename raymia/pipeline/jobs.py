"""Training jobs: one classifier to train, with everything that determines its weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

import raymia
from raymia.cache import content_key
from raymia.config import TargetConfig
from raymia.defenses import make_defense


@dataclass(frozen=True, eq=False)
class DefenseRows:
    """Dataset rows a defense may use besides the protected ones: the defender-held calibration split
    (validation) and the population split (reference data disjoint from every audited sample)."""

    calibration: np.ndarray
    reference: np.ndarray


NO_ROWS = DefenseRows(np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass(frozen=True, eq=False)
class TrainJob:
    """A target or one of its reference models, and its content-addressed cache key.

    The key covers architecture, recipe, defense (and the rows it uses), data fingerprint, the exact training
    indices, the seed and the raymia version: change any of them and the model is retrained.
    """

    job_id: str
    target: TargetConfig
    role: Literal["target", "reference"]
    index: int
    train_indices: np.ndarray
    seed: int
    data_fingerprint: str
    defense_rows: DefenseRows = NO_ROWS

    @property
    def key(self) -> str:
        uses_rows = make_defense(self.target.defense).uses_context_rows
        return content_key({
            "model": self.target.model.model_dump(mode="json"),
            "train": self.target.train.model_dump(mode="json"),
            "defense": self.target.defense.model_dump(mode="json"),
            "defense_rows": [self.defense_rows.calibration, self.defense_rows.reference] if uses_rows else None,
            "data": self.data_fingerprint,
            "indices": np.asarray(self.train_indices, dtype=np.int64),
            "seed": self.seed,
            "code": raymia.__version__,
        })
