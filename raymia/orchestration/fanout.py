"""Fan an audit's models out over the Ray cluster: groups of models per Ray Tune trial.

Each trial runs the reference-model factory (:func:`~raymia.pipeline.factory.produce_signals`) on one group:
reuse what the cache holds, train the rest (``vmap`` ensembles where faster), write weights and outputs to the
cache. The cache (a local path or a ``pyarrow.fs`` URI every node reaches) is how results come back; Tune
only reports what each trial did. FIFO scheduling: every model must finish, none is stopped early.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import ray
from ray import cloudpickle, tune

from raymia.cache import ModelCache
from raymia.imports import is_import_path
from raymia.models.classifiers import resolve_builder
from raymia.orchestration.cluster import ClusterInfo
from raymia.pipeline.audit import AuditPlan
from raymia.pipeline.factory import produce_signals
from raymia.pipeline.jobs import TrainJob
from raymia.training.device import resolve_device


class TrainingFailed(RuntimeError):
    """One or more training trials raised; the message carries the first trial's error."""


def trial_slots(cluster: ClusterInfo, resources: dict[str, float]) -> int:
    """How many trials with ``resources`` the cluster runs at once."""
    slots = cluster.cpus / max(resources["cpu"], 1e-9)
    if resources.get("gpu", 0) > 0:
        slots = min(slots, cluster.gpus / resources["gpu"])
    return max(1, int(slots))


def group_jobs(jobs: Sequence[TrainJob], *, slots: int, models_per_trial: int | None) -> list[list[TrainJob]]:
    """Split each target configuration's jobs into contiguous groups, one Tune trial each.

    With ``models_per_trial`` unset a configuration's models are spread evenly over ``slots`` trials, so the
    whole cluster trains it at once and each trial amortises its start-up over many models.
    """
    by_target: dict[str, list[TrainJob]] = defaultdict(list)
    for j in jobs:
        by_target[j.target.name].append(j)
    groups = []
    for members in by_target.values():
        n_groups = (math.ceil(len(members) / models_per_trial) if models_per_trial
                    else min(slots, len(members)))
        groups += [list(chunk) for chunk in np.array_split(np.asarray(members, dtype=object), n_groups) if len(chunk)]
    return groups


def _produce_trial(config: dict[str, Any], *, groups: dict[str, list[TrainJob]], plan_bits: dict[str, Any],
                   cache: ModelCache, builders: dict[str, Callable[..., Any]]) -> None:
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    jobs = groups[config["group"]]
    stats = produce_signals(jobs, plan_bits["dataset"], plan_bits["scored"], cache,
                            query_views=plan_bits["query_views"], label_only=plan_bits["label_only"],
                            views_id=plan_bits["views_id"], reuse=plan_bits["reuse"], strategy=plan_bits["strategy"],
                            device=resolve_device(plan_bits["device"]), builders=builders)
    tune.report({"group": config["group"], "models": len(jobs), "trained": len(stats.trained),
                 "vmapped": stats.vmapped, "reused": stats.reused_models + stats.reused_signals,
                 "seconds": stats.seconds, "node": ray.get_runtime_context().get_node_id()})


