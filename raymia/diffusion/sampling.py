"""Samplers and ε-functions of ε-prediction DDPMs, shared by DIFFENCE, DualMD and the diffusion attacks.

An ε-function maps ``(x_t [B, C, H, W], t [B])`` in model range to ε̂ ``[B, C, H, W]``. Samplers take a list of
ε-functions and call ``eps_fns[k % len(eps_fns)]`` at reverse step k (k = 0 first), exactly one network call
per step: one function is a plain sampler, two are DualMD's alternating sampler
(:mod:`raymia.diffusion.dual_model`). With the 1000-step DDPM sampler, k even is t odd, so θ1 handles odd t
and θ2 even t, as in the official DualMD code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from raymia.diffusion.model import to_data_range

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unet_eps(unet: nn.Module) -> EpsFn:
    """The ε-function of a diffusers ``UNet2DModel``."""
    return lambda x, t: unet(x, t).sample


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, s: int, abar: torch.Tensor, *,
              clip_x0: bool = False) -> torch.Tensor:
    """Deterministic DDIM (η = 0) move from step t to step s (either direction): predict
    x̂0 = (x_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t), then x_s = sqrt(ᾱ_s) x̂0 + sqrt(1-ᾱ_s) ε̂. ``s = -1`` means x̂0 itself."""
    x0 = (x_t - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    if s < 0:
        return x0
    return abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps


def _timesteps(sampler: str, steps: int, n_train: int) -> np.ndarray:
    if sampler == "ddpm":
        return np.arange(n_train - 1, -1, -1)
    return np.linspace(n_train - 1, 0, steps).round().astype(int)


@torch.no_grad()
def sample(eps_fns: Sequence[EpsFn], betas: torch.Tensor, n: int, shape: tuple[int, ...], *,
           sampler: Literal["ddpm", "ddim"] = "ddim", steps: int = 100, seed: int = 0,
           device: torch.device | str = "cpu", batch: int = 512,
           on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``n`` images ``[n, C, H, W]`` in [0, 1] from pure noise.

    ``ddpm``: ancestral sampling over all T steps with the "fixedlarge" variance σ_t² = β_t (no noise at t = 0);
    ``ddim``: ``steps`` evenly spaced deterministic DDIM steps with x̂0 clipped to [-1, 1].
    ``on_step(k, model_index)`` is told which ε-function serves reverse step k.
    """
    device = torch.device(device)
    betas = betas.to(device, torch.float32)
    abar = torch.cumprod(1 - betas, 0)
    ts = _timesteps(sampler, steps, len(betas))
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        x = torch.randn((m, *shape), generator=gen, device=device)
        for k, t in enumerate(ts):
            which = k % len(eps_fns)
            if on_step is not None and start == 0:
                on_step(k, which)
            eps = eps_fns[which](x, torch.full((m,), int(t), device=device))
            if sampler == "ddpm":
                mean = (x - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
                x = mean + betas[t].sqrt() * torch.randn(x.shape, generator=gen, device=device) if t > 0 else mean
            else:
                x = ddim_step(x, eps, int(t), int(ts[k + 1]) if k + 1 < len(ts) else -1, abar, clip_x0=True)
        out.append(to_data_range(x).cpu())
    return torch.cat(out)
