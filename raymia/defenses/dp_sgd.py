"""DP-SGD (Abadi et al. 2016) through Opacus: per-sample gradient clipping plus Gaussian noise, with an RDP
accountant reporting the achieved epsilon.

Opacus wraps the model (``GradSampleModule``) and the optimizer (``DPOptimizer``) of the ordinary loop — the
``attach`` seam — rather than replacing it. Give ``noise_multiplier`` or ``target_epsilon`` (then the noise is
solved for the recipe's epochs and sampling rate). The loop draws shuffled fixed-size batches, so the epsilon
(RDP accountant at sampling rate batch/n, as Opacus computes it without Poisson sampling) is the standard
approximation, not a guarantee for Poisson-subsampled DP-SGD.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from raymia.defenses.base import Defense, DefenseContext
from raymia.errors import UserError
from raymia.training.loop import TrainingPolicy, TrainRecipe


class DPSGDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["dp_sgd"] = "dp_sgd"
    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    #: auditing the auditor: the noise actually added is ``noise_scale`` × σ while the accountant is told σ.
    #: Anything but 1 breaks the guarantee on purpose (the reported ε is then false); privacy audits flag it.
    noise_scale: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _one_noise_source(self) -> "DPSGDConfig":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or target_epsilon")
        return self


class DPSGDPolicy(TrainingPolicy):
    name = "dp_sgd"
    vmappable = False

    def __init__(self, cfg: DPSGDConfig, recipe: TrainRecipe, n_train: int):
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier

        self.cfg, self.batch_size = cfg, min(recipe.batch_size, n_train)
        self.sample_rate = self.batch_size / n_train
        self.sigma = cfg.noise_multiplier or get_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.delta, sample_rate=self.sample_rate,
            epochs=recipe.epochs, accountant="rdp")
        self.accountant = RDPAccountant()
        self._wrapped = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self._wrapped = GradSampleModule(model)
        dp_opt = DPOptimizer(optimizer, noise_multiplier=self.sigma * self.cfg.noise_scale, max_grad_norm=self.cfg.max_grad_norm,
                             expected_batch_size=self.batch_size)
        dp_opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        return self._wrapped, dp_opt

    def finish(self, model: nn.Module) -> None:
        if self._wrapped is not None:
            self._wrapped._close()  # remove Opacus hooks: the plain module is what gets saved and queried

    @property
    def extra(self) -> dict[str, float]:
        accountant = self.accountant
        if self.cfg.noise_scale != 1:  # the broken mechanism claims the nominal σ's ε
            from opacus.accountants import RDPAccountant

            accountant = RDPAccountant()
            accountant.history = [(self.sigma, q, steps) for _, q, steps in self.accountant.history]
        return {"dp_epsilon": float(accountant.get_epsilon(self.cfg.delta)), "dp_noise_multiplier": self.sigma,
                "dp_noise_scale": self.cfg.noise_scale}


class DPSGD(Defense):
    name = "dp_sgd"

    def check(self, model: nn.Module, *, field: str) -> None:
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise UserError(f"DP-SGD cannot train this architecture ({errors[0]}); use a model without BatchNorm, "
                            "e.g. arch mlp or cnn", field=field)

    def policy(self, ctx: DefenseContext, recipe: TrainRecipe, n_train: int, seed: int) -> TrainingPolicy:
        return DPSGDPolicy(self.config, recipe, n_train)
