"""Defense sweeps on Ray Tune: the YAML's defense entries become one Tune search space, one trial per configuration.

``objective: audit`` — each trial trains the defended target and its reference pool (with the same defense:
an adaptive attacker) through the model factory and cache, runs every attack, and returns the report as a Tune
checkpoint; FIFO, so every audit finishes. ``objective: utility`` — each trial trains only the target and
reports validation accuracy (calibration split) after every epoch, so ``scheduler: asha`` may stop poor ones.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raymia.cache import ModelCache
from raymia.config import TargetConfig
from raymia.defenses import DefenseConfig, DefenseContext, make_defense
from raymia.models.classifiers import build_model
from raymia.orchestration.fanout import TrainingFailed, plugin_builders
from raymia.pipeline.audit import (AuditPlan, TargetReport, assemble_pool, check_target, evaluate_pool,
                                   jobs_for_target, load_signals)
from raymia.pipeline.diffence_audit import calibrate, diffence_report, ensure_diffusion_model, produce_diffence_signals
from raymia.pipeline.factory import produce_signals
from raymia.sweep import is_dimension, is_sampled, resolve_representative, variant_label
from raymia.training.device import resolve_device
from raymia.training.loop import predict_logits, train_classifier

_DEFENSE = TypeAdapter(DefenseConfig)
_TUNE = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
         "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}


def search_space(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"defense": grid over entries}``, each entry's dimensions as Tune domains (sampled ones repeated
    ``samples`` times, each repeat drawing afresh)."""
    variants = []
    for entry in entries:
        space = {k: _TUNE[next(iter(v))](next(iter(v.values()))) if is_dimension(v) else v
                 for k, v in entry.items() if k != "samples"}
        repeats = entry.get("samples", 1) if is_sampled(entry) else 1
        variants += [copy.deepcopy(space) for _ in range(repeats)]
    return {"defense": tune.grid_search(variants)}


def sweep_target(plan: AuditPlan, defense: dict[str, Any]) -> TargetConfig:
    base = plan.config.sweep.base
    cfg = _DEFENSE.validate_python(defense)
    return TargetConfig(name=variant_label(cfg), model=base.model, train=base.train, defense=cfg)


def check_sweep(plan: AuditPlan) -> None:
    """Build every entry's (representative) configuration once, before any trial starts."""
    for i, entry in enumerate(plan.config.sweep.defenses):
        check_target(sweep_target(plan, resolve_representative(entry)), plan.dataset, field=f"sweep.defenses.{i}")


def _threads() -> None:
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


def _where(token: str) -> dict[str, Any]:
    """Which node ran the trial, and which driver run it belongs to (restored trials keep an older token)."""
    return {"node": ray.get_runtime_context().get_node_id(), "run_token": token}


def _audit_trial(config: dict[str, Any], *, plan: AuditPlan, cache: ModelCache, builders: dict,
                 token: str = "") -> None:
    _threads()
    cfg = plan.config
    target = sweep_target(plan, config["defense"])
    jobs = jobs_for_target(plan, target)
    stats = produce_signals(jobs, plan.dataset, plan.scored_indices, cache, query_views=list(cfg.attacks.queries),
                    label_only=cfg.attacks.label_only, views_id=plan.views_id, reuse=cfg.cache.reuse,
                    strategy=cfg.reference.strategy, device=resolve_device(cfg.compute.device), builders=builders)
    signals, missing = load_signals(dataclasses.replace(plan, jobs=jobs), cache)
    if missing:
        raise TrainingFailed(f"no outputs in the cache for {missing[0].job_id}")
    reports = [evaluate_pool(cfg, target, assemble_pool(dataclasses.replace(plan, jobs=jobs), target, signals))]
    if cfg.diffence is not None:  # the same configuration deployed behind DIFFENCE, attacked adaptively
        device = resolve_device(cfg.compute.device)
        unet = ensure_diffusion_model(plan, cache, device=device)
        interval = calibrate(plan, jobs[0], unet, cache, device=device, builders=builders)
        produce_diffence_signals(jobs, plan, unet, interval, cache, device=device, builders=builders)
        reports.append(diffence_report(plan, target, interval, cache))
    best = reports[0].best_attack()
    with tempfile.TemporaryDirectory() as d:
        for i, report in enumerate(reports):
            report.save(f"{d}/{i}")
        tune.report({"target": target.name, "test_acc": reports[0].test_acc, "gap": reports[0].gap,
                     "best_attack": best.name, "mia.best.auc": best.metrics.auc,
                     "mia.best.tpr_at_0.1pct_fpr": best.metrics.tpr_at_fpr["0.1pct"],
                     "trained": len(stats.trained), **_where(token)},
                    checkpoint=tune.Checkpoint.from_directory(d))


