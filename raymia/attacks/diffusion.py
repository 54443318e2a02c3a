"""White-box membership-inference attacks on ε-prediction diffusion models (reference: attacks.md §1.8).

Every attack returns one score per image, larger = more likely a member (each is a negated error), for
images ``x0 [n, C, H, W]`` in model range [-1, 1] and an ε-function (:mod:`raymia.diffusion.sampling`).

- ``loss`` (naive loss; Matsumoto et al., Carlini et al.): -mean over ``noises`` draws of ||ε - ε̂(x_t, t)||²
  with x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε at a fixed t.
- ``secmi`` (SecMI-stat, Duan et al. 2023): deterministic DDIM inversion x0 -> x̃_{t-k} in steps of k, one
  deterministic step up to t (φ) and one DDIM step back down (ψ); score -||ψ(φ(x̃_{t-k})) - x̃_{t-k}||².
- ``pia`` / ``pian`` (Kong et al. 2024): ε0 = ε̂(x0, 0); x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε0;
  score -Σ|ε0 - ε̂(x_t, t)|^p (p = 4). PIAN rescales ε0 per image to mean |·| = sqrt(2/π) first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from raymia.diffusion.sampling import EpsFn, ddim_step

DIFFUSION_ATTACKS: tuple[str, ...] = ("loss", "secmi", "pia", "pian")


class DiffusionAttackConfig(BaseModel):
    """Which attacks run and at which timesteps. ``t_grid``: extra timesteps at which every attack is also
    scored, reported as ``best_of_grid`` — an oracle (the best t is chosen on the audited scores)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: list[str] = list(DIFFUSION_ATTACKS)
    loss_t: int = Field(100, ge=0, description="naive loss: the timestep")
    loss_noises: int = Field(4, ge=1, description="naive loss: noise draws averaged per image")
    secmi_t: int = Field(100, ge=1, description="SecMI: t_sec")
    secmi_k: int = Field(10, ge=1, description="SecMI: inversion stride k")
    pia_t: int = Field(200, ge=1, description="PIA / PIAN: the timestep")
    pia_p: float = Field(4.0, gt=0, description="PIA / PIAN: the norm's exponent")
    t_grid: list[int] = [50, 100, 150, 200, 300, 400]
    batch_size: int = Field(256, ge=1)
    seed: int = 0

    @field_validator("enabled")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in DIFFUSION_ATTACKS]
        if bad:
            raise ValueError(f"unknown diffusion attacks {bad}; choose from {list(DIFFUSION_ATTACKS)}")
        if not v:
            raise ValueError("enable at least one attack")
        return v

    def default_t(self, attack: str) -> int:
        return {"loss": self.loss_t, "secmi": self.secmi_t}.get(attack, self.pia_t)


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x0[i:i + batch]) for i in range(0, len(x0), batch)]).cpu()


def _ts(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((len(x),), t, device=x.device)


def loss_scores(eps_fn: EpsFn, x0: torch.Tensor, abar: torch.Tensor, t: int, *, noises: int = 4, seed: int = 0,
                batch: int = 256) -> torch.Tensor:
    """Naive loss attack ``[n]``. The noise of image i is the same for every model scored with ``seed``."""
    gen = torch.Generator(device=x0.device).manual_seed(seed)
    noise = torch.randn((noises, *x0.shape), generator=gen, device=x0.device)  # [noises, n, C, H, W]
    a = abar[t]
    out = []
    with torch.no_grad():
        for i in range(0, len(x0), batch):
            xb = x0[i:i + batch]
            err = sum((e - eps_fn(a.sqrt() * xb + (1 - a).sqrt() * e, _ts(xb, t))).pow(2).flatten(1).sum(1)
                      for e in noise[:, i:i + batch])
            out.append(-err / noises)
    return torch.cat(out).cpu()


def secmi_scores(eps_fn: EpsFn, x0: torch.Tensor, abar: torch.Tensor, t_sec: int, k: int, *,
                 batch: int = 256) -> torch.Tensor:
    """SecMI-stat ``[n]``: -t-error at t_sec, DDIM inversion stride k."""
    if t_sec < k:
        raise ValueError(f"SecMI needs t_sec >= k, got t_sec={t_sec}, k={k}")

    def one(xb: torch.Tensor) -> torch.Tensor:
        x, t = xb, 0
        while t < t_sec - k:  # invert x0 -> x̃_{t_sec - k}
            x = ddim_step(x, eps_fn(x, _ts(x, t)), t, t + k, abar)
            t += k
        up = ddim_step(x, eps_fn(x, _ts(x, t)), t, t_sec, abar)  # φ
        back = ddim_step(up, eps_fn(up, _ts(up, t_sec)), t_sec, t, abar)  # ψ
        return -(back - x).pow(2).flatten(1).sum(1)
    return _batched(one, x0, batch)


def pia_scores(eps_fn: EpsFn, x0: torch.Tensor, abar: torch.Tensor, t: int, *, p: float = 4.0,
               normalized: bool = False, batch: int = 256) -> torch.Tensor:
    """PIA (``normalized=False``) or PIAN ``[n]``: two network calls per image."""
    a = abar[t]

    def one(xb: torch.Tensor) -> torch.Tensor:
        eps0 = eps_fn(xb, _ts(xb, 0))
        if normalized:
            eps0 = eps0 / eps0.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1) * math.sqrt(2 / math.pi)
        pred = eps_fn(a.sqrt() * xb + (1 - a).sqrt() * eps0, _ts(xb, t))
        return -(eps0 - pred).abs().pow(p).flatten(1).sum(1)
    return _batched(one, x0, batch)


def attack_scores(attack: str, eps_fn: EpsFn, x0: torch.Tensor, abar: torch.Tensor, cfg: DiffusionAttackConfig,
                  t: int | None = None) -> torch.Tensor:
    """Scores ``[n]`` of one attack at its configured timestep, or at ``t``."""
    t = cfg.default_t(attack) if t is None else t
    if attack == "loss":
        return loss_scores(eps_fn, x0, abar, t, noises=cfg.loss_noises, seed=cfg.seed, batch=cfg.batch_size)
    if attack == "secmi":
        return secmi_scores(eps_fn, x0, abar, t, min(cfg.secmi_k, t), batch=cfg.batch_size)
    if attack in ("pia", "pian"):
        return pia_scores(eps_fn, x0, abar, t, p=cfg.pia_p, normalized=attack == "pian", batch=cfg.batch_size)
    raise ValueError(f"unknown diffusion attack '{attack}'")
