"""CIFAR-scale reference pool on a GPU: K ResNet-class models through the platform's own Ray Tune fan-out.

    .venv/bin/python benchmarks/cifar_pool.py --data-root /data/cifar      # real CIFAR-10: accuracy + speed
    .venv/bin/python benchmarks/cifar_pool.py                              # CIFAR-shaped random tensors: speed only

Each model trains on a random half of the 50k CIFAR-10 training images (LiRA's layout) with flips and crops
done on the GPU (data resident on the device, no DataLoader), bf16 autocast, SGD + cosine; fractional GPUs let
several trials share the card. Prints the card, models/minute, training images/s and, with real data, the mean
test accuracy. Target (issue #3): 64 ResNet-18s in under 10 minutes on one H100 at >= 88 % test accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=None, help="folder holding cifar-10-batches-py/ (else random tensors)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--gpus-per-trial", type=float, default=0.25)
    p.add_argument("--n-train", type=int, default=50_000, help="size of the pool the halves are drawn from")
    args = p.parse_args()
    from raymia.quiet import quiet_defaults

    quiet_defaults()
    import torch

    from raymia.cache import ModelCache
    from raymia.config import parse_config
    from raymia.data.datasets import load_dataset, make_dataset
    from raymia.machine import describe_machine
    from raymia.orchestration.fanout import produce_on_ray
    from raymia.orchestration.session import RaySession
    from raymia.pipeline.factory import load_signals
    from raymia.pipeline.plan import plan_audit

    if args.data_root:
        dataset, real = load_dataset("cifar10", data_root=args.data_root), True
    else:
        rng = np.random.default_rng(0)
        n = args.n_train + 10_000
        dataset = make_dataset("cifar-shaped-random", rng.random((n, 3, 32, 32), dtype=np.float32),
                               rng.integers(0, 10, n), num_classes=10)
        real = False
    n_pool = min(args.n_train, 50_000)
    frac = {"target_members": n_pool / 2 / len(dataset), "target_nonmembers": n_pool / 2 / len(dataset),
            "population": 1e-3, "calibration": 0.0, "test": (len(dataset) - n_pool) / len(dataset) - 2e-3}
    gpu = torch.cuda.is_available()
    cfg = parse_config({
        "name": "cifar-pool", "split": frac,
        "targets": [{"name": args.arch, "model": {"arch": args.arch, "params": {"width": args.width} if args.arch == "resnet18" else {}},
                     "train": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "sgd", "lr": args.lr,
                               "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine", "augment": "flip_crop",
                               "precision": "bf16" if gpu else "fp32"}}],
        "reference": {"count": args.k, "models_per_trial": max(1, args.k // 4)},
        "attacks": {"label_only": {"kind": "noise", "noise_views": 1}},
        "compute": {"gpus_per_trial": args.gpus_per_trial if gpu else None}, "cache": {"reuse": False},
    })
    plan = plan_audit(cfg, dataset)
    jobs = [j for j in plan.jobs if j.role == "reference"]
    session = RaySession(cfg, {}, lambda s: print(s, flush=True))
    try:
        with tempfile.TemporaryDirectory() as d:
            cache = ModelCache(f"{d}/cache")
            start = time.perf_counter()
            produce_on_ray(plan, jobs, cache, session, experiment_name="cifar-pool", builders={},
                           echo=lambda s: print(s, flush=True))
            seconds = time.perf_counter() - start
            signals, _ = load_signals(jobs, plan, cache)
    finally:
        session.close()
    test = np.isin(plan.scored_indices, plan.split["test"])
    accs = [float((signals[j.job_id].logits[test, 0].argmax(1) == dataset.y[plan.scored_indices[test]]).mean())
            for j in jobs]
    images = sum(len(j.train_indices) for j in jobs) * args.epochs
    print(f"machine: {describe_machine()}")
    print(f"data: {'CIFAR-10 from ' + args.data_root if real else 'random CIFAR-shaped tensors (no dataset on this machine): speed only'}")
    arch = f"{args.arch} (width {args.width})" if args.arch == "resnet18" else args.arch
    print(f"{args.k} x {arch}, {args.epochs} epochs on {n_pool // 2} images each, batch "
          f"{args.batch_size}, {cfg.targets[0].train.precision}, {args.gpus_per_trial if gpu else 0} GPU per trial")
    print(f"  {seconds:.1f} s total, {60 * args.k / seconds:.1f} models/min, {images / seconds:,.0f} training images/s")
    if real:
        print(f"  test accuracy: mean {np.mean(accs):.4f}, min {np.min(accs):.4f}")


if __name__ == "__main__":
    main()
