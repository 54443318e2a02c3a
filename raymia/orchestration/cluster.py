"""Connect to Ray and size trial resource requests from what the cluster actually has."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from raymia.allocator import allocator_env
from raymia.config import ComputeConfig, RayConfig
from raymia.errors import UserError

#: GPU fraction per trial when the config leaves it open and the cluster has GPUs (small models share a card).
DEFAULT_GPU_FRACTION = 0.25


@dataclass(frozen=True)
class ClusterInfo:
    """How this audit reached Ray, and the cluster's total CPUs / GPUs."""

    address: str
    started_here: bool
    cpus: float
    gpus: float


def connect_ray(cfg: RayConfig) -> ClusterInfo:
    """Use the running Ray of this process, join ``RAY_ADDRESS`` / ``ray.address``, or start a local instance.

    Under ``ray job submit`` the supervisor sets ``RAY_ADDRESS``, so jobs join their cluster. Pair with
    :func:`release_ray`, which shuts down only an instance started here.
    """
    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or cfg.address
        kwargs = dict(log_to_driver=False, logging_level="warning")
        if address:  # a joined cluster keeps its own (and a job's) runtime env: see docs/cluster.md
            ray.init(address=address, **kwargs)
        else:  # workers of the instance started here get the allocator settings (raymia.allocator)
            env = allocator_env()
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
                     runtime_env={"env_vars": env} if env else None, **kwargs)
        started = True
    res = ray.cluster_resources()
    return ClusterInfo(address=ray.get_runtime_context().gcs_address, started_here=started,
                       cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)))


def release_ray(cluster: ClusterInfo) -> None:
    """Shut down the local Ray instance if :func:`connect_ray` started it; leave a joined cluster running."""
    if cluster.started_here and ray.is_initialized():
        ray.shutdown()


def trial_resources(compute: ComputeConfig, cluster: ClusterInfo) -> dict[str, float]:
    """The ``{"cpu": c, "gpu": g}`` request for one training trial, never asking for a GPU the cluster lacks."""
    if compute.cpus_per_trial > cluster.cpus:
        raise UserError(f"asks for {compute.cpus_per_trial:g} CPUs per trial but the Ray cluster has "
                        f"{cluster.cpus:g}; lower compute.cpus_per_trial", field="compute.cpus_per_trial")
    wants_gpu = compute.device == "cuda" or (compute.gpus_per_trial or 0) > 0
    if wants_gpu and cluster.gpus == 0:
        field = "compute.device" if compute.device == "cuda" else "compute.gpus_per_trial"
        raise UserError("GPUs were requested but the Ray cluster has none; use compute.device: auto (GPU when "
                        "present) or cpu, and leave compute.gpus_per_trial unset", field=field)
    if compute.gpus_per_trial is not None:
        gpu = compute.gpus_per_trial
        if gpu > cluster.gpus:
            raise UserError(f"asks for {gpu:g} GPUs per trial but the cluster has {cluster.gpus:g}",
                            field="compute.gpus_per_trial")
    elif compute.device == "cpu" or cluster.gpus == 0:
        gpu = 0.0
    else:
        gpu = DEFAULT_GPU_FRACTION
    return {"cpu": compute.cpus_per_trial, "gpu": gpu}
