"""DIFFENCE inference cost: per-sample overhead over the undefended classifier and the fraction of the FLOP floor.

    .venv/bin/python benchmarks/diffence.py [--preset tiny|ddpm_cifar] [--ns 1 8 30] [--batches 1 8 64]

For each N (candidates per query) and batch size B it times the full defended call — B·N regenerations through
the UNet in one batched call (chunked), B·(N+1) classifier passes, selection — after a warm-up, and prints
milliseconds per sample, the overhead over undefended inference, and the floor: FLOPs counted with
torch.utils.flop_counter (UNet + classifier) divided by this machine's dense matmul rate, measured in the
same run in the same precision (TF32 for fp32 on a GPU). ``floor / time`` is the achieved fraction of the floor
(1.0 = as fast as the matmul roofline).
Weights are random: cost does not depend on them.
"""

from __future__ import annotations

import argparse
import time


def matmul_rate(device, dtype, seconds: float = 1.0) -> float:
    """Dense matmul FLOP/s on ``device`` in ``dtype`` (2048² products on a CPU, 8192² on a GPU)."""
    import torch

    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = a @ b
        n += 1
    c.sum().item()
    return n * 2 * size ** 3 / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=["tiny", "ddpm_cifar"])
    p.add_argument("--ns", type=int, nargs="+", default=[1, 8, 30])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--chunk", default="auto", help="images per UNet call (auto: 512 on a CPU, 4096 on a GPU)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from raymia.defenses.diffence import Diffence, DiffenceConfig
    from raymia.diffusion.model import DiffusionSpec, build_unet, make_noise_schedule
    from raymia.machine import describe_machine
    from raymia.models.classifiers import ModelSpec, build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = DiffusionSpec(preset=args.preset)
    shape, clf_spec = ((1, 8, 8), ModelSpec(params={"hidden": [256]})) if args.preset == "tiny" else \
        ((3, 32, 32), ModelSpec(arch="resnet18"))
    unet = build_unet(spec, shape, seed=0)
    clf = build_model(clf_spec, shape, 10, seed=0)
    abar = make_noise_schedule(spec).alphas_cumprod

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        unet(torch.zeros(1, *shape), torch.tensor([160]))
    unet_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        clf(torch.zeros(1, *shape))
    clf_flops = fc.get_total_flops()
    if device.type == "cuda":  # fp32 on a GPU means TF32 tensor cores, for matmuls as cuDNN already does for convs
        torch.backends.cuda.matmul.allow_tf32 = True
    rate = matmul_rate(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    print(f"machine: {describe_machine()}")
    print(f"UNet ({args.preset}): {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
          f"{unet_flops / 1e6:.1f} MFLOP per image-step; classifier {clf_spec.arch}: {clf_flops / 1e6:.2f} MFLOP; "
          f"dense {args.precision} matmul: {rate / 1e9:.1f} GFLOP/s; precision {args.precision}, compile {args.compile}")
    print(f"{'N':>3} {'batch':>5} {'ms/sample':>10} {'undefended':>11} {'overhead':>9} {'floor ms':>9} {'floor/time':>10}")
    rng = np.random.default_rng(0)
    for n in args.ns:
        d = Diffence(clf, unet, abar, DiffenceConfig(
            n=n, scenario=3, precision=args.precision, compile=args.compile,
            chunk=args.chunk if args.chunk == "auto" else int(args.chunk)),
                     device=device)
        for b in args.batches:
            x = rng.random((b, *shape), dtype=np.float32)
            d(x, seed=0)  # warm-up (and compilation)
            sync()
            start = time.perf_counter()
            for r in range(args.repeats):
                d(x, seed=r)
            sync()
            per = (time.perf_counter() - start) / args.repeats / b
            xt = torch.from_numpy(x).to(device)
            with torch.no_grad():
                clf(xt)
                sync()
                start = time.perf_counter()
                for _ in range(args.repeats):
                    clf(xt)
                sync()
            plain = (time.perf_counter() - start) / args.repeats / b
            floor = (n * unet_flops + (n + 1) * clf_flops) / rate
            print(f"{n:>3} {b:>5} {per * 1e3:>10.2f} {plain * 1e3:>11.3f} {(per - plain) * 1e3:>9.2f} "
                  f"{floor * 1e3:>9.3f} {floor / per:>10.2f}")


if __name__ == "__main__":
    main()
