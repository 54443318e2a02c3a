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

import torch
from torch import nn

from raymia.cache import ModelCache
from raymia.data.datasets import Dataset
from raymia.defenses import DefenseContext, make_defense
from raymia.pipeline.cost import forward_macs, job_flops
from raymia.pipeline.plan import AuditPlan, TrainJob
from raymia.endpoint import EndpointClient, QueryStats
from raymia.errors import UserError
from raymia.imports import load_callable
from raymia.models.checkpoints import fit_state_dict, read_state_dict
from raymia.signals import ModelSignals, compute_signals, queries_needed
from raymia.training.ensemble import train_many

Strategy = Literal["auto", "vmap", "loop"]
Builders = Mapping[str, Callable[..., nn.Module]]


@dataclass
class FactoryStats:
    """What one call of :func:`produce_signals` did."""

    trained: list[str] = field(default_factory=list)
    vmapped: int = 0
    reused_models: int = 0
    reused_signals: int = 0
    seconds: float = 0.0
    train_flops: float = 0.0  # counted training FLOPs of the models trained (raymia.pipeline.cost)


def train_models(jobs: Sequence[TrainJob], dataset: Dataset, *, strategy: Strategy = "auto",
                 device: torch.device | str = "cpu", builders: Builders | None = None,
                 on_epoch: Callable[[int, nn.Module], None] | None = None,
                 ) -> tuple[dict[str, nn.Module], int, dict[str, dict[str, float]]]:
    """Train every job with its target's defense.

    Returns the models and the numbers their training reported (e.g. DP epsilon) by job id, and how many models
    were trained inside a ``vmap`` ensemble. Single-stage defenses train each of a configuration's fixed groups
    (:attr:`TrainJob.group`) together (:func:`~raymia.training.ensemble.train_many`); multi-stage ones (DMP,
    SELENA) run their own plan per model.
    ``on_epoch(epoch, model)`` is called after every epoch of one-by-one training (it turns ``vmap`` off).
    """
    x, y = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
    groups: dict[tuple[str, int], list[TrainJob]] = defaultdict(list)
    for job in jobs:
        groups[job.target.name, job.group].append(job)
    models: dict[str, nn.Module] = {}
    extras: dict[str, dict[str, float]] = {}
    vmapped = 0
    for group in groups.values():
        target, first = group[0].target, group[0]
        defense = make_defense(target.defense)

        def build(seed: int) -> nn.Module:
            return first.build(dataset, seed=seed, builders=builders)

        rows = first.defense_rows
        ctx = DefenseContext(dataset, rows.calibration, rows.reference, device)
        if target.train.fn is not None:
            fit = (builders or {}).get(target.train.fn) or load_callable(target.train.fn, field="train.fn")
            for job in group:
                models[job.job_id], extras[job.job_id] = user_fit(fit, build(job.seed), dataset, job, device), {}
            continue
        if defense.multi_stage:
            for job in group:
                result = defense.fit(build, job.train_indices, target.train, job.seed, ctx)
                models[job.job_id], extras[job.job_id] = result.model, result.extra
            continue
        recipe = defense.recipe(target.train)
        built = [build(j.seed) for j in group]
        n_vmapped, group_extras = train_many(
            built, x, y, [j.train_indices for j in group], recipe, [j.seed for j in group],
            make_policy=lambda n, seed: defense.policy(ctx, recipe, n, seed),
            strategy="loop" if on_epoch is not None else strategy, device=device, on_epoch=on_epoch)
        vmapped += n_vmapped
        models.update({j.job_id: m for j, m in zip(group, built)})
        extras.update({j.job_id: e for j, e in zip(group, group_extras)})
    return models, vmapped, extras


def user_fit(fit: Callable[..., nn.Module], model: nn.Module, dataset: Dataset, job: TrainJob,
             device: torch.device | str) -> nn.Module:
    """Train ``model`` with the user's ``train.fn``: ``fit(model, x [n, *shape] float32, y [n] int64, *, seed,
    device) -> model``, on the job's rows; anything but an ``nn.Module`` of the same architecture back is a
    :class:`UserError`."""
    rows = job.train_indices
    x, y = torch.from_numpy(dataset.x[rows]), torch.from_numpy(dataset.y[rows].astype("int64"))
    torch.manual_seed(job.seed)
    out = fit(model, x, y, seed=job.seed, device=torch.device(device))
    if not isinstance(out, nn.Module):
        raise UserError(f"{job.target.train.fn} returned {type(out).__name__}; it must return the trained "
                        "torch.nn.Module (the model it was given)", field=f"targets.{job.target.name}.train.fn")
    if set(out.state_dict()) != set(model.state_dict()):
        raise UserError(f"{job.target.train.fn} returned a model whose parameters differ from the architecture "
                        "it was given; train and return that model", field=f"targets.{job.target.name}.train.fn")
    return out.cpu().eval()


