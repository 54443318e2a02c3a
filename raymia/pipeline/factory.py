"""The reference-model factory: train a group of models fast, reuse cached ones, and produce their outputs.

Models that share an architecture, recipe and training-set size train together with ``vmap``
(:mod:`raymia.training.ensemble`) where that is faster, otherwise one after another with the one training loop.
Finished weights and outputs go to the :class:`~raymia.cache.ModelCache`, which is also how results travel
from Ray workers back to the driver.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from raymia.cache import ModelCache
from raymia.data.datasets import Dataset
from raymia.data.queries import LabelOnlyConfig
from raymia.models.classifiers import build_model
from raymia.pipeline.jobs import TrainJob
from raymia.signals import compute_signals
from raymia.training.ensemble import prefers_vmap, train_ensemble
from raymia.training.loop import train_classifier

Strategy = Literal["auto", "vmap", "loop"]


@dataclass
class FactoryStats:
    """What one call of :func:`produce_signals` did."""

    trained: list[str] = field(default_factory=list)
    vmapped: int = 0
    reused_models: int = 0
    reused_signals: int = 0
    seconds: float = 0.0


def _build(job: TrainJob, dataset: Dataset, builders: Mapping[str, Callable[..., nn.Module]]) -> nn.Module:
    return build_model(job.target.model, dataset.input_shape, dataset.num_classes, seed=job.seed,
                       builder=builders.get(job.target.model.arch))


def train_models(jobs: Sequence[TrainJob], dataset: Dataset, *, strategy: Strategy = "auto",
                 device: torch.device | str = "cpu", builders: Mapping[str, Callable[..., nn.Module]] | None = None,
                 ) -> tuple[dict[str, nn.Module], int]:
    """Train every job; returns the models by job id and how many were trained inside a ``vmap`` ensemble."""
    builders = builders or {}
    x, y = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
    groups: dict[tuple, list[TrainJob]] = defaultdict(list)
    for job in jobs:
        groups[(job.target.name, len(job.train_indices))].append(job)
    models: dict[str, nn.Module] = {}
    vmapped = 0
    for group in groups.values():
        built = [_build(j, dataset, builders) for j in group]
        use_vmap = len(group) > 1 and (strategy == "vmap" or (strategy == "auto" and prefers_vmap(built[0], None, device)))
        if use_vmap:
            train_ensemble(built, x, y, [j.train_indices for j in group], group[0].target.train,
                           [j.seed for j in group], device=device)
            vmapped += len(group)
        else:
            for job, model in zip(group, built):
                idx = torch.from_numpy(job.train_indices)
                train_classifier(model, x[idx], y[idx], job.target.train, seed=job.seed, device=device)
        models.update({j.job_id: m for j, m in zip(group, built)})
    return models, vmapped


def produce_signals(jobs: Sequence[TrainJob], dataset: Dataset, scored: np.ndarray, cache: ModelCache, *,
                    query_views: list[str], label_only: LabelOnlyConfig, views_id: str, reuse: bool = True,
                    strategy: Strategy = "auto", device: torch.device | str = "cpu",
                    builders: Mapping[str, Callable[..., nn.Module]] | None = None) -> FactoryStats:
    """Make sure the cache holds weights and outputs (on ``scored`` rows) of every job; train only what is missing.

    With ``reuse=False`` everything is retrained and overwritten (for benchmarks and forced refreshes).
    """
    start = time.perf_counter()
    builders = builders or {}
    stats = FactoryStats()
    need_outputs: list[TrainJob] = []
    for job in jobs:
        if reuse and cache.load_signals(job.key, views_id) is not None:
            stats.reused_signals += 1
        else:
            need_outputs.append(job)
    models: dict[str, nn.Module] = {}
    to_train: list[TrainJob] = []
    for job in need_outputs:
        state = cache.load_model(job.key) if reuse else None
        if state is None:
            to_train.append(job)
            continue
        model = _build(job, dataset, builders)
        model.load_state_dict(state)
        models[job.job_id] = model
        stats.reused_models += 1
    trained, stats.vmapped = train_models(to_train, dataset, strategy=strategy, device=device, builders=builders)
    for job in to_train:
        cache.save_model(job.key, trained[job.job_id].state_dict())
        stats.trained.append(job.job_id)
    models.update(trained)
    outputs = compute_signals([models[j.job_id] for j in need_outputs], dataset.x[scored], query_views, label_only,
                              device=device)
    for job, signals in zip(need_outputs, outputs):
        cache.save_signals(job.key, views_id, signals)
    stats.seconds = time.perf_counter() - start
    return stats
