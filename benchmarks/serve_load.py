"""Closed-loop HTTP load against the Serve deployment on 127.0.0.1: batched vs unbatched.

    .venv/bin/python benchmarks/serve_load.py [--requests 300 1000 2000] [--n 8]

Registers a small digits champion with DIFFENCE (a tiny audit in a temporary MLflow store), deploys it with
``serve/config.yaml`` (one replica, batching on, then off), and for concurrency 1, 16 and 64 keeps exactly that
many requests in flight (each client sends its next request when the previous answer arrives; one digits image
per request). Prints throughput, p50 / p99 latency and errors per level, and the batched / unbatched throughput
ratio at concurrency 64. The load generator (asyncio + aiohttp) shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PORT = 18777


async def _level(url: str, bodies: list[bytes], concurrency: int, total: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            try:
                async with session.post(url, data=bodies[i % len(bodies)],
                                        headers={"content-type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        start = time.perf_counter()
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.asarray(latencies)
    return {"rps": total / wall, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "errors": errors, "n": total}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, nargs=3, default=[300, 1000, 2000], metavar=("C1", "C16", "C64"))
    p.add_argument("--n", type=int, default=8, help="DIFFENCE candidates per query")
    args = p.parse_args()
    import ray
    import yaml
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from raymia.audit import run_audit
    from raymia.config import parse_config
    from raymia.data.datasets import load_dataset
    from raymia.machine import describe_machine
    from raymia.quiet import quiet_defaults

    quiet_defaults()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    digits = load_dataset("digits")
    bodies = [json.dumps({"inputs": [digits.x[i].reshape(-1).tolist()]}).encode() for i in range(200)]
    results = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            raw = {"name": "serve-bench", "data": {"dataset": "digits"},
                   "split": {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.27,
                             "calibration": 0.05, "calibration_members": 0.08, "test": 0.10},
                   "targets": [{"name": "mlp", "model": {"params": {"hidden": [256]}},
                                "train": {"epochs": 60, "batch_size": 32, "lr": 0.002}}],
                   "reference": {"count": 2}, "attacks": {"enabled": ["loss"]},
                   "diffence": {"n": args.n, "scenario": 1, "train": {"steps": 300}},
                   "frontier": {"leakage": "auc"},
                   "champion": {"rule": "min_leakage", "max_accuracy_drop": 0.5, "registry_name": "bench"},
                   "tracking": {"uri": f"sqlite:///{d}/mlflow.db", "experiment": "bench"}, "output_dir": f"{d}/runs"}
            outcome = run_audit(parse_config(raw), echo=lambda s: None)
            serve.start(http_options={"host": "127.0.0.1", "port": PORT})
            for batching in (True, False):
                cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
                cfg["http_options"]["port"] = PORT
                app = cfg["applications"][0]
                app["args"].update(model_uri="models:/bench@champion", tracking_uri=outcome.tracking_uri,
                                   batching=batching)
                dep = app["deployments"][0]
                dep["autoscaling_config"].update(min_replicas=1, max_replicas=1, initial_replicas=1)
                dep["user_config"]["n"] = args.n
                _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=True)
                url = f"http://127.0.0.1:{PORT}/v1/predict"
                asyncio.run(_level(url, bodies, 4, 40))  # warm-up
                for conc, total in zip((1, 16, 64), args.requests):
                    results[(batching, conc)] = asyncio.run(_level(url, bodies, conc, total))
                serve.delete("raymia")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"machine: {describe_machine()}")
    print(f"digits MLP behind DIFFENCE (N = {args.n}, tiny UNet), one replica, one image per request")
    print(f"{'mode':<10}{'conc':>5}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for (batching, conc), r in results.items():
        print(f"{'batched' if batching else 'unbatched':<10}{conc:>5}{r['n']:>9}{r['rps']:>9.1f}{r['p50'] * 1e3:>9.1f}"
              f"{r['p99'] * 1e3:>9.1f}{r['errors']:>8}")
    total = sum(r["n"] for r in results.values())
    errors = sum(r["errors"] for r in results.values())
    print(f"batched / unbatched throughput at concurrency 64: "
          f"{results[(True, 64)]['rps'] / results[(False, 64)]['rps']:.1f}x; {total} requests, {errors} errors")


if __name__ == "__main__":
    main()
