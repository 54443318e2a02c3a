"""Fan an audit's expensive pieces out over the Ray cluster as Ray Tune trials; results travel through the cache.

- classifiers: groups of models per trial, each trial running the reference-model factory
  (:func:`~raymia.pipeline.factory.produce_signals`) on its group (``vmap`` ensembles where faster);
- DIFFENCE: the diffusion model as one trial, then every model's outputs through DIFFENCE, a group per trial;
- the DDPM track: its diffusion models, stage by stage.

The cache (a local path or a ``pyarrow.fs`` URI every node reaches) is how results come back; Tune only reports
what each trial did. FIFO scheduling: every piece must finish, none is stopped early. After a fan-out the driver
runs the same Ray-free recipe (:mod:`raymia.pipeline.recipe`), which then finds every step in the cache.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray import cloudpickle, tune

from raymia.cache import ModelCache
from raymia.errors import UserError
from raymia.orchestration.cluster import ClusterInfo
from raymia.orchestration.session import RaySession, storage_path
from raymia.pipeline.diffence_audit import (
    calibrate,
    ensure_diffusion_model,
    load_diffusion_model,
    missing_diffence_signals,
    produce_diffence_signals,
)
from raymia.pipeline.diffusion_track import DiffusionPlan, train_job
from raymia.pipeline.cost import Progress
from raymia.pipeline.factory import Builders, load_signals, produce_signals
from raymia.pipeline.plan import AuditPlan, TrainJob, jobs_for_target
from raymia.pipeline.recipe import phase
from raymia.training.device import resolve_device


class TrainingFailed(RuntimeError):
    """One or more trials raised; the message carries the first trial's error."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def node_id() -> str:
    """The Ray node this code runs on."""
    return ray.get_runtime_context().get_node_id()


def trial_slots(cluster: ClusterInfo, resources: dict[str, float]) -> int:
    """How many trials with ``resources`` the cluster runs at once."""
    slots = cluster.cpus / max(resources["cpu"], 1e-9)
    if resources.get("gpu", 0) > 0:
        slots = min(slots, cluster.gpus / resources["gpu"])
    return max(1, int(slots))


def group_jobs(jobs: Sequence[TrainJob], *, slots: int, models_per_trial: int | None) -> dict[str, list[TrainJob]]:
    """Split each target configuration's jobs into trials of whole training groups (:attr:`TrainJob.group`),
    named ``<configuration>#<i>``: a trial never splits a group, so the weights do not depend on the cluster.

    With ``models_per_trial`` unset a configuration's groups are spread evenly over ``slots`` trials, so the
    whole cluster trains it at once and each trial amortises its start-up over many models.
    """
    by_target: dict[str, dict[int, list[TrainJob]]] = defaultdict(lambda: defaultdict(list))
    for j in jobs:
        by_target[j.target.name][j.group].append(j)
    trials = {}
    for name, groups in by_target.items():
        units = list(groups.values())
        n_models = sum(map(len, units))
        n_trials = min(len(units), math.ceil(n_models / models_per_trial) if models_per_trial else slots)
        for i, chunk in enumerate(np.array_split(np.arange(len(units)), n_trials)):
            if len(chunk):
                trials[f"{name}#{i}"] = [j for u in chunk for j in units[u]]
    return trials


def shipped(builders: Builders) -> Builders:
    """Mark user architecture modules to travel by value, so Ray workers need not be able to import them."""
    for fn in builders.values():
        module = sys.modules[fn.__module__]
        if module.__name__.split(".")[0] != "raymia":
            cloudpickle.register_pickle_by_value(module)
    return builders


def set_trial_threads() -> None:
    """Use as many torch threads as the running trial was given CPUs."""
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


Task = Callable[[], dict[str, Any]]


def _task_trial(config: dict[str, Any], *, tasks: dict[str, Task]) -> None:
    set_trial_threads()
    start = time.perf_counter()
    out = tasks[config["item"]]()
    tune.report({"task": config["item"], "seconds": time.perf_counter() - start, "node": node_id(), **out})


@dataclass
class FanOutTotals:
    """What a fan-out did: trials run, models trained, and the Ray nodes its trials ran on."""

    trained: int = 0
    nodes: set[str] = field(default_factory=set)
    trials: int = 0
    train_flops: float = 0.0


