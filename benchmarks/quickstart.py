"""Time the quickstart audit end to end and by phase.

    .venv/bin/python benchmarks/quickstart.py [CONFIG] [--set key=value ...]

Runs the same code as ``make run`` (local Ray, Tune trials, all attacks, MLflow SQLite) but tracks into a
temporary directory, then prints the machine, the phase timings and the total wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from raymia.audit import run_audit
    from raymia.config import load_config
    from raymia.machine import describe_machine

    imported = time.perf_counter() - T0
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(args.config, [f"tracking.uri=sqlite:///{d}/mlflow.db", f"output_dir={d}/runs",
                                        *args.overrides])
        start = time.perf_counter()
        outcome = run_audit(cfg, echo=lambda line: None)
        audit = time.perf_counter() - start
    n_models = len(cfg.targets) * (1 + cfg.reference.count)
    print(f"machine: {describe_machine()}")
    print(f"config:  {args.config} ({len(cfg.targets)} targets, {cfg.reference.count} reference models each, {n_models} models, "
          f"attacks: {', '.join(cfg.attacks.enabled)})")
    print(f"{'imports':<14}{imported:7.1f} s")
    for phase, seconds in outcome.timings.items():
        print(f"{phase:<14}{seconds:7.1f} s")
    print(f"{'audit total':<14}{audit:7.1f} s")
    print(f"{'wall total':<14}{time.perf_counter() - T0:7.1f} s")
    print(outcome.summary())


if __name__ == "__main__":
    sys.exit(main())
