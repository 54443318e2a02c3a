"""What every audit entry point does around its work: time phases, pick Tune's storage, hold a Ray connection."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from raymia.config import RunConfig
from raymia.orchestration.cluster import ClusterInfo, connect_ray, release_ray, trial_resources

@contextmanager
def phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to ``timings[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def storage_path(cfg: RunConfig) -> str:
    """Tune's storage: ``ray.storage_path`` (any pyarrow.fs URI), else ``<output_dir>/ray_results``."""
    return cfg.ray.storage_path or str(cfg.output_dir.expanduser().resolve() / "ray_results")


@contextmanager
def ray_session(cfg: RunConfig, timings: dict[str, float], say: Callable[[str], None],
                what: str) -> Iterator[tuple[ClusterInfo, dict[str, float]]]:
    """Connect to Ray for the duration of the block and size the per-trial request."""
    with phase(timings, "ray_start"):
        cluster = connect_ray(cfg.ray)
    try:
        resources = trial_resources(cfg.compute, cluster)
        say(f"Ray at {cluster.address} ({cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs); {what}; per trial {resources}")
        yield cluster, resources
    finally:
        with phase(timings, "ray_shutdown"):
            release_ray(cluster)
