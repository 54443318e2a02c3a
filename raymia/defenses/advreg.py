"""Adversarial regularisation (Nasr, Shokri & Houmansadr, CCS 2018): train the classifier against an inference
model h that tries to tell its training samples from reference (non-member) samples.

min_f max_h  CE(f) + lambda * G(f, h),  G = E_train[log h(f(x), y)] + E_ref[log(1 - h(f(x'), y'))].

Each training step first updates h (``inner_steps`` times) on the current batch's outputs (members) against a
random batch from the defender's reference set (disjoint from every audited sample), then the classifier on
CE + lambda * mean log h(f(x), y) over the batch — only the member term depends on f's batch. ``warmup_epochs``
of plain training precede the game (as in the official code). h is the same three-branch network the NN
attack uses (softmax, label, loss), so the defender trains against the attacker's view of the outputs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raymia.attacks.nn import AttackNet, membership_features
from raymia.defenses.base import Defense, DefenseContext
from raymia.training.loop import TrainingPolicy, TrainRecipe


class AdvRegConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["advreg"] = "advreg"
    lam: float = Field(1.0, ge=0, description="weight of the adversary's gain (lambda)")
    inner_steps: int = Field(1, ge=1)
    warmup_epochs: int = Field(2, ge=0)
    attack_lr: float = Field(1e-3, gt=0)
    attack_width: int = Field(128, ge=8)


class AdvRegPolicy(TrainingPolicy):
    name = "advreg"
    vmappable = False

    def __init__(self, cfg: AdvRegConfig, x_ref: np.ndarray, y_ref: np.ndarray, num_classes: int, seed: int):
        self.cfg = cfg
        self.x_ref, self.y_ref = torch.from_numpy(x_ref), torch.from_numpy(y_ref)
        self.gen = torch.Generator().manual_seed(seed)
        self.h = AttackNet(num_classes, cfg.attack_width)
        self.h_opt = torch.optim.Adam(self.h.parameters(), lr=cfg.attack_lr)
        self.model: nn.Module | None = None
        self.last_gain = float("nan")

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.model = model
        device = next(model.parameters()).device
        self.h.to(device)
        self.x_ref, self.y_ref = self.x_ref.to(device), self.y_ref.to(device)
        return model, optimizer

    def _adversary_step(self, member_logits: torch.Tensor, member_y: torch.Tensor) -> None:
        idx = torch.randint(0, len(self.x_ref), (len(member_y),), generator=self.gen).to(self.x_ref.device)
        training = self.model.training
        self.model.eval()  # a look at the reference batch must not move BatchNorm statistics of the released model
        with torch.no_grad():
            ref_logits = self.model(self.x_ref[idx])
        self.model.train(training)
        feats = torch.cat([membership_features(member_logits.detach(), member_y),
                           membership_features(ref_logits, self.y_ref[idx])])
        target = torch.cat([torch.ones(len(member_y)), torch.zeros(len(idx))]).long().to(feats.device)
        loss = F.cross_entropy(self.h(feats), target)
        self.h_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.h_opt.step()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, epoch: int) -> torch.Tensor:
        ce = F.cross_entropy(logits, targets)
        if epoch < self.cfg.warmup_epochs or self.cfg.lam == 0:
            return ce
        for _ in range(self.cfg.inner_steps):
            self._adversary_step(logits, targets)
        log_in = F.log_softmax(self.h(membership_features(logits, targets)), dim=1)[:, 1]  # log h(f(x), y)
        self.last_gain = float(log_in.detach().mean().exp())
        return ce + self.cfg.lam * log_in.mean()

    @property
    def extra(self) -> dict[str, float]:
        return {"adversary_member_prob": self.last_gain}


class AdvReg(Defense):
    name = "advreg"
    uses_context_rows = True

    def policy(self, ctx: DefenseContext, recipe: TrainRecipe, n_train: int, seed: int) -> TrainingPolicy:
        rows = ctx.required("reference", "adversarial regularisation (its non-member reference set)")
        return AdvRegPolicy(self.config, ctx.dataset.x[rows], ctx.dataset.y[rows], ctx.dataset.num_classes,
                            seed=seed)
