"""Defenses of classifiers, one module per paper's method. The training-time ones below attach to the one
training loop and are chosen with ``defense: {name: ...}``; DIFFENCE (:mod:`raymia.defenses.diffence`) acts at
inference time, in front of any trained classifier, and is configured under ``diffence:``.

========================  ==========================================================================
``none``                  ordinary training (:mod:`raymia.defenses.base`)
``relaxloss``             RelaxLoss, Chen et al. ICLR 2022 (:mod:`raymia.defenses.relaxloss`)
``dmp``                   Distillation for Membership Privacy, Shejwalkar & Houmansadr AAAI 2021 (:mod:`.dmp`)
``label_smoothing``       label smoothing (:mod:`raymia.defenses.baselines`)
``early_stopping``        early stopping on the calibration split (:mod:`raymia.defenses.baselines`)
``regularization``        weight decay / dropout (:mod:`raymia.defenses.baselines`)
``dp_sgd``                DP-SGD through Opacus (:mod:`raymia.defenses.dp_sgd`)
``advreg``                adversarial regularisation, Nasr et al. CCS 2018 (:mod:`raymia.defenses.advreg`)
``selena``                SELENA, Tang et al. USENIX Security 2022 (:mod:`raymia.defenses.selena`)
========================  ==========================================================================
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from raymia.defenses.advreg import AdvReg, AdvRegConfig
from raymia.defenses.base import Defense, DefenseContext, FitResult
from raymia.defenses.baselines import (
    EarlyStopping,
    EarlyStoppingConfig,
    LabelSmoothing,
    LabelSmoothingConfig,
    NoDefenseConfig,
    Regularization,
    RegularizationConfig,
)
from raymia.defenses.dmp import DMP, DMPConfig
from raymia.defenses.dp_sgd import DPSGD, DPSGDConfig
from raymia.defenses.relaxloss import RelaxLoss, RelaxLossConfig
from raymia.defenses.selena import SELENA, SELENAConfig

DefenseConfig = Annotated[
    Union[NoDefenseConfig, RelaxLossConfig, DMPConfig, LabelSmoothingConfig, EarlyStoppingConfig,
          RegularizationConfig, DPSGDConfig, AdvRegConfig, SELENAConfig],
    Field(discriminator="name"),
]

DEFENSES: dict[str, type[Defense]] = {
    "none": Defense, "relaxloss": RelaxLoss, "dmp": DMP, "label_smoothing": LabelSmoothing,
    "early_stopping": EarlyStopping, "regularization": Regularization, "dp_sgd": DPSGD, "advreg": AdvReg,
    "selena": SELENA,
}


def make_defense(config: object) -> Defense:
    """The defense object for a validated defense config."""
    return DEFENSES[config.name](config)


__all__ = ["DEFENSES", "Defense", "DefenseConfig", "DefenseContext", "FitResult", "NoDefenseConfig", "make_defense"]
