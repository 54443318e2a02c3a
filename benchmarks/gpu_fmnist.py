"""Fashion-MNIST at GPU scale in one go (issue 15, item 5), for a lent GPU machine that has no Ray or MLflow.

(a) the 256 CNN reference models of configs/fmnist-gpu.yaml (10,500 training rows each, 15 epochs, batch 256,
    bf16 autocast) trained through raymia's Ray-free factory (``raymia.pipeline.factory.train_models`` on the jobs
    of ``raymia.pipeline.plan.plan_audit``, one call per fixed training group: vmapped on a GPU, data on the device),
    after a short warm-up of one group; then every model's accuracy on the plan's test rows. Printed: wall time,
    models/minute, mean/min test accuracy, and floor/time: the counted training FLOPs
    (``raymia.pipeline.cost.forward_macs`` / ``job_flops``) at the dense matmul rate measured in this run in the
    training precision. Beside it a few models through the plain sequential loop of benchmarks/reference_pool.py
    (a careful user's loop, tensor slices on the device, fp32/TF32) for the ratio. Targets: under 60 s on one H200,
    every model >= 87 % test accuracy.
(b) DIFFENCE at N = 30 through benchmarks/diffence.py's ``measure``: the ``tiny`` UNet at 1x28x28 (Fashion-MNIST,
    MLP 784-256-10 as configs/diffence-fmnist.yaml defends) and the CIFAR-size ``ddpm_cifar`` UNet at 3x32x32 with
    ResNet-18, with the GPU defaults (bf16 UNet, torch.compile). Target: <= 1.0 ms per sample at N = 30.

Every part writes its numbers to ``$OUT/gpu_fmnist.json`` (``$OUT`` unset: ./gpu_results) as soon as it ends, so
a run cut short still returns what it measured; a part that fails records its error and the next one runs.

On the GPU machine (wheels and data prepared here by ``bash benchmarks/gpu_prepare.sh``; docs/performance.md,
"GPU scripts, prepared", has the one command); on a CPU, at a small size (seconds):

    .venv/bin/python benchmarks/gpu_fmnist.py --small
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import diffence
import reference_pool

ROOT = Path(__file__).resolve().parent.parent
CARRIED_DATA = ROOT / ".gpu_data" / "fashion-mnist"   # where benchmarks/gpu_prepare.sh puts the four files
NOT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "opacus")  # raymia must not need them for this recipe


def out_dir() -> Path:
    out = Path(os.environ.get("OUT") or "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(results: dict) -> None:
    results["not_on_gpu_machine_imported"] = sorted(m for m in NOT_ON_THE_GPU_MACHINE if m in sys.modules)
    path = out_dir() / "gpu_fmnist.json"
    path.write_text(json.dumps(results, indent=1))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def train_part(args: argparse.Namespace, device) -> dict:
    """(a): the reference pool through the factory, group by group, then test accuracy; and the peer's loop."""
    import numpy as np
    import torch

    from raymia.config import load_config
    from raymia.data.datasets import FASHION_MNIST_ROOT, load_dataset
    from raymia.pipeline.cost import forward_macs, job_flops
    from raymia.pipeline.factory import train_models
    from raymia.pipeline.plan import plan_audit
    from raymia.training.loop import predict_logits

    overrides = [f"reference.{k}={v}" for k, v in (("count", args.k), ("group_size", args.group_size)) if v]
    overrides += [f"targets.0.train.{k}={v}" for k, v in (("epochs", args.epochs), ("precision", args.precision)) if v]
    cfg = load_config(ROOT / args.config, overrides)
    root = args.data_root or (FASHION_MNIST_ROOT if FASHION_MNIST_ROOT.is_dir() else CARRIED_DATA)
    start = time.perf_counter()
    dataset = load_dataset("fashion_mnist", data_root=root, params={"subset": args.subset} if args.subset else {})
    plan = plan_audit(cfg, dataset)
    load_s = time.perf_counter() - start
    recipe = cfg.targets[0].train
    jobs = [j for j in plan.jobs if j.role == "reference"]
    groups = sorted({j.group for j in jobs})
    macs = forward_macs(jobs[0].build(dataset), dataset.input_shape)
    rate = diffence.matmul_rate(device, torch.bfloat16 if recipe.precision == "bf16" else torch.float32,
                                args.rate_seconds)
    n_train = len(jobs[0].train_indices)
    print(f"(a) {len(jobs)} {dataset.name} {cfg.targets[0].model.arch} reference models ({macs / 1e6:.2f} M MACs per "
          f"sample), {n_train} rows each, {recipe.epochs} epochs, batch {recipe.batch_size}, {recipe.precision}, "
          f"{len(groups)} groups (group_size {cfg.reference.group_size}), strategy {args.strategy}; "
          f"data + plan {load_s:.1f} s", flush=True)

    first = [j for j in jobs if j.group == groups[0]]
    start = time.perf_counter()  # warm-up: kernels, cuDNN's algorithm search, allocator; the same group shapes
    train_models([dataclasses.replace(j, train_indices=j.train_indices[:2 * recipe.batch_size]) for j in first],
                 dataset, strategy=args.strategy, device=device)
    sync(device)
    warmup_s = time.perf_counter() - start

    models, vmapped, per_group, flops = {}, 0, [], 0.0
    start = time.perf_counter()
    for g in groups:
        group = [j for j in jobs if j.group == g]
        t = time.perf_counter()
        trained, n_vmapped, _ = train_models(group, dataset, strategy=args.strategy, device=device)
        sync(device)
        per_group.append(time.perf_counter() - t)
        models.update(trained)
        vmapped += n_vmapped
        flops += sum(job_flops(j, plan, macs)[1] for j in group)
        elapsed = time.perf_counter() - start
        if g != groups[-1] and elapsed + elapsed / len(per_group) > args.max_train_s:
            print(f"    stopping after {len(models)} models: the next group would pass --max-train-s "
                  f"{args.max_train_s:.0f}", flush=True)
            break
    wall = time.perf_counter() - start

    test = np.asarray(plan.split["test"])
    x_test = torch.from_numpy(dataset.x[test]).to(device)
    y_test = dataset.y[test]
    accs = [float((predict_logits(models[j.job_id], x_test, device=device, batch_size=4096).argmax(1) == y_test).mean())
            for j in jobs if j.job_id in models]
    floor = flops / rate
    out = {
        "config": args.config, "dataset": dataset.name, "arch": cfg.targets[0].model.arch,
        "model_params": cfg.targets[0].model.params, "models_planned": len(jobs), "models_trained": len(models),
        "partial": len(models) < len(jobs), "vmapped": vmapped, "strategy": args.strategy,
        "group_size": cfg.reference.group_size, "groups": len(per_group), "epochs": recipe.epochs,
        "batch_size": recipe.batch_size, "lr": recipe.lr, "precision": recipe.precision, "rows_per_model": n_train,
        "macs_per_sample": macs, "train_flops": flops, "matmul_flops_per_s": rate, "data_and_plan_s": load_s,
        "warmup_s": warmup_s, "wall_s": wall, "per_group_s": per_group, "models_per_min": 60 * len(models) / wall,
        "floor_s": floor, "floor_over_time": floor / wall, "test_rows": len(test), "acc_mean": float(np.mean(accs)),
        "acc_min": float(np.min(accs)), "acc_max": float(np.max(accs)),
    }
    print(f"    factory: {wall:.1f} s, {out['models_per_min']:.1f} models/min ({vmapped} vmapped); test accuracy "
          f"mean {out['acc_mean']:.4f}, min {out['acc_min']:.4f} on {len(test)} rows; {flops / 1e12:.2f} TFLOP, "
          f"floor {floor:.2f} s at {rate / 1e12:.1f} TFLOP/s {recipe.precision}, floor/time {floor / wall:.3f}",
          flush=True)

    if args.peer:
        x, y = torch.from_numpy(dataset.x).to(device), torch.from_numpy(dataset.y).to(device)
        peer = jobs[:args.peer]

        def build(seed: int):
            return peer[0].build(dataset, seed=seed).to(device)

        t = time.perf_counter()
        reference_pool.peer_loop(build, x, y, [torch.as_tensor(j.train_indices, device=device) for j in peer],
                                 [j.seed for j in peer], epochs=recipe.epochs, batch_size=recipe.batch_size,
                                 lr=recipe.lr, dataloader=False)
        sync(device)
        peer_s = time.perf_counter() - t
        out["peer_loop"] = {"models": len(peer), "wall_s": peer_s, "models_per_min": 60 * len(peer) / peer_s,
                            "precision": "fp32 (TF32 on a GPU)"}
        out["factory_over_peer"] = out["models_per_min"] / out["peer_loop"]["models_per_min"]
        print(f"    plain sequential loop (benchmarks/reference_pool.py peer_loop, tensor slices, fp32): {len(peer)} "
              f"models in {peer_s:.1f} s, {out['peer_loop']['models_per_min']:.1f} models/min; factory "
              f"x{out['factory_over_peer']:.1f}", flush=True)
    return out