def user_error_in(err: BaseException | None) -> UserError | None:
    """The :class:`UserError` a trial raised (a user's training function, weights, endpoint), unwrapped from
    Ray's task error so the CLI reports it as one (exit code 2), or ``None`` for a genuine failure."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UserError) and not type(err).__name__.startswith("RayTaskError"):
            return UserError(str(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def run_tasks(tasks: dict[str, Task], resources: dict[str, float], *, storage_path: str, experiment_name: str,
              max_concurrent: int | None = None, reuse_actors: bool = True,
              echo: Callable[[str], None] = _stderr, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Run independent closures as Tune trials of one experiment (FIFO, trial processes reused) and return each
    one's reported metrics by name. Each closure stores what it computes in the shared cache and returns a small
    dict of numbers (with ``line``: what to print when it is done)."""
    done = {"n": 0}

    class Done(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            done["n"] += 1
            what = result.get("line", "done")
            if progress is not None:
                flops = float(result.get("train_flops", 0.0))
                what += f"; {progress.advance(int(result.get('models', 0)), flops, flops)}"
            echo(f"[{done['n']:>{len(str(len(tasks)))}}/{len(tasks)}] {result['task']:<24} {what}  "
                 f"{result['seconds']:.1f} s")

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_task_trial, tasks=tasks), resources),
        param_space={"item": tune.grid_search(list(tasks))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=experiment_name, storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1), callbacks=[Done()]),
    )
    grid = tuner.fit()
    for err in grid.errors:
        if (mistake := user_error_in(err)) is not None:
            raise mistake
    if grid.errors:
        raise TrainingFailed(f"{len(grid.errors)} of {len(tasks)} trials failed; first error:\n{grid.errors[0]}")
    return {r.metrics["task"]: r.metrics for r in grid}


def _classifier_task(jobs: list[TrainJob], plan: AuditPlan, cache: ModelCache, builders: Builders,
                     reuse: bool) -> Task:
    def task() -> dict[str, Any]:
        stats = produce_signals(jobs, plan, cache, reuse=reuse, device=resolve_device(plan.config.compute.device),
                                builders=builders)
        reused = stats.reused_models + stats.reused_signals
        return {"trained": len(stats.trained), "train_flops": stats.train_flops,
                "models": sum(not j.given for j in jobs),  # a given target is not the factory's to make
                "line": f"{len(jobs)} models ({len(stats.trained)} trained, "
                f"{stats.vmapped} vmapped, {reused} reused)"}
    return task


def classifier_tasks(plan: AuditPlan, jobs: Sequence[TrainJob], cache: ModelCache, cluster: ClusterInfo,
                     resources: dict[str, float], *, builders: Builders, reuse: bool = True) -> dict[str, Task]:
    """One task per trial-sized group of ``jobs`` (whole training groups; :func:`group_jobs`)."""
    groups = group_jobs(jobs, slots=trial_slots(cluster, resources),
                        models_per_trial=plan.config.reference.models_per_trial)
    shipped(builders)
    return {name: _classifier_task(g, plan, cache, builders, reuse) for name, g in groups.items()}


def produce_on_ray(plan: AuditPlan, jobs: Sequence[TrainJob], cache: ModelCache, session: RaySession, *,
                   experiment_name: str, builders: Builders, reuse: bool = True, reuse_actors: bool = True,
                   echo: Callable[[str], None] = _stderr) -> FanOutTotals:
    """Train or reuse ``jobs`` on the cluster, in groups of models per Tune trial; ``reuse_actors`` keeps trial
    processes (and the torch they imported) alive between trials."""
    cluster, resources = session.connect(f"{len(jobs)} models to produce")
    tasks = classifier_tasks(plan, jobs, cache, cluster, resources, builders=builders, reuse=reuse)
    done = run_tasks(tasks, resources, storage_path=storage_path(plan.config), experiment_name=experiment_name,
                     max_concurrent=plan.config.compute.max_concurrent_trials, reuse_actors=reuse_actors, echo=echo)
    return _totals(done)


def _totals(done: dict[str, dict[str, Any]]) -> FanOutTotals:
    return FanOutTotals(sum(int(m["trained"]) for m in done.values()), {m["node"] for m in done.values()}, len(done),
                        sum(float(m.get("train_flops", 0.0)) for m in done.values()))


def _diffusion_task(plan: AuditPlan, cache: ModelCache) -> Task:
    def task() -> dict[str, Any]:
        ensure_diffusion_model(plan, cache, device=resolve_device(plan.config.compute.device))
        return {"trained": 0, "line": f"DIFFENCE's diffusion model ({plan.config.diffence.train.steps} steps)"}
    return task


def _largest_node_cpus() -> float:
    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=1.0)


def diffusion_model_on_ray(plan: AuditPlan, cache: ModelCache, session: RaySession, *, experiment_name: str,
                           echo: Callable[[str], None] = _stderr) -> Any:
    """DIFFENCE's diffusion model: from the cache, or trained as a Tune trial (which stores it there) first."""
    unet = load_diffusion_model(plan, cache)
    if unet is None:
        _, resources = session.connect("the diffusion model for DIFFENCE")
        if not resources["gpu"]:  # it trains alone before anything else: give it a whole node's CPUs
            resources = {**resources, "cpu": max(resources["cpu"], _largest_node_cpus())}
        run_tasks({"diffusion-model": _diffusion_task(plan, cache)}, resources, storage_path=storage_path(plan.config),
                  experiment_name=experiment_name, echo=echo)
        unet = load_diffusion_model(plan, cache)
    if unet is None:
        raise RuntimeError("the diffusion model is not in the cache after training; is cache.uri reachable from "
                           "every Ray node?")
    return unet


