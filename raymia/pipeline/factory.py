"""The reference-model factory: train a group of models fast, reuse cached ones, and produce their outputs.

Models that share an architecture, recipe, defense and training-set size train together with ``vmap``
(:mod:`raymia.training.ensemble`) where that is faster, otherwise one after another with the one training loop;
each model is trained with its target's defense (reference models too: the attacker is adaptive).
Finished weights and outputs go to the :class:`~raymia.cache.ModelCache`, which is also how results travel
from Ray workers back to the driver.
"""

from __future__ import annotations

import dataclasses
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
from raymia.defenses import DefenseContext, make_defense
from raymia.models.classifiers import build_model
from raymia.pipeline.jobs import TrainJob
from raymia.signals import compute_signals
from raymia.training.ensemble import train_many

Strategy = Literal["auto", "vmap", "loop"]


@dataclass
class FactoryStats:
    """What one call of :func:`produce_signals` did."""

    trained: list[str] = field(default_factory=list)
    vmapped: int = 0
    reused_models: int = 0
    reused_signals: int = 0
    seconds: float = 0.0


def train_models(jobs: Sequence[TrainJob], dataset: Dataset, *, strategy: Strategy = "auto",
                 device: torch.device | str = "cpu", builders: Mapping[str, Callable[..., nn.Module]] | None = None,
                 ) -> tuple[dict[str, nn.Module], int, dict[str, dict[str, float]]]:
    """Train every job with its target's defense.

    Returns the models and the numbers their training reported (e.g. DP epsilon) by job id, and how many models
    were trained inside a ``vmap`` ensemble. Single-stage defenses train a configuration's models as one group
    (:func:`~raymia.training.ensemble.train_many`); multi-stage ones (DMP, SELENA) run their own plan per model.
    """
    builders = builders or {}
    x, y = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
    groups: dict[str, list[TrainJob]] = defaultdict(list)
    for job in jobs:
        groups[job.target.name].append(job)
    models: dict[str, nn.Module] = {}
    extras: dict[str, dict[str, float]] = {}
    vmapped = 0
    for group in groups.values():
        target = group[0].target
        defense = make_defense(target.defense)
        spec = defense.model_spec(target.model)

        def build(seed: int) -> nn.Module:
            return build_model(spec, dataset.input_shape, dataset.num_classes, seed=seed, builder=builders.get(spec.arch))

        rows = group[0].defense_rows
        ctx = DefenseContext(dataset, rows.calibration, rows.reference, device)
        if defense.multi_stage:
            for job in group:
                result = defense.fit(build, job.train_indices, target.train, job.seed, ctx)
                models[job.job_id], extras[job.job_id] = result.model, result.extra
            continue
        recipe = defense.recipe(target.train)
        built = [build(j.seed) for j in group]
        n_vmapped, group_extras = train_many(
            built, x, y, [j.train_indices for j in group], recipe, [j.seed for j in group],
            make_policy=lambda n, seed: defense.policy(ctx, recipe, n, seed), strategy=strategy, device=device)
        vmapped += n_vmapped
        models.update({j.job_id: m for j, m in zip(group, built)})
        extras.update({j.job_id: e for j, e in zip(group, group_extras)})
    return models, vmapped, extras


def load_trained(job: TrainJob, dataset: Dataset, cache: ModelCache,
                 builders: Mapping[str, Callable[..., nn.Module]] | None = None) -> tuple[nn.Module, dict] | None:
    """The job's trained classifier (eval mode) and its training extras from the cache, or ``None``."""
    cached = cache.load_model(job.key)
    if cached is None:
        return None
    spec = make_defense(job.target.defense).model_spec(job.target.model)
    model = build_model(spec, dataset.input_shape, dataset.num_classes, builder=(builders or {}).get(spec.arch))
    model.load_state_dict(cached[0])
    return model.eval(), cached[1]


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
    extras: dict[str, dict[str, float]] = {}
    to_train: list[TrainJob] = []
    for job in need_outputs:
        loaded = load_trained(job, dataset, cache, builders) if reuse else None
        if loaded is None:
            to_train.append(job)
            continue
        models[job.job_id], extras[job.job_id] = loaded
        stats.reused_models += 1
    trained, stats.vmapped, trained_extras = train_models(to_train, dataset, strategy=strategy, device=device,
                                                          builders=builders)
    for job in to_train:
        cache.save_model(job.key, trained[job.job_id].state_dict(), trained_extras[job.job_id])
        stats.trained.append(job.job_id)
    models.update(trained)
    extras.update(trained_extras)
    outputs = compute_signals([models[j.job_id] for j in need_outputs], dataset.x[scored], query_views, label_only,
                              device=device)
    for job, signals in zip(need_outputs, outputs):
        cache.save_signals(job.key, views_id, dataclasses.replace(signals, extra=extras[job.job_id]))
    stats.seconds = time.perf_counter() - start
    return stats
