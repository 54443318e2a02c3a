"""Closed-loop HTTP load on 127.0.0.1: the Ray Serve deployment against a plain FastAPI + uvicorn baseline, in
one run, on the same model, DIFFENCE knobs and request parsing (:mod:`raymia.inference`).

    .venv/bin/python benchmarks/serve_load.py [--requests 5000] [--concurrency 64] [--per-request 2] [--n 8]
                                              [--store DIR] [--set max_batch_size=32 ...]

Registers a small digits champion with DIFFENCE in ``--store`` (a tiny audit; reused when the store already holds
``models:/bench@champion``), then, one server at a time, keeps exactly ``--concurrency`` requests in flight (each
client sends its next request when the previous answer arrives), ``--per-request`` digits images per request:

- ``plain``: ``benchmarks/plain_server.py`` (one uvicorn process, no batching), JSON arrays;
- ``serve``: ``serve/config.yaml`` as shipped (batching, autoscaling 1-2 replicas), JSON arrays, then the compact
  ``tensor`` form; ``--set`` overrides the application's args (batch size and wait) for tuning.

Per level: requests/s, inputs/s, p50 / p99 latency, errors, and where a request's time went: the replica's
``Server-Timing`` stages (parse, queue for the batch, compute) and the rest of the client-observed latency (HTTP,
Serve's proxy and routing, the event loops). The load generator (asyncio + aiohttp) shares the cores with the
servers. Prints a table and writes the numbers as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SERVE_PORT, PLAIN_PORT = 18777, 18778
STAGES = ("receive", "parse", "queue", "compute", "total")


async def _level(url: str, bodies: list[bytes], concurrency: int, total: int) -> dict:
    import aiohttp

    latencies, timings, batches, errors = [], [], [], 0
    counter = iter(range(total))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            try:
                async with session.post(url, data=bodies[i % len(bodies)],
                                        headers={"content-type": "application/json"}) as r:
                    payload = await r.read()
                    if r.status != 200:
                        errors += 1
                    else:
                        batches.append(json.loads(payload)["batch_size"])
                    timing = r.headers.get("server-timing", "")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors, timing = errors + 1, ""
            latencies.append(time.perf_counter() - start)
            parts = dict(p.strip().split(";dur=") for p in timing.split(",") if ";dur=" in p)
            if parts:
                timings.append([float(parts[s]) for s in STAGES])

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        start = time.perf_counter()
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3
    t = np.asarray(timings).reshape(-1, len(STAGES))
    stages = {s: float(np.median(t[:, i])) for i, s in enumerate(STAGES)} if len(t) else {}
    if len(t):
        stages["outside the replica"] = float(np.median(lat[:len(t)] - t[:, -1]))
    return {"rps": total / wall, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "errors": errors, "n": total, "stages_ms_median": stages,
            "batch_inputs_median": float(np.median(batches)) if batches else 0.0}


def _champion(store: Path, n: int) -> str:
    """The tracking URI of a store holding models:/bench@champion (a tiny audit when it does not yet)."""
    uri = f"sqlite:///{store.resolve()}/mlflow.db"
    try:
        from raymia.registry import load_champion

        load_champion("models:/bench@champion", tracking_uri=uri)
        return uri
    except Exception:
        pass
    from raymia.audit import run_audit
    from raymia.config import parse_config

    raw = {"name": "serve-bench", "data": {"dataset": "digits"},
           "split": {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.27,
                     "calibration": 0.05, "calibration_members": 0.08, "test": 0.10},
           "targets": [{"name": "mlp", "model": {"params": {"hidden": [256]}},
                        "train": {"epochs": 60, "batch_size": 32, "lr": 0.002}}],
           "reference": {"count": 2}, "attacks": {"enabled": ["loss"]},
           "diffence": {"n": n, "scenario": 1, "train": {"steps": 300}},
           "frontier": {"leakage": "auc"},
           "champion": {"rule": "min_leakage", "max_accuracy_drop": 0.5, "registry_name": "bench"},
           "tracking": {"uri": uri, "experiment": "bench"}, "output_dir": str(store.resolve() / "runs")}
    return run_audit(parse_config(raw), echo=lambda s: None).tracking_uri


def _wait_up(url: str, proc: subprocess.Popen | None = None, limit_s: float = 300) -> None:
    import requests

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            if requests.get(url, timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up")


def _measure(name: str, url: str, forms: dict[str, list[bytes]], args) -> dict:
    out = {}
    for form, bodies in forms.items():
        asyncio.run(_level(url, bodies, 8, 200))  # warm-up
        for conc, total in ((1, 200), (args.concurrency, args.requests)):
            out[(name, form, conc)] = asyncio.run(_level(url, bodies, conc, total))
            print(f"  {name:<6}{form:<8}c={conc:<3} {out[(name, form, conc)]}", flush=True)
        if name == "serve":
            from ray import serve

            status = serve.status().applications["raymia"].deployments["DefendedClassifier"]
            print(f"  replicas: {status.replica_states}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=5000, help="requests at the high concurrency level")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--per-request", type=int, default=2, help="digits images per request")
    p.add_argument("--n", type=int, default=8, help="DIFFENCE candidates per query")
    p.add_argument("--store", type=Path, default=Path("/tmp/raymia-serve-bench"),
                   help="MLflow store holding (or to receive) the benchmark champion")
    p.add_argument("--set", action="append", default=[], metavar="ARG=VALUE", help="override an application arg")
    p.add_argument("--max-replicas", type=int, help="override the config's autoscaling max_replicas")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import ray
    import yaml
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from raymia.data.datasets import load_dataset
    from raymia.machine import describe_machine
    from raymia.quiet import quiet_defaults

    quiet_defaults()
    args.store.mkdir(parents=True, exist_ok=True)
    digits = load_dataset("digits")
    k = args.per_request
    groups = [digits.x[(k * i) % 1000:(k * i) % 1000 + k] for i in range(200)]
    forms = {"json": [json.dumps({"inputs": g.reshape(k, -1).tolist()}).encode() for g in groups],
             "tensor": [json.dumps({"tensor": {"data": base64.b64encode(g.astype("<f4").tobytes()).decode(),
                                               "shape": list(g.shape)}}).encode() for g in groups]}
    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    app = cfg["applications"][0]
    knobs = {**app["deployments"][0]["user_config"], "n": args.n}
    results: dict = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tracking_uri = _champion(args.store, args.n)
        if not args.skip_plain:  # the baseline first, while the Serve instance is not yet started
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # a Serve replica's 1 CPU
            plain = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "plain_server.py"),
                                      "--port", str(PLAIN_PORT), "--model-uri", "models:/bench@champion",
                                      "--tracking-uri", tracking_uri, "--knobs", json.dumps(knobs)], env=env)
            try:
                _wait_up(f"http://127.0.0.1:{PLAIN_PORT}/v1/model", plain)
                results |= _measure("plain", f"http://127.0.0.1:{PLAIN_PORT}/v1/predict", {"json": forms["json"]},
                                    args)
            finally:
                plain.terminate()
                plain.wait(30)
        serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
        cfg["http_options"]["port"] = SERVE_PORT
        app["args"].update(model_uri="models:/bench@champion", tracking_uri=tracking_uri)
        for item in args.set:
            key, value = item.split("=", 1)
            app["args"][key] = yaml.safe_load(value)
        app["deployments"][0]["user_config"] = knobs
        if args.max_replicas:
            app["deployments"][0]["autoscaling_config"]["max_replicas"] = args.max_replicas
        scaling = app["deployments"][0]["autoscaling_config"]
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=True)
        results |= _measure("serve", f"http://127.0.0.1:{SERVE_PORT}/v1/predict", forms, args)
        batching = {key: app["args"].get(key) for key in ("max_batch_size", "batch_wait_timeout_s")}
        serve.shutdown()
    finally:
        ray.shutdown()
    print(f"\nmachine: {describe_machine()}")
    print(f"digits MLP behind DIFFENCE (N = {args.n}, tiny UNet), {k} images per request; Serve: serve/config.yaml "
          f"(autoscaling {scaling['min_replicas']}-{scaling['max_replicas']} replicas, {batching}); plain: one uvicorn "
          "process")
    print(f"{'server':<7}{'form':<7}{'conc':>5}{'requests':>9}{'req/s':>8}{'inputs/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'errors':>7}{'batch':>6}   median ms: receive / parse / queue / compute / outside the replica")
    for (name, form, conc), r in results.items():
        s = r["stages_ms_median"]
        split = " / ".join(f"{s.get(x, float('nan')):.1f}" for x in (*STAGES[:-1], "outside the replica"))
        print(f"{name:<7}{form:<7}{conc:>5}{r['n']:>9}{r['rps']:>8.1f}{r['rps'] * k:>9.1f}{r['p50']:>8.1f}"
              f"{r['p99']:>8.1f}{r['errors']:>7}{r['batch_inputs_median']:>6.0f}   {split}")
    if args.out:
        args.out.write_text(json.dumps({"machine": describe_machine(), "n": args.n, "per_request": k,
                                        "batching": batching, "results": [
                                            {"server": a, "form": b, "concurrency": c, **r}
                                            for (a, b, c), r in results.items()]}, indent=1))


if __name__ == "__main__":
    main()