def fan_out_audit(plan: AuditPlan, cache: ModelCache, session: RaySession, *, experiment_name: str,
                  builders: Builders, timings: dict[str, float], echo: Callable[[str], None] = _stderr,
                  progress: Progress | None = None) -> FanOutTotals:
    """Put every model a targets audit needs into the cache, in parallel on the cluster and in at most two Tune
    experiments: the classifiers together with DIFFENCE's diffusion model (they do not depend on each other),
    then every model's outputs through DIFFENCE. Starts Ray only for what the cache lacks."""
    cfg = plan.config
    reuse = cfg.cache.reuse
    queried = {j.job_id for j in plan.jobs if j.given and j.target.endpoint is not None}  # asked by the driver
    with phase(timings, "cache_lookup"):
        _, missing = load_signals(plan.jobs, plan, cache) if reuse else ({}, list(plan.jobs))
        missing = [j for j in missing if j.job_id not in queried]
        need_unet = cfg.diffence is not None and load_diffusion_model(plan, cache) is None
    totals = FanOutTotals()
    if missing or need_unet:
        what = f"{len(missing)} models to produce" + (" and DIFFENCE's diffusion model" if need_unet else "")
        cluster, resources = session.connect(what)
        tasks = classifier_tasks(plan, missing, cache, cluster, resources, builders=builders, reuse=reuse)
        if need_unet:
            tasks["diffusion-model"] = _diffusion_task(plan, cache)
        with phase(timings, "training"):
            done = run_tasks(tasks, resources, storage_path=storage_path(cfg), experiment_name=experiment_name,
                             max_concurrent=cfg.compute.max_concurrent_trials, echo=echo, progress=progress)
        totals = _totals(done)
        _, still = load_signals(plan.jobs, plan, cache)
        still = [j for j in still if j.job_id not in queried]
        if still:
            raise RuntimeError(f"{len(still)} models have no outputs in the cache after training, e.g. "
                               f"{still[0].job_id}; is cache.uri reachable from every Ray node?")
    else:
        echo(f"all {len(plan.jobs)} models found in the cache {cache.uri}; nothing to train")
    if cfg.diffence is None:
        return totals
    with phase(timings, "diffence"):
        unet = load_diffusion_model(plan, cache)
        if unet is None:
            raise RuntimeError("the diffusion model is not in the cache after training; is cache.uri reachable from "
                               "every Ray node?")
        device = resolve_device(cfg.compute.device)
        intervals, pending = {}, []
        for t in cfg.targets:
            jobs = jobs_for_target(plan, t)
            intervals[t.name] = calibrate(plan, jobs[0], unet, cache, device=device, builders=builders, reuse=reuse)
            pending += [j for j in (missing_diffence_signals(jobs, plan, intervals[t.name], cache) if reuse else jobs)
                        if j.job_id not in queried]
        if pending:
            cluster, resources = session.connect("DIFFENCE outputs")
            groups = group_jobs(pending, slots=trial_slots(cluster, resources), models_per_trial=None)

            def diffence_task(g: list[TrainJob]) -> Task:
                def task() -> dict[str, Any]:
                    n = produce_diffence_signals(g, plan, unet, intervals[g[0].target.name], cache,
                                                 device=resolve_device(cfg.compute.device), builders=builders,
                                                 reuse=reuse)
                    return {"line": f"{n} models queried through DIFFENCE"}
                return task

            done = run_tasks({name: diffence_task(g) for name, g in groups.items()}, resources,
                             storage_path=storage_path(cfg), experiment_name=f"{experiment_name}-diffence", echo=echo)
            totals.nodes |= {m["node"] for m in done.values()}
    return totals


def train_ddpms_on_ray(plan: DiffusionPlan, cache: ModelCache, session: RaySession, *, experiment_name: str,
                       echo: Callable[[str], None] = _stderr) -> dict[str, float]:
    """Train the DDPM track's models the cache lacks as Tune trials, stage by stage (the teachers in parallel,
    then the student); returns seconds per trained model."""
    cfg = plan.config
    missing = [[j for j in stage if not cache.has_model(j.key)] for stage in plan.stages()]
    if not any(missing):
        echo(f"all {len(plan.jobs)} diffusion models found in the cache {cache.uri}; nothing to train")
        return {}
    cluster, res = session.connect(f"{sum(map(len, missing))} diffusion models to train")
    seconds: dict[str, float] = {}
    for i, stage in enumerate(missing):
        if not stage:
            continue
        tasks = {j.name: (lambda name=j.name: train_job(plan, name, cache, device=resolve_device(cfg.compute.device)))
                 for j in stage}
        stage_res = res
        if len(stage) == 1 and res.get("gpu", 0) == 0 and cfg.compute.cpus_per_trial == 1:
            stage_res = {**res, "cpu": cluster.cpus}  # a lone trial may use every core
        done = run_tasks(tasks, stage_res, storage_path=storage_path(cfg),
                         experiment_name=f"{experiment_name}-stage{i + 1}", echo=echo)
        seconds.update({name: float(m["seconds"]) for name, m in done.items()})
    for stage in missing:
        for j in stage:
            if not cache.has_model(j.key):
                raise RuntimeError(f"diffusion model '{j.name}' is not in the cache after training; is cache.uri "
                                   "reachable from every Ray node?")
    return seconds
