"""Reference-model factory throughput: K digits MLPs trained many-per-trial (vmap) vs one model per Tune trial.

    .venv/bin/python benchmarks/reference_pool.py [--k 64] [--epochs 30] [--hidden 128]

All arms run side by side on the same local Ray instance, through the same Tune fan-out and cache code, each
with a fresh cache (nothing reused), after a warm-up: the factory arm spreads the K models over the cluster's
trial slots and trains each group with torch.func vmap; the baselines run one Tune trial per model with a
plain loop, with Tune's defaults (a new trial process per model, as a plain ``tune.Tuner`` does) and with
``reuse_actors=True`` (the best one-model-per-trial can do). Prints models/minute and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args()
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
