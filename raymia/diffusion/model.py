"""A diffusers ``UNet2DModel`` sized to the data, and its linear-beta DDPM noise schedule.

Images enter diffusion models in [-1, 1] (``to_model_range``); datasets hold them in [0, 1].
Presets: ``tiny`` (two resolutions, 32/64 channels, no attention: digits-sized, trains in minutes on a CPU) and
``ddpm_cifar`` (the pytorch-ddpm CIFAR-10 network of Ho et al.: channels 128-256-256-256, two residual blocks
per resolution, attention at 16x16, dropout 0.1; 35.7M parameters — for GPUs). ``auto`` picks ``tiny`` below
16x16 pixels or with sides not divisible by 8 (28x28 Fashion-MNIST), ``ddpm_cifar`` otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from raymia.errors import UserError

if TYPE_CHECKING:  # diffusers takes seconds to import: only the functions that build models load it
    from diffusers import DDPMScheduler, UNet2DModel

    from raymia.cache import ModelCache


class DiffusionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["auto", "tiny", "ddpm_cifar"] = "auto"
    num_train_timesteps: int = Field(1000, ge=10)
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)

    def resolved(self, input_shape: tuple[int, ...]) -> str:
        if self.preset != "auto":
            return self.preset
        h, w = input_shape[1:]
        return "tiny" if min(h, w) < 16 or h % 8 or w % 8 else "ddpm_cifar"  # e.g. 28x28 Fashion-MNIST: tiny


def build_unet(spec: DiffusionSpec, input_shape: tuple[int, ...], *, seed: int | None = None) -> UNet2DModel:
    """An ε-prediction UNet for images ``[C, H, W]``."""
    if len(input_shape) != 3:
        raise UserError(f"diffusion models need image data [C, H, W]; got inputs of shape {input_shape}",
                        field="data.dataset")
    from diffusers import UNet2DModel

    c, h, w = input_shape
    if seed is not None:
        torch.manual_seed(seed)
    if spec.resolved(input_shape) == "tiny":
        if h % 2 or w % 2:
            raise UserError(f"the tiny UNet needs even image sides, got {h}x{w}", field="diffusion.model.preset")
        return UNet2DModel(sample_size=(h, w), in_channels=c, out_channels=c, block_out_channels=(32, 64),
                           layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    if h % 8 or w % 8:
        raise UserError(f"the ddpm_cifar UNet needs image sides divisible by 8, got {h}x{w}",
                        field="diffusion.model.preset")
    return UNet2DModel(sample_size=(h, w), in_channels=c, out_channels=c, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2, dropout=0.1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def load_cached_unet(cache: "ModelCache", key: str, spec: DiffusionSpec, input_shape: tuple[int, ...]
                     ) -> UNet2DModel | None:
    """The UNet stored under ``key`` (eval mode, on the CPU), or ``None`` if the cache does not hold it."""
    stored = cache.load_model(key)
    if stored is None:
        return None
    unet = build_unet(spec, input_shape)
    unet.load_state_dict(stored[0])
    return unet.eval()


def make_noise_schedule(spec: DiffusionSpec) -> DDPMScheduler:
    """Linear betas from ``beta_start`` to ``beta_end`` over ``num_train_timesteps`` (Ho et al. defaults)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule="linear",
                         beta_start=spec.beta_start, beta_end=spec.beta_end)


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2.0 - 1.0


def to_data_range(xm: torch.Tensor) -> torch.Tensor:
    return ((xm.clamp(-1.0, 1.0) + 1.0) / 2.0)
