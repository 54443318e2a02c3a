"""DIFFENCE inference cost: per-sample overhead over the undefended classifier and the fraction of the FLOP floor.

    .venv/bin/python benchmarks/diffence.py [--preset tiny|ddpm_cifar] [--shape 1,28,28] [--ns 1 8 30] [--batches 1 8 64]

For each N (candidates per query) and batch size B it times the full defended call — B·N regenerations through
the UNet in one batched call (chunked), B·(N+1) classifier passes, selection — after a warm-up, and prints
milliseconds per sample, the overhead over undefended inference, and the floor: FLOPs counted with
torch.utils.flop_counter (UNet + classifier) divided by this machine's dense matmul rate, measured in the
same run in the same precision (TF32 for fp32 on a GPU). ``floor / time`` is the achieved fraction of the floor
(1.0 = as fast as the matmul roofline).
Shapes: ``tiny`` defaults to digits' 1x8x8 (MLP 64-256-10 classifier), ``ddpm_cifar`` to 3x32x32 (ResNet-18);
``--shape 1,28,28`` is Fashion-MNIST (the tiny UNet of configs/diffence-fmnist.yaml, MLP 784-256-10).
``--json PATH`` also writes the numbers. benchmarks/gpu_fmnist.py calls :func:`measure`.
Weights are random: cost does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence


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


def default_shape(preset: str) -> tuple[int, int, int]:
    return (1, 8, 8) if preset == "tiny" else (3, 32, 32)


def classifier_spec(name: str, shape: tuple[int, ...]):
    """The classifier DIFFENCE defends: ``auto`` is an MLP with one 256 hidden layer for grayscale images (digits,
    Fashion-MNIST: what configs/diffence-*.yaml defend), ResNet-18 for colour images."""
    from raymia.models.classifiers import ModelSpec

    if name == "auto":
        name = "mlp" if shape[0] == 1 else "resnet18"
    return ModelSpec(arch=name, params={"hidden": [256]} if name == "mlp" else {})


def measure(preset: str = "tiny", shape: Sequence[int] | None = None, *, classifier: str = "auto",
            ns: Sequence[int] = (1, 8, 30), batches: Sequence[int] = (1, 8, 64), precision: str = "fp32",
            compile: bool = False, chunk: str | int = "auto", repeats: int = 3, rate_seconds: float = 1.0,
            echo: Callable[[str], None] = print) -> dict:
    """Time DIFFENCE for every (N, batch) and return the numbers (also printed through ``echo``)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from raymia.defenses.diffence import Diffence, DiffenceConfig
    from raymia.diffusion.model import DiffusionSpec, build_unet, make_noise_schedule
    from raymia.machine import describe_machine
    from raymia.models.classifiers import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = DiffusionSpec(preset=preset)
    shape = tuple(shape or default_shape(preset))
    clf_spec = classifier_spec(classifier, shape)
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
    rate = matmul_rate(device, torch.bfloat16 if precision == "bf16" else torch.float32, rate_seconds)
    params = sum(p.numel() for p in unet.parameters())
    echo(f"machine: {describe_machine()}")
    echo(f"UNet ({preset}, {'x'.join(map(str, shape))}): {params / 1e6:.2f}M params, "
         f"{unet_flops / 1e6:.1f} MFLOP per image-step; classifier {clf_spec.arch}: {clf_flops / 1e6:.2f} MFLOP; "
         f"dense {precision} matmul: {rate / 1e9:.1f} GFLOP/s; precision {precision}, compile {compile}")
    echo(f"{'N':>3} {'batch':>5} {'ms/sample':>10} {'undefended':>11} {'overhead':>9} {'floor ms':>9} {'floor/time':>10}")
    rows = []
    rng = np.random.default_rng(0)
    for n in ns:
        d = Diffence(clf, unet, abar, DiffenceConfig(n=n, scenario=3, precision=precision, compile=compile,
                                                     chunk=chunk if chunk == "auto" else int(chunk)),
                     device=device)
        for b in batches:
            x = rng.random((b, *shape), dtype=np.float32)
            d(x, seed=0)  # warm-up (and compilation)
            sync()
            start = time.perf_counter()
            for r in range(repeats):
                d(x, seed=r)
            sync()
            per = (time.perf_counter() - start) / repeats / b
            xt = torch.from_numpy(x).to(device)
            with torch.no_grad():
                clf(xt)
                sync()
                start = time.perf_counter()
                for _ in range(repeats):
                    clf(xt)
                sync()
            plain = (time.perf_counter() - start) / repeats / b
            floor = (n * unet_flops + (n + 1) * clf_flops) / rate
            echo(f"{n:>3} {b:>5} {per * 1e3:>10.2f} {plain * 1e3:>11.3f} {(per - plain) * 1e3:>9.2f} "
                 f"{floor * 1e3:>9.3f} {floor / per:>10.2f}")
            rows.append({"n": n, "batch": b, "ms_per_sample": per * 1e3, "undefended_ms_per_sample": plain * 1e3,
                         "floor_ms_per_sample": floor * 1e3, "floor_over_time": floor / per})
    return {"preset": preset, "shape": list(shape), "classifier": clf_spec.arch, "unet_params": params,
            "unet_flops_per_image_step": unet_flops, "classifier_flops": clf_flops, "precision": precision,
            "compile": compile, "matmul_flops_per_s": rate, "device": str(device), "machine": describe_machine(),
            "repeats": repeats, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=["tiny", "ddpm_cifar"])
    p.add_argument("--shape", default=None, help="C,H,W of the images (default: 1,8,8 for tiny, 3,32,32 for ddpm_cifar)")
    p.add_argument("--classifier", default="auto", choices=["auto", "mlp", "cnn", "resnet18"])
    p.add_argument("--ns", type=int, nargs="+", default=[1, 8, 30])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--chunk", default="auto", help="images per UNet call (auto: 512 on a CPU, 4096 on a GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else None
    result = measure(args.preset, shape, classifier=args.classifier, ns=args.ns, batches=args.batches,
                     precision=args.precision, compile=args.compile, chunk=args.chunk, repeats=args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
