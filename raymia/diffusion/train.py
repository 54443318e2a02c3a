"""Train an ε-prediction diffusion model with EMA (the recipe of Ho et al. / pytorch-ddpm, scaled by config).

Each step: draw t ~ U{0..T-1} and noise ε, form x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, minimise
||target - ε_θ(x_t, t)||². The target is ε itself unless ``target_fn`` supplies another (DistillMD trains a
student against a teacher's ε prediction this way). Adam, linear warm-up, gradient clipping, optional
horizontal flips; data stays on the device. Returns the EMA weights' model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from raymia.diffusion.model import to_model_range

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel


class DiffusionRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    hflip: bool = False
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast the UNet's forward pass "
                                               "(weights, optimizer and EMA stay fp32)")


TargetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train_diffusion(unet: UNet2DModel, scheduler: DDPMScheduler, x01: torch.Tensor, recipe: DiffusionRecipe, *,
                    seed: int, device: torch.device | str = "cpu", target_fn: TargetFn | None = None,
                    batch_rows: Callable[[int, torch.Generator], torch.Tensor] | None = None) -> UNet2DModel:
    """Train ``unet`` on images ``x01 [n, C, H, W]`` in [0, 1]; returns the EMA model (eval mode).

    ``batch_rows(step, gen)`` may choose each batch's rows (default: uniform with replacement over ``x01``);
    ``target_fn(x_t, t, noise, rows)`` may replace the regression target ε.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    noise_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)  # noise where used
    torch.manual_seed(seed)
    unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    data = to_model_range(x01.to(device))
    abar = scheduler.alphas_cumprod.to(device)
    opt = torch.optim.Adam(unet.parameters(), lr=recipe.lr, fused=device.type == "cuda")
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, recipe.warmup_steps)))
    n_t = len(abar)
    for step in range(recipe.steps):
        rows = (batch_rows(step, gen) if batch_rows else torch.randint(0, len(data), (recipe.batch_size,), generator=gen))
        rows = rows.to(device)
        x0 = data[rows]
        if recipe.hflip:
            flip = (torch.rand(len(rows), generator=gen) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, n_t, (len(rows),), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if target_fn is None else target_fn(x_t, t, noise, rows)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
            pred = unet(x_t, t).sample
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.grad_clip)
        opt.step()
        warm.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))  # EMA warm-up, as diffusers' EMAModel
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
    return ema
