"""Diffusion models (diffusers ``UNet2DModel`` + DDPM schedule): building, training with EMA, saving."""
