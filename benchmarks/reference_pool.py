"""Reference-model training throughput against the real alternatives, in one run.

    .venv/bin/python benchmarks/reference_pool.py                      # Fashion-MNIST MLPs: loop vs factory vs floor
    .venv/bin/python benchmarks/reference_pool.py --arch cnn --k 8     # the same for small CNNs
    .venv/bin/python benchmarks/reference_pool.py --mode tune          # digits: Tune fan-out arms (below)

``--mode local`` (default) trains the same K models of the same recipe on the same rows in each arm, one after
another in this process, and prints models/minute, the ratio to the peer's way and floor/time:

(a) **the peer's way**: a plain sequential PyTorch loop, one model after another, a ``DataLoader`` over a
    ``TensorDataset`` with ``shuffle=True`` and Adam — what ML Privacy Meter and LeakPro do, and what a user
    would write; also (a') the same loop slicing tensors instead of a DataLoader (a careful user);
(b) **raymia's factory** (``raymia.pipeline.factory.train_models``: fixed groups of ``reference.group_size``
    models, vmapped where that pays); also forced to a loop (b') and to vmap (b'') to show what its choice buys;
(c) **the FLOP floor**: counted training FLOPs (forward + backward = 3 x the forward's multiply-adds x 2) of all
    K models divided by the dense fp32 matmul rate measured in the same run on the same threads.

``--mode tune`` keeps the older comparison of Ray Tune fan-outs on digits: the factory (groups per trial) against
one model per Tune trial, with Tune's defaults and with ``reuse_actors=True``.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def matmul_rate(threads: int, seconds: float = 1.5) -> float:
    """Dense fp32 GFLOP/s of torch.mm at 1024x1024 on ``threads`` threads (best of repeated runs)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def forward_macs(model, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on one sample (Linear and Conv2d layers)."""
    import torch
    from torch import nn

    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Linear):
            macs += mod.in_features * mod.out_features
        elif isinstance(mod, nn.Conv2d):
            macs += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for h in handles:
        h.remove()
    return macs


def peer_loop(build, x, y, index_sets, seeds, *, epochs: int, batch_size: int, lr: float, dataloader: bool) -> None:
    """The sequential loop a peer or a user writes: one model after another."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    for rows, seed in zip(index_sets, seeds):
        torch.manual_seed(seed)
        model = build(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        xs, ys = x[rows], y[rows]
        loader = DataLoader(TensorDataset(xs, ys), batch_size=batch_size, shuffle=True) if dataloader else None
        model.train()
        for _ in range(epochs):
            batches = loader if dataloader else (
                (xs[b], ys[b]) for b in torch.randperm(len(rows)).split(batch_size))
            for xb, yb in batches:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()


def local_mode(args: argparse.Namespace) -> None:
    import torch

    from raymia.config import parse_config
    from raymia.data.datasets import load_dataset
    from raymia.machine import describe_machine
    from raymia.pipeline.factory import train_models
    from raymia.pipeline.plan import plan_audit

    threads = torch.get_num_threads()
    dataset = load_dataset(args.dataset, params={"subset": args.subset} if args.subset else {})
    model = ({"arch": "mlp", "params": {"hidden": [args.hidden]}} if args.arch == "mlp"
             else {"arch": "cnn", "params": {}})
    cfg = parse_config({
        "name": "bench", "data": {"dataset": args.dataset},
        "targets": [{"name": args.arch, "model": model,
                     "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}}],
        "split": {"target_members": 0.3, "target_nonmembers": 0.3, "population": 0.2, "calibration": 0.05,
                  "test": 0.1},
        "reference": {"count": args.k, "group_size": args.group_size}, "cache": {"reuse": False},
    })
    plan = plan_audit(cfg, dataset)
    jobs = [j for j in plan.jobs if j.role == "reference"]
    x, y = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
    sets = [torch.as_tensor(j.train_indices) for j in jobs]
    seeds = [j.seed for j in jobs]

    def build(seed: int):
        return jobs[0].build(dataset, seed=seed)

    n = len(jobs[0].train_indices)
    macs = forward_macs(build(0), dataset.input_shape)
    train_flops = 3 * 2 * macs * n * args.epochs * len(jobs)
    rate = matmul_rate(threads)
    arms = {}
    recipe = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    for name, run in [
        ("(a) peer loop, DataLoader", lambda: peer_loop(build, x, y, sets, seeds, dataloader=True, **recipe)),
        ("(a') plain loop, tensor slices", lambda: peer_loop(build, x, y, sets, seeds, dataloader=False, **recipe)),
        ("(b) raymia factory", lambda: train_models(jobs, plan.dataset)),
        ("(b') raymia factory, strategy loop", lambda: train_models(jobs, plan.dataset, strategy="loop")),
        ("(b'') raymia factory, strategy vmap", lambda: train_models(jobs, plan.dataset, strategy="vmap")),
    ]:
        start = time.perf_counter()
        out = run()
        arms[name] = (time.perf_counter() - start, out[1] if isinstance(out, tuple) else 0)
    floor = train_flops / (rate * 1e9)
    print(f"machine: {describe_machine()}, {threads} torch threads; dense fp32 matmul {rate:.0f} GFLOP/s (measured)")
    print(f"{len(jobs)} {args.dataset} {args.arch} models ({macs / 1e6:.3f} M MACs/sample), {n} training samples "
          f"each, {args.epochs} epochs, batch {args.batch_size}; {train_flops / 1e12:.2f} TFLOP in all; "
          f"floor {floor:.1f} s")
    base = arms["(a) peer loop, DataLoader"][0]
    for name, (seconds, vmapped) in arms.items():
        print(f"  {name:<36} {seconds:7.1f} s  {60 * len(jobs) / seconds:7.1f} models/min  "
              f"x{base / seconds:4.1f} vs (a)  floor/time {floor / seconds:4.2f}"
              + (f"  ({vmapped} vmapped)" if name.startswith("(b)") else ""))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["local", "tune"], default="local")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--subset", type=int, default=None, help="use the first N rows (quick checks)")
    p.add_argument("--arch", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args()
    if args.mode == "local":
        args.epochs = args.epochs or 10
        return local_mode(args)
    args.k, args.epochs = (64 if args.k == 16 else args.k), args.epochs or 30
    tune_mode(args)


def tune_mode(args: argparse.Namespace) -> None:
    from raymia.quiet import quiet_defaults

    quiet_defaults()
    from raymia.cache import ModelCache
    from raymia.config import parse_config
    from raymia.data.datasets import load_dataset
    from raymia.machine import describe_machine
    from raymia.orchestration.fanout import produce_on_ray
    from raymia.orchestration.session import RaySession
    from raymia.pipeline.plan import plan_audit

    dataset = load_dataset("digits")
    session = RaySession(parse_config({"targets": [{"name": "x"}]}), {}, lambda s: None)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as d:
            arms = [("warm-up", {"strategy": "auto"}, True, 4),
                    ("factory (groups per trial, vmap)", {"strategy": "auto"}, True, args.k),
                    ("one model per trial, Tune defaults", {"strategy": "loop", "models_per_trial": 1}, False, args.k),
                    ("one model per trial, reuse_actors", {"strategy": "loop", "models_per_trial": 1}, True, args.k)]
            for arm, overrides, reuse_actors, k in arms:
                cfg = parse_config({
                    "name": "bench", "targets": [{"name": "mlp", "model": {"params": {"hidden": [args.hidden]}},
                                                  "train": {"epochs": args.epochs, "batch_size": 64}}],
                    "reference": {"count": k, **overrides}, "cache": {"reuse": False},
                })
                plan = plan_audit(cfg, dataset)
                jobs = [j for j in plan.jobs if j.role == "reference"]
                start = time.perf_counter()
                done = produce_on_ray(plan, jobs, ModelCache(f"{d}/{len(rows)}"), session,
                                      experiment_name=f"bench-{len(rows)}", builders={}, reuse=False,
                                      reuse_actors=reuse_actors, echo=lambda s: None)
                seconds = time.perf_counter() - start
                rows.append((arm, done.trials, seconds, 60 * len(jobs) / seconds))
    finally:
        session.close()
    print(f"machine: {describe_machine()}")
    print(f"{args.k} digits MLPs (64-{args.hidden}-10, {args.epochs} epochs, batch 64, 898-sample pool halves); "
          f"each model: train + outputs on all scored samples")
    rows = rows[1:]  # drop the warm-up
    for arm, trials, seconds, rate in rows:
        print(f"  {arm:<36} {trials:>3} trials  {seconds:6.1f} s  {rate:7.0f} models/min")
    print(f"  factory / one-per-trial (Tune defaults): {rows[0][3] / rows[1][3]:.1f}x;  "
          f"factory / one-per-trial (reuse_actors): {rows[0][3] / rows[2][3]:.1f}x")


if __name__ == "__main__":
    main()