def load_given(job: TrainJob, dataset: Dataset, builders: Builders | None = None) -> nn.Module:
    """A given target's network with the user's weights (eval mode)."""
    t = job.target
    model = job.build(dataset, builders=builders)
    return fit_state_dict(model, read_state_dict(t.weights, field=f"targets.{t.name}.weights"),
                          num_classes=dataset.num_classes, field=f"targets.{t.name}.weights",
                          source=t.model_uri or str(t.weights))


def load_trained(job: TrainJob, dataset: Dataset, cache: ModelCache,
                 builders: Builders | None = None) -> tuple[nn.Module, dict] | None:
    """The job's trained classifier (eval mode) and its training extras from the cache (or, for a given
    target, its weights file), or ``None`` (also for an endpoint: there is no network here)."""
    if job.given:
        return None if job.target.endpoint is not None else (load_given(job, dataset, builders), {})
    cached = cache.load_model(job.key)
    if cached is None:
        return None
    model = job.build(dataset, builders=builders)
    model.load_state_dict(cached[0])
    return model.eval(), cached[1]


def produce_signals(jobs: Sequence[TrainJob], plan: AuditPlan, cache: ModelCache, *, reuse: bool = True,
                    device: torch.device | str = "cpu", builders: Builders | None = None) -> FactoryStats:
    """Make sure the cache holds weights and outputs (on the plan's scored rows, in its query views) of every
    job; train only what is missing.

    With ``reuse=False`` everything is retrained and overwritten (for benchmarks and forced refreshes).
    """
    start = time.perf_counter()
    cfg, dataset = plan.config, plan.dataset
    stats = FactoryStats()
    need_outputs: list[TrainJob] = []
    for job in jobs:
        if job.given and job.target.endpoint is not None:
            query_endpoint(job, plan, cache)  # always asked afresh: what answers at a URL can change
            continue
        if reuse and cache.load_signals(job.key, plan.views_id) is not None:
            stats.reused_signals += 0 if job.given else 1
        else:
            need_outputs.append(job)
    models: dict[str, nn.Module] = {}
    extras: dict[str, dict[str, float]] = {}
    to_train: list[TrainJob] = []
    for job in need_outputs:
        loaded = load_trained(job, dataset, cache, builders) if reuse or job.given else None
        if loaded is None:
            to_train.append(job)
            continue
        models[job.job_id], extras[job.job_id] = loaded
        stats.reused_models += 0 if job.given else 1  # a given target was never the factory's to train
    trained, stats.vmapped, trained_extras = train_models(to_train, dataset, strategy=cfg.reference.strategy,
                                                          device=device, builders=builders)
    macs: dict[str, int] = {}
    for job in to_train:
        cache.save_model(job.key, trained[job.job_id].state_dict(), trained_extras[job.job_id])
        stats.trained.append(job.job_id)
        if job.target.name not in macs:
            macs[job.target.name] = forward_macs(trained[job.job_id], dataset.input_shape)
        stats.train_flops += job_flops(job, plan, macs[job.target.name])[1]
    models.update(trained)
    extras.update(trained_extras)
    outputs = compute_signals([models[j.job_id] for j in need_outputs], dataset.x[plan.scored_indices],
                              list(cfg.attacks.queries), cfg.attacks.label_only, device=device,
                              label_rows=plan.label_rows)
    for job, signals in zip(need_outputs, outputs):
        cache.save_signals(job.key, plan.views_id, dataclasses.replace(signals, extra=extras[job.job_id]))
    stats.seconds = time.perf_counter() - start
    return stats


def query_endpoint(job: TrainJob, plan: AuditPlan, cache: ModelCache) -> QueryStats:
    """Ask a black-box target's endpoint for its outputs on the plan's scored rows (every query view, and the
    label-only views where the label-only attack reads them) and cache them, with the query counts as extras."""
    cfg, x = plan.config, plan.dataset.x[plan.scored_indices]
    client = EndpointClient(job.target.endpoint, where=f"targets.{job.target.name}.endpoint")
    client.planned(queries_needed(len(x), list(cfg.attacks.queries), cfg.attacks.label_only, x[:1], plan.label_rows))
    signals = compute_signals([client.logits], x, list(cfg.attacks.queries), cfg.attacks.label_only,
                              label_rows=plan.label_rows)[0]
    if signals.logits.shape[-1] != plan.dataset.num_classes:
        raise UserError(f"{client.config.url} returns {signals.logits.shape[-1]} outputs per sample, the dataset "
                        f"has {plan.dataset.num_classes} classes; audit the endpoint on the data it serves",
                        field=f"targets.{job.target.name}.endpoint")
    cache.save_signals(job.key, plan.views_id, dataclasses.replace(signals, extra=client.stats.as_metrics()))
    return client.stats


def load_signals(jobs: Sequence[TrainJob], plan: AuditPlan, cache: ModelCache
                 ) -> tuple[dict[str, ModelSignals], list[TrainJob]]:
    """Outputs of every job found intact in the cache, and the jobs still missing."""
    found, missing = {}, []
    for job in jobs:
        s = cache.load_signals(job.key, plan.views_id)
        if s is None:
            missing.append(job)
        else:
            found[job.job_id] = s
    return found, missing