def diffence_part(name: str, preset: str, shape: tuple[int, ...], batches: list[int], args, device) -> dict:
    """(b): one UNet through diffence.measure, with the GPU defaults (bf16, compiled) on a GPU; eager if compiling
    fails (recorded)."""
    gpu = device.type == "cuda"
    kwargs = dict(ns=args.ns, batches=batches, precision="bf16" if gpu else "fp32", repeats=args.repeats,
                  rate_seconds=args.rate_seconds, echo=lambda s: print("    " + s, flush=True))
    print(f"(b) DIFFENCE, {name}", flush=True)
    try:
        return diffence.measure(preset, shape, compile=gpu and not args.no_compile, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a compiler failure on a strange machine must not cost the numbers
        if not gpu or args.no_compile:
            raise
        print(f"    torch.compile failed ({type(exc).__name__}: {exc}); again eager", flush=True)
        return {**diffence.measure(preset, shape, compile=False, **kwargs), "compile_error": repr(exc)[:500]}


def summary(results: dict) -> str:
    lines = [f"card: {results['card']}", f"machine: {results['machine']}"]
    t = results.get("train")
    if t and "error" not in t:
        lines.append(f"(a) {t['models_trained']}/{t['models_planned']} {t['arch']} reference models, {t['epochs']} "
                     f"epochs x {t['rows_per_model']} rows, {t['precision']}: {t['wall_s']:.1f} s, "
                     f"{t['models_per_min']:.1f} models/min, test acc mean {t['acc_mean']:.4f} min {t['acc_min']:.4f}, "
                     f"floor/time {t['floor_over_time']:.3f}"
                     + (f", x{t['factory_over_peer']:.1f} the sequential loop" if "factory_over_peer" in t else ""))
    elif t:
        lines.append(f"(a) failed: {t['error']}")
    lines.append(f"(b) DIFFENCE    {'shape':>8} {'N':>3} {'batch':>5} {'ms/sample':>10} {'floor ms':>9} {'floor/time':>10}")
    for name, d in results.get("diffence", {}).items():
        if "error" in d:
            lines.append(f"    {name:<11} failed: {d['error']}")
            continue
        for r in d["rows"]:
            lines.append(f"    {name:<11} {'x'.join(map(str, d['shape'])):>8} {r['n']:>3} {r['batch']:>5} "
                         f"{r['ms_per_sample']:>10.3f} {r['floor_ms_per_sample']:>9.4f} {r['floor_over_time']:>10.3f}")
    for k, v in results.get("targets", {}).items():
        lines.append(f"target {k}: {'met' if v else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="a CPU smoke run: few models, 1 epoch, a data slice, small N")
    p.add_argument("--config", default="configs/fmnist-gpu.yaml")
    p.add_argument("--data-root", default=None, help="folder with the four Fashion-MNIST .gz files (default: "
                   "Debian's /usr/share/datasets/fashion-mnist, else .gpu_data/fashion-mnist)")
    p.add_argument("--subset", type=int, default=None, help="use N of the 70,000 images")
    p.add_argument("--k", type=int, default=None, help="reference models (default: the config's)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="training (default: the config's; "
                   "fp32 on a CPU)")
    p.add_argument("--strategy", default="auto", choices=["auto", "vmap", "loop"])
    p.add_argument("--peer", type=int, default=4, help="models through the plain sequential loop (0: skip)")
    p.add_argument("--max-train-s", type=float, default=300.0, help="stop training after the group that passes this")
    p.add_argument("--ns", type=int, nargs="+", default=[30])
    p.add_argument("--tiny-batches", type=int, nargs="+", default=[64, 512])
    p.add_argument("--cifar-batches", type=int, nargs="+", default=[64, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--rate-seconds", type=float, default=1.0, help="how long to time the dense matmul rate")
    p.add_argument("--parts", default="train,tiny,cifar", help="comma-separated: train, tiny, cifar")
    args = p.parse_args()
    if args.small:
        args.k, args.group_size, args.epochs, args.subset = args.k or 4, args.group_size or 2, args.epochs or 1, \
            args.subset or 2000
        args.peer, args.ns, args.tiny_batches, args.cifar_batches = 1, [1], [2], [1]
        args.repeats, args.rate_seconds, args.strategy = 1, 0.2, "vmap"  # vmap: the GPU's path, also on a CPU

    import torch

    from raymia.machine import describe_machine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # as they pay on a GPU: cuDNN picks its fastest kernels, fp32 matmuls use TF32
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif args.precision is None:
        args.precision = "fp32"  # bf16 autocast on a CPU without bf16 units is slower, not faster
    torch.manual_seed(0)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "no GPU (CPU)"
    print(f"card: {card}\nmachine: {describe_machine()}", flush=True)
    results: dict = {"card": card, "machine": describe_machine(), "torch": torch.__version__,
                     "python": sys.version.split()[0], "small": args.small, "device": device.type,
                     "settings": {"cudnn_benchmark": device.type == "cuda", "tf32": device.type == "cuda"},
                     "args": vars(args), "diffence": {}, "targets": {}}
    parts = set(args.parts.split(","))
    start = time.perf_counter()
    if "train" in parts:
        try:
            results["train"] = train_part(args, device)
            results["targets"]["(a) 256 models under 60 s"] = (results["train"]["models_trained"] >= 256
                                                               and results["train"]["wall_s"] < 60)
            results["targets"]["(a) every model >= 87 % test accuracy"] = results["train"]["acc_min"] >= 0.87
        except Exception as exc:  # noqa: BLE001 - record and go on to (b)
            import traceback

            traceback.print_exc()
            results["train"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        save(results)
    for key, name, preset, shape, batches in [("tiny", "tiny_1x28x28", "tiny", (1, 28, 28), args.tiny_batches),
                                              ("cifar", "ddpm_cifar", "ddpm_cifar", (3, 32, 32), args.cifar_batches)]:
        if key not in parts:
            continue
        try:
            d = results["diffence"][name] = diffence_part(name, preset, shape, batches, args, device)
            results["targets"][f"(b) {name} <= 1.0 ms/sample at N = 30"] = (
                30 in args.ns and min(r["ms_per_sample"] for r in d["rows"] if r["n"] == 30) <= 1.0)
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            results["diffence"][name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        save(results)
    for mod in ("pydantic", "diffusers"):
        if mod in sys.modules:
            m = sys.modules[mod]
            results.setdefault("carried", {})[mod] = {"version": getattr(m, "__version__", getattr(m, "VERSION", "?")),
                                                      "from": str(Path(m.__file__).parent.parent)}
    results["total_s"] = time.perf_counter() - start
    save(results)
    text = summary(results)
    (out_dir() / "gpu_fmnist.txt").write_text(text + "\n")
    print("\n" + text + f"\n(total {results['total_s']:.0f} s; numbers in {out_dir() / 'gpu_fmnist.json'})")


if __name__ == "__main__":
    main()
