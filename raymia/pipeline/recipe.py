"""The audit recipe, written once: audit ONE configuration end to end, without Ray or MLflow.

    train or reuse the target and its reference models -> their outputs -> attack the target
    [diffence:] diffusion model -> calibrate the interval -> every model's outputs through DIFFENCE -> attack again

Every runner calls these functions: :func:`audit_locally` (``raymia audit --local``, a notebook, the GPU machine),
a Ray Tune trial of a sweep, and the Ray driver of a targets audit after it has fanned the expensive pieces out
over the cluster (then every step finds its result in the cache). :func:`utility_configuration` is the
accuracy-only variant a utility sweep runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from raymia.cache import ModelCache
from raymia.config import TargetConfig
from raymia.pipeline.diffence_audit import (
    calibrate,
    diffence_report,
    ensure_diffusion_model,
    produce_diffence_signals,
)
from raymia.pipeline.cost import Progress
from raymia.pipeline.evaluate import TargetReport, assemble_pool, evaluate_pool
from raymia.pipeline.factory import (
    Builders,
    load_signals,
    produce_signals,
    train_models,
)
from raymia.pipeline.plan import AuditPlan, jobs_for_target
from raymia.training.loop import predict_logits


@contextmanager
def phase(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the block's wall time to ``timings[name]`` (no-op without ``timings``)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True, eq=False)
class ConfigurationAudit:
    """One audited configuration: its report as trained and (with ``diffence:``) as deployed behind DIFFENCE,
    and how many classifiers were trained or reused for it."""

    reports: list[TargetReport]
    trained: int
    reused: int
    train_flops: float = 0.0  # counted training FLOPs of the models trained here


def audit_configuration(plan: AuditPlan, target: TargetConfig, cache: ModelCache, *,
                        device: torch.device | str = "cpu", builders: Builders | None = None,
                        reuse: bool | None = None, timings: dict[str, float] | None = None) -> ConfigurationAudit:
    """Audit ``target``: train what the cache lacks (its defense applied to the reference models too), attack it,
    and, when the config has ``diffence:``, attack it again as deployed behind DIFFENCE.

    ``reuse`` (default: ``cache.reuse``) ``False`` retrains and recomputes everything.
    """
    reuse = plan.config.cache.reuse if reuse is None else reuse
    jobs = jobs_for_target(plan, target)
    with phase(timings, "training"):
        stats = produce_signals(jobs, plan, cache, reuse=reuse, device=device, builders=builders)
    signals, missing = load_signals(jobs, plan, cache)
    if missing:
        raise RuntimeError(f"{missing[0].job_id} has no outputs in the cache {cache.uri} after training; is the "
                           "cache reachable and writable from every process?")
    with phase(timings, "attacks"):
        reports = [evaluate_pool(plan.config, target, assemble_pool(plan, jobs, signals))]
    if plan.config.diffence is not None:
        with phase(timings, "diffence"):
            unet = ensure_diffusion_model(plan, cache, device=device)
            interval = calibrate(plan, jobs[0], unet, cache, device=device, builders=builders, reuse=reuse)
            produce_diffence_signals(jobs, plan, unet, interval, cache, device=device, builders=builders, reuse=reuse)
        with phase(timings, "attacks"):
            reports.append(diffence_report(plan, target, interval, cache))
    return ConfigurationAudit(reports, trained=len(stats.trained),
                              reused=stats.reused_models + stats.reused_signals, train_flops=stats.train_flops)


@dataclass(frozen=True)
class UtilityResult:
    """A utility-only configuration: validation accuracy (calibration split) per epoch and at the end, test
    accuracy."""

    target: TargetConfig
    val_acc: float
    test_acc: float
    epochs: list[float] = field(default_factory=list)


def utility_configuration(plan: AuditPlan, target: TargetConfig, *, device: torch.device | str = "cpu",
                          builders: Builders | None = None,
                          on_epoch: Callable[[int, float], None] | None = None) -> UtilityResult:
    """Train only ``target`` and measure its accuracy; ``on_epoch(epoch, val_acc)`` is told after every epoch (a
    scheduler such as ASHA may stop the run there). Multi-stage defenses report only at the end."""
    ds, split = plan.dataset, plan.split
    job = jobs_for_target(plan, target)[0]
    val, test = split["calibration"], split["test"]
    history: list[float] = []

    def accuracy(model: nn.Module, rows: np.ndarray) -> float:
        return float((predict_logits(model, ds.x[rows], device=device).argmax(1) == ds.y[rows]).mean())

    def report(epoch: int, model: nn.Module) -> None:
        model.eval()
        history.append(accuracy(model, val))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
        model.train()

    models, _, _ = train_models([job], ds, strategy="loop", device=device, builders=builders, on_epoch=report)
    model = models[job.job_id]
    return UtilityResult(target, accuracy(model, val), accuracy(model, test), history)


def audit_locally(plan: AuditPlan, targets: list[TargetConfig], cache: ModelCache, *,
                  device: torch.device | str = "cpu", builders: Builders | None = None,
                  timings: dict[str, float] | None = None,
                  echo: Callable[[str], None] = lambda line: None, progress: Progress | None = None
                  ) -> tuple[list[ConfigurationAudit], list[tuple[str, str]]]:
    """Audit every configuration in this process, one after another. Returns the audits and, for each
    configuration that raised (a sweep keeps going), its name and error. ``progress`` adds models done / total
    and an ETA to each line."""
    done, failed = [], []
    for i, target in enumerate(targets):
        try:
            done.append(audit_configuration(plan, target, cache, device=device, builders=builders, timings=timings))
        except Exception as exc:  # noqa: BLE001 - a failed configuration is reported, the others still run
            if plan.config.sweep is None:
                raise
            failed.append((target.name, f"{type(exc).__name__}: {exc}"[:2000]))
            echo(f"[{i + 1}/{len(targets)}] {target.name}: FAILED {failed[-1][1].splitlines()[0]}")
            continue
        best = done[-1].reports[0].best_attack()
        counted = done[-1].trained + done[-1].reused
        planned = progress.cost.by_target.get(target.name, 0.0) / progress.runs if progress else 0.0
        where = f"; {progress.advance(counted, planned, done[-1].train_flops)}" if progress else ""
        echo(f"[{i + 1}/{len(targets)}] {target.name}: test acc {done[-1].reports[0].test_acc:.3f}, best attack "
             f"{best.name} AUC {best.metrics.auc:.3f} ({done[-1].trained} models trained{where})")
    return done, failed
