"""Defense sweeps on Ray Tune: one trial per swept configuration, each running the Ray-free recipe.

``objective: audit`` — each trial calls :func:`~raymia.pipeline.recipe.audit_configuration` (the defended target,
its reference pool with the same defense: an adaptive attacker, every attack, the DIFFENCE variant when
configured) and returns its reports as a Tune checkpoint; FIFO, so every audit finishes. ``objective: utility``
— each trial calls :func:`~raymia.pipeline.recipe.utility_configuration` and reports validation accuracy after
every epoch, so ``scheduler: asha`` may stop poor ones.

The configurations are expanded (and sampled, seeded) before Tune sees them (:func:`raymia.sweep.expand_sweep`),
so a local run of the same sweep audits exactly the same configurations.
"""

from __future__ import annotations

import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raymia.cache import ModelCache
from raymia.config import TargetConfig
from raymia.orchestration.fanout import TrainingFailed, node_id, set_trial_threads, shipped
from raymia.pipeline.evaluate import TargetReport
from raymia.pipeline.factory import Builders
from raymia.pipeline.plan import AuditPlan
from raymia.pipeline.recipe import (
    UtilityResult,
    audit_configuration,
    utility_configuration,
)
from raymia.training.device import resolve_device


def _audit_trial(config: dict[str, Any], *, plan: AuditPlan, targets: dict[str, TargetConfig], cache: ModelCache,
                 builders: Builders, token: str = "") -> None:
    set_trial_threads()
    target = targets[config["configuration"]]
    audit = audit_configuration(plan, target, cache, device=resolve_device(plan.config.compute.device),
                                builders=builders)
    best = audit.reports[0].best_attack()
    with tempfile.TemporaryDirectory() as d:
        for i, report in enumerate(audit.reports):
            report.save(f"{d}/{i}")
        tune.report({"target": target.name, "test_acc": audit.reports[0].test_acc, "best_attack": best.name,
                     "mia.best.auc": best.metrics.auc, "trained": audit.trained,
                     "train_flops": audit.train_flops, "node": node_id(),
                     "run_token": token}, checkpoint=tune.Checkpoint.from_directory(d))


def _utility_trial(config: dict[str, Any], *, plan: AuditPlan, targets: dict[str, TargetConfig], cache: ModelCache,
                   builders: Builders, token: str = "") -> None:
    set_trial_threads()
    target = targets[config["configuration"]]
    result = utility_configuration(
        plan, target, device=resolve_device(plan.config.compute.device), builders=builders,
        on_epoch=lambda epoch, acc: tune.report({"target": target.name, "epoch": epoch + 1, "val_acc": acc}))
    tune.report({"target": target.name, "epoch": target.train.epochs, "val_acc": result.val_acc,
                 "test_acc": result.test_acc, "done": True, "trained": 1, "node": node_id(), "run_token": token})


@dataclass
class SweepResults:
    """What the trials returned: audit reports (``objective: audit``) or utility results, failures as
    ``(configuration, error)``, and each finished trial's final metrics (``node``, ``run_token``, ``trained``)."""

    reports: list[TargetReport]
    utility: list[UtilityResult]
    failed: list[tuple[str, str]]
    finals: list[dict[str, Any]]


def run_sweep(plan: AuditPlan, targets: list[TargetConfig], cache: ModelCache, resources: dict[str, float], *,
              builders: Builders, storage_path: str, experiment_name: str, echo: Callable[[str], None],
              token: str = "") -> SweepResults:
    """Run one trial per configuration in ``targets``.

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
    done = {"n": 0, "interrupted": False}  # plain values: Tune pickles its callbacks with the experiment state

    class Progress(tune.Callback):
        def setup(self, **info: Any) -> None:
            """Note a Ctrl-C: Tune's own handler (installed by now) stops every trial as if it had finished."""
            tune_handler = signal.getsignal(signal.SIGINT)
            if callable(tune_handler) and threading.current_thread() is threading.main_thread():
                def note_interrupt(sig: int, frame: Any) -> None:
                    done["interrupted"] = True
                    tune_handler(sig, frame)
                signal.signal(signal.SIGINT, note_interrupt)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            done["n"] += 1
            r = trial.last_result
            line = f"test acc {r.get('test_acc', float('nan')):.3f}"
            if "mia.best.auc" in r:
                line += f", best attack {r['best_attack']} AUC {r['mia.best.auc']:.3f}"
            echo(f"[{done['n']}/{len(targets)}] {r.get('target', trial.trial_id)}: {line}")

    by_name = {t.name: t for t in targets}
    trainable = tune.with_resources(tune.with_parameters(fn, plan=plan, targets=by_name, cache=cache,
                                                         builders=shipped(builders), token=token), resources)
    space = {"configuration": tune.grid_search(list(by_name))}
    path = f"{storage_path.rstrip('/')}/{experiment_name}"
    if tune.Tuner.can_restore(path):
        echo(f"resuming the interrupted sweep in {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=cfg.compute.max_concurrent_trials,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=experiment_name, storage_path=storage_path, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1), callbacks=[Progress()]),
        )
    out = SweepResults([], [], [], [])
    before = signal.getsignal(signal.SIGINT)
    try:
        results = tuner.fit()
    finally:  # Tune leaves its handler installed after a normal finish, which would swallow the next Ctrl-C
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)
    for result in results:
        name = result.config["configuration"]
        if result.error is not None:
            out.failed.append((name, f"{type(result.error).__name__}: {result.error}"[:2000]))
            continue
        # Ctrl-C: Tune stopped the running trials (an audit trial then has no checkpoint; a utility trial's
        # last epoch would pass for its result) and returned as if the sweep had finished
        if done["interrupted"] or sweep.objective == "audit" and result.checkpoint is None:
            echo(f"the sweep was interrupted; run the same command again to resume it from {path}")
            raise KeyboardInterrupt
        out.finals.append({**result.metrics, "target": name})
        if sweep.objective == "audit":
            with result.checkpoint.as_directory() as d:
                out.reports += [TargetReport.load(sub) for sub in sorted(Path(d).iterdir())]
        else:
            m = result.metrics
            out.utility.append(UtilityResult(by_name[name], float(m["val_acc"]), float(m.get("test_acc", float("nan")))))
    if not out.finals:
        raise TrainingFailed(f"all {len(out.failed)} sweep trials failed; first error:\n{out.failed[0][1]}")
    return out