class _Progress(tune.Callback):
    """One line per finished trial on stderr: ``[2/4] overfit#1  9 models (8 vmapped, 0 reused)  3.1 s``."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.done, self.echo = total, 0, echo

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.done += 1
        self.echo(f"[{self.done:>{len(str(self.total))}}/{self.total}] {result['group']:<24} {result['models']} models "
                  f"({result['trained']} trained, {result['vmapped']} vmapped, {result['reused']} reused)  "
                  f"{result['seconds']:.1f} s")


def plugin_builders(plan: AuditPlan) -> dict[str, Callable[..., Any]]:
    """Resolve user architectures here and ship their modules by value, so workers need not import them."""
    builders = {}
    cfg = plan.config
    specs = [(f"targets.{i}.model", t.model) for i, t in enumerate(cfg.targets)]
    if cfg.sweep is not None:
        specs.append(("sweep.base.model", cfg.sweep.base.model))
    for field, spec in specs:
        if is_import_path(spec.arch):
            fn = resolve_builder(spec, field=field)
            module = sys.modules[fn.__module__]
            if module.__name__.split(".")[0] != "raymia":
                cloudpickle.register_pickle_by_value(module)
            builders[spec.arch] = fn
    return builders


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def produce_on_ray(plan: AuditPlan, jobs: Sequence[TrainJob], cache: ModelCache, resources: dict[str, float],
                   cluster: ClusterInfo, *, storage_path: str, experiment_name: str, reuse_actors: bool = True,
                   echo: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Train or reuse ``jobs`` on the cluster, in groups of models per Tune trial; returns summed trial stats
    and the ids of the nodes trials ran on (``nodes``).

    ``resources`` is the per-trial request from :func:`raymia.orchestration.cluster.trial_resources`;
    ``reuse_actors`` keeps trial processes (and their imported torch) alive between trials.
    """
    cfg = plan.config
    grouped = group_jobs(jobs, slots=trial_slots(cluster, resources), models_per_trial=cfg.reference.models_per_trial)
    groups: dict[str, list[TrainJob]] = {}
    per_target: dict[str, int] = defaultdict(int)
    for g in grouped:
        name = g[0].target.name
        groups[f"{name}#{per_target[name]}"] = g
        per_target[name] += 1
    plan_bits = {"dataset": plan.dataset, "scored": plan.scored_indices, "query_views": list(cfg.attacks.queries),
                 "label_only": cfg.attacks.label_only, "views_id": plan.views_id, "reuse": cfg.cache.reuse,
                 "strategy": cfg.reference.strategy, "device": cfg.compute.device}
    trainable = tune.with_resources(
        tune.with_parameters(_produce_trial, groups=groups, plan_bits=plan_bits, cache=cache,
                             builders=plugin_builders(plan)),
        resources,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"group": tune.grid_search(list(groups))},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.compute.max_concurrent_trials, reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=experiment_name, storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  callbacks=[_Progress(len(groups), echo)]),
    )
    grid = tuner.fit()
    if grid.errors:
        raise TrainingFailed(f"{len(grid.errors)} of {len(groups)} training trials failed; first error:\n"
                             f"{grid.errors[0]}")
    totals: dict[str, Any] = {"trials": len(groups), "trained": 0, "vmapped": 0, "reused": 0, "nodes": set()}
    for result in grid:
        for k in ("trained", "vmapped", "reused"):
            totals[k] += int(result.metrics[k])
        totals["nodes"].add(result.metrics["node"])
    return totals


def _task_trial(config: dict[str, Any], *, tasks: dict[str, Callable[[], dict[str, Any]]]) -> None:
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    tune.report({"task": config["task"], **tasks[config["task"]]()})


def run_tasks(tasks: dict[str, Callable[[], dict[str, Any]]], resources: dict[str, float], *, storage_path: str,
              experiment_name: str, echo: Callable[[str], None] = _stderr) -> dict[str, dict[str, Any]]:
    """Run independent closures as Tune trials (one each, FIFO) and return each one's reported metrics.

    Each closure computes something and stores it in the shared cache; it returns a small dict of numbers.
    """
    class Done(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            echo(f"  done: {result['task']}  {result.get('seconds', float('nan')):.1f} s")

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_task_trial, tasks=tasks), resources),
        param_space={"task": tune.grid_search(list(tasks))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=experiment_name, storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1), callbacks=[Done()]),
    )
    grid = tuner.fit()
    if grid.errors:
        raise TrainingFailed(f"{len(grid.errors)} of {len(tasks)} tasks failed; first error:\n{grid.errors[0]}")
    return {r.metrics["task"]: r.metrics for r in grid}
