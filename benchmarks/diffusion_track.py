"""Cost of the diffusion-model track's pieces on this machine: DDPM training, white-box attacks, sampling.

    .venv/bin/python benchmarks/diffusion_track.py [--preset tiny|ddpm_cifar] [--steps 50]

Random images of the preset's size (8×8 grey for ``tiny``, 32×32 RGB for ``ddpm_cifar``); cost does not depend
on the data. Prints training images/s (batch 128, fp32, EMA), each attack's images/s at its default timestep,
and DualMD sampling images/s (DDIM, 100 steps, two alternating models).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=["tiny", "ddpm_cifar"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="training precision")
    args = p.parse_args()
    import torch

    from raymia.attacks.diffusion import DIFFUSION_ATTACKS, DiffusionAttackConfig, attack_scores
    from raymia.diffusion.model import DiffusionSpec, build_unet, make_noise_schedule
    from raymia.diffusion.sampling import sample, unet_eps
    from raymia.diffusion.train import DiffusionRecipe, train_diffusion
    from raymia.machine import describe_machine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = (1, 8, 8) if args.preset == "tiny" else (3, 32, 32)
    spec = DiffusionSpec(preset=args.preset)
    sched = make_noise_schedule(spec)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"machine: {describe_machine()}; preset {args.preset}, images {shape}")
    x = torch.rand(args.images, *shape)
    unet = build_unet(spec, shape, seed=0)
    recipe = DiffusionRecipe(steps=3, batch_size=128, precision=args.precision)
    train_diffusion(unet, sched, x, recipe, seed=0, device=device)  # warm-up
    sync()
    start = time.perf_counter()
    ema = train_diffusion(unet, sched, x, recipe.model_copy(update={"steps": args.steps}), seed=0, device=device)
    sync()
    print(f"training: {args.steps * 128 / (time.perf_counter() - start):.0f} images/s "
          f"(batch 128, {args.precision}, EMA)")
    eps = unet_eps(ema.to(device))
    abar = sched.alphas_cumprod.to(device)
    xm = (x * 2 - 1).to(device)
    cfg = DiffusionAttackConfig()
    for attack in DIFFUSION_ATTACKS:
        attack_scores(attack, eps, xm[:64], abar, cfg)
        sync()
        start = time.perf_counter()
        attack_scores(attack, eps, xm, abar, cfg)
        sync()
        print(f"{attack:<6} at t={cfg.default_t(attack)}: {len(xm) / (time.perf_counter() - start):.0f} images/s")
    start = time.perf_counter()
    sample([eps, eps], sched.betas, 256, shape, sampler="ddim", steps=100, device=device, batch=256)
    sync()
    print(f"DualMD DDIM-100 sampling: {256 / (time.perf_counter() - start):.1f} images/s")


if __name__ == "__main__":
    main()
