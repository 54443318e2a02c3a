"""What every Ray-backed entry point does around its work: pick Tune's storage, hold a Ray connection."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from raymia.config import RunConfig
from raymia.orchestration.cluster import (
    ClusterInfo,
    connect_ray,
    release_ray,
    trial_resources,
)
from raymia.pipeline.recipe import phase


def storage_path(cfg: RunConfig) -> str:
    """Tune's storage: ``ray.storage_path`` (any pyarrow.fs URI), else ``<output_dir>/ray_results``."""
    return cfg.ray.storage_path or str(cfg.output_dir.expanduser().resolve() / "ray_results")


class RaySession:
    """A Ray connection made on first use (:meth:`connect`), so work the cache already holds never starts Ray."""

    def __init__(self, cfg: RunConfig, timings: dict[str, float], say: Callable[[str], None]):
        self.cfg, self.timings, self.say = cfg, timings, say
        self.cluster: ClusterInfo | None = None
        self.resources: dict[str, float] = {}

    def connect(self, what: str) -> tuple[ClusterInfo, dict[str, float]]:
        """The cluster and the per-trial request, connecting (and saying ``what`` runs) the first time."""
        if self.cluster is None:
            with phase(self.timings, "ray_start"):
                self.cluster = connect_ray(self.cfg.ray)
            self.resources = trial_resources(self.cfg.compute, self.cluster)
            c = self.cluster
            self.say(f"Ray at {c.address} ({c.cpus:g} CPUs, {c.gpus:g} GPUs); {what}; per trial {self.resources}")
        return self.cluster, self.resources

    def close(self) -> None:
        if self.cluster is not None:
            with phase(self.timings, "ray_shutdown"):
                release_ray(self.cluster)
            self.cluster = None


@contextmanager
def ray_session(cfg: RunConfig, timings: dict[str, float], say: Callable[[str], None]) -> Iterator[RaySession]:
    """A :class:`RaySession` for the block; an instance it started is shut down at the end."""
    session = RaySession(cfg, timings, say)
    try:
        yield session
    finally:
        session.close()