def _utility_trial(config: dict[str, Any], *, plan: AuditPlan, cache: ModelCache, builders: dict,
                   token: str = "") -> None:
    _threads()
    cfg, ds, split = plan.config, plan.dataset, plan.split
    target = sweep_target(plan, config["defense"])
    job = jobs_for_target(plan, target)[0]
    device = resolve_device(cfg.compute.device)
    defense = make_defense(target.defense)
    spec = defense.model_spec(target.model)
    val, test = split["calibration"], split["test"]

    def accuracy(model: torch.nn.Module, rows: np.ndarray) -> float:
        return float((predict_logits(model, ds.x[rows], device=device).argmax(1) == ds.y[rows]).mean())

    def report(epoch: int, model: torch.nn.Module) -> None:
        model.eval()
        tune.report({"target": target.name, "epoch": epoch + 1, "val_acc": accuracy(model, val)})
        model.train()

    ctx = DefenseContext(ds, job.defense_rows.calibration, job.defense_rows.reference, device)
    build = lambda seed: build_model(spec, ds.input_shape, ds.num_classes, seed=seed,  # noqa: E731
                                     builder=builders.get(spec.arch))
    if defense.multi_stage:
        model = defense.fit(build, job.train_indices, target.train, job.seed, ctx).model
    else:
        model, recipe = build(job.seed), defense.recipe(target.train)
        rows = torch.from_numpy(job.train_indices)
        train_classifier(model, torch.from_numpy(ds.x)[rows], torch.from_numpy(ds.y)[rows], recipe, seed=job.seed,
                         policy=defense.policy(ctx, recipe, len(rows), job.seed), device=device, on_epoch=report)
    tune.report({"target": target.name, "epoch": target.train.epochs, "val_acc": accuracy(model, val),
                 "test_acc": accuracy(model, test), "done": True, "trained": 1, **_where(token)})


def run_sweep(plan: AuditPlan, cache: ModelCache, resources: dict[str, float], *, storage_path: str,
              experiment_name: str, echo: Callable[[str], None], token: str = ""
              ) -> tuple[list[TargetReport], list[dict[str, Any]], list[tuple[str, str]]]:
    """Run the sweep; returns the audited reports (objective audit), the final metrics of every trial, and
    ``(configuration, error)`` for trials that failed.

    If ``storage_path/experiment_name`` holds an interrupted run of this sweep (the driver was killed), it is
    resumed with ``Tuner.restore``: finished trials keep their results, unfinished and errored ones run again.
    Trials report their node and ``token`` (the driver's run id), so the caller can tell restored results apart.
    A trial whose node dies is retried once on the remaining nodes (``FailureConfig(max_failures=1)``).
    """
    cfg = plan.config
    sweep = cfg.sweep
    fn = _audit_trial if sweep.objective == "audit" else _utility_trial
    scheduler = None
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(metric="val_acc", mode="max", max_t=sweep.base.train.epochs,
                                  grace_period=max(1, sweep.base.train.epochs // 8))
    done = {"n": 0}

    class Progress(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            done["n"] += 1
            r = trial.last_result
            line = f"test acc {r.get('test_acc', float('nan')):.3f}"
            if "mia.best.auc" in r:
                line += f", best attack {r['best_attack']} AUC {r['mia.best.auc']:.3f}"
            echo(f"[{done['n']}] {r.get('target', trial.trial_id)}: {line}")

    trainable = tune.with_resources(tune.with_parameters(fn, plan=plan, cache=cache, builders=plugin_builders(plan),
                                                         token=token), resources)
    path = f"{storage_path.rstrip('/')}/{experiment_name}"
    if tune.Tuner.can_restore(path):
        echo(f"resuming the interrupted sweep in {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=search_space(sweep.defenses))
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep.defenses),
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=cfg.compute.max_concurrent_trials),
            run_config=tune.RunConfig(name=experiment_name, storage_path=storage_path, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1), callbacks=[Progress()]),
        )
    grid = tuner.fit()
    reports, finals, failed = [], [], []
    for result in grid:
        label = variant_label(_DEFENSE.validate_python(result.config["defense"]))
        if result.error is not None:
            failed.append((label, f"{type(result.error).__name__}: {result.error}"[:2000]))
            continue
        finals.append({**result.metrics, "target": label, "defense": result.config["defense"]})
        if sweep.objective == "audit":
            with result.checkpoint.as_directory() as d:
                reports += [TargetReport.load(sub) for sub in sorted(Path(d).iterdir())]
    if not finals:
        raise TrainingFailed(f"all {len(failed)} sweep trials failed; first error:\n{failed[0][1]}")
    return reports, finals, failed


