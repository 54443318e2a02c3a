"""Run one whole audit: data -> plan -> models (cache, Ray Tune) -> attacks -> MLflow -> summary table.

This is the only module that wires the layers together; ``raymia audit`` and ``jobs/audit.py`` call
:func:`run_audit`, ``raymia rescore`` calls :func:`rescore_run`.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray

import raymia
from raymia.cache import ModelCache
from raymia.config import AuditConfig, TrackingConfig, apply_overrides, parse_config
from raymia.data.datasets import load_dataset
from raymia.errors import UserError
from raymia.orchestration.cluster import connect_ray, release_ray, trial_resources
from raymia.orchestration.fanout import produce_on_ray
from raymia.pipeline.audit import AuditPlan, TargetReport, assemble_pool, evaluate_pool, load_signals, plan_audit
from raymia.quiet import quiet_defaults
from raymia.report import close, roc_figure, score_histograms, summary_table
from raymia.signals import PoolSignals
from raymia.tracking import AuditRun, audit_run, flat_params, open_run, resolve_tracking_uri


@dataclass(frozen=True)
class AuditOutcome:
    """What an audit returns: the MLflow parent run, one report per target, seconds per phase, cache use."""

    run_id: str
    tracking_uri: str
    reports: list[TargetReport]
    timings: dict[str, float]
    models: dict[str, int]

    def table_rows(self) -> list[dict]:
        rows = []
        for r in self.reports:
            best = r.best_attack()
            rows.append({"target": r.target.name, "test_acc": r.test_acc, "gap": r.gap, "best_attack": best.name,
                         "auc": best.metrics.auc, "tpr_at_0.1pct_fpr": best.metrics.tpr_at_fpr["0.1pct"],
                         "n_nonmembers": best.metrics.n_nonmembers})
        return rows

    def summary(self) -> str:
        rows = self.table_rows()
        n_non = rows[0]["n_nonmembers"]
        note = (f"TPR@0.1%FPR is measured on {n_non} non-members: the smallest non-zero FPR is "
                f"{100 / n_non:.2f}%, so it is the TPR at zero false positives." if n_non < 1000 else "")
        return "\n".join(filter(None, [summary_table(rows), note, f"MLflow parent run: {self.run_id}"]))


@contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _target_params(cfg: AuditConfig, plan_params: dict, report: TargetReport) -> dict:
    t = report.target
    return {
        **plan_params, "arch": t.model.arch, "defense": "none",
        "reference.count": cfg.reference.count, "reference.pkeep": cfg.reference.pkeep,
        "attacks.enabled": ",".join(cfg.attacks.enabled), "attacks.queries": ",".join(cfg.attacks.queries),
        "attacks.loo_targets": cfg.attacks.loo_targets,
        "attacker": "adaptive: reference models trained with the target's exact recipe",
        **flat_params("model.params", t.model.params), **flat_params("train", t.train.model_dump()),
        **flat_params("attacks", cfg.attacks.knobs().model_dump()),
    }


def _log_target(run: AuditRun, cfg: AuditConfig, report: TargetReport, params: dict,
                model_files: dict[str, bytes]) -> None:
    t = report.target
    scores = io.BytesIO()
    report.scores.to_parquet(scores, index=False)
    figures = {"plots/roc_loglog.png": roc_figure(report.attacks, f"{t.name}: attacks on the target"),
               "plots/score_histograms.png": score_histograms(report.attacks, f"{t.name}: member vs non-member")}
    with tempfile.TemporaryDirectory() as d:
        signals = report.pool.to_parquet(Path(d) / "pool.parquet")
        try:
            run.log_target(report, params=params, figures=figures, files={
                "scores/per_sample.parquet": scores.getvalue(), "signals/pool.parquet": signals, **model_files})
        finally:
            for fig in figures.values():
                close(fig)


def _model_files(plan: AuditPlan, cache: ModelCache, target_name: str) -> dict[str, bytes]:
    """The target's weights (safetensors) and architecture spec: loadable without unpickling code."""
    from safetensors.torch import save

    job = plan.job(target_name, "target")
    state = cache.load_model(job.key)
    spec = {"arch": job.target.model.arch, "params": job.target.model.params,
            "input_shape": list(plan.dataset.input_shape), "num_classes": plan.dataset.num_classes}
    files = {"model/spec.json": json.dumps(spec, indent=2).encode()}
    if state is not None:
        files["model/model.safetensors"] = save(state)
    return files


def run_audit(cfg: AuditConfig, *, echo: Callable[[str], None] | None = None) -> AuditOutcome:
    """Run the audit ``cfg`` end to end and return its outcome; progress lines go to ``echo`` (stderr)."""
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    quiet_defaults()
    timings: dict[str, float] = {}
    with _phase(timings, "data"):
        dataset = load_dataset(cfg.data.dataset, data_root=cfg.data.data_root, download=cfg.data.download,
                               path=cfg.data.path, params=cfg.data.params)
        plan = plan_audit(cfg, dataset)
    output_dir = cfg.output_dir.expanduser().resolve()
    cache = ModelCache(cfg.cache.uri or output_dir / "cache")
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    say(f"raymia {raymia.__version__}: audit '{cfg.name}' on {dataset.name} ({len(dataset)} samples, "
        f"split {plan.split.sizes()}); {len(cfg.targets)} targets x (1 + {cfg.reference.count} reference models) = "
        f"{len(plan.jobs)} models; cache {cache.uri}; tracking {tracking_uri}")
    with audit_run(cfg, tracking_uri) as run:
        split_file = plan.split.to_parquet(output_dir / run.run_id / "split.parquet")
        run.log_files({"split/split.parquet": split_file})
        plan_params = {"dataset": dataset.name, "seed": cfg.seed, "split_hash": plan.split.content_hash(),
                       "data_fingerprint": plan.split.data_fingerprint, "raymia_version": raymia.__version__}
        run.log_params({**plan_params, "ray_version": ray.__version__, "targets": ",".join(t.name for t in cfg.targets),
                        "reference.count": cfg.reference.count, "cache": cache.uri,
                        **{f"split.n_{role}": n for role, n in plan.split.sizes().items()}})
        with _phase(timings, "cache_lookup"):
            signals, missing = load_signals(plan, cache) if cfg.cache.reuse else ({}, list(plan.jobs))
        totals = {"trained": 0, "reused": len(signals)}
        if missing:
            with _phase(timings, "ray_start"):
                cluster = connect_ray(cfg.ray)
            try:
                resources = trial_resources(cfg.compute, cluster)
                say(f"Ray at {cluster.address} ({cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs); {len(missing)} models "
                    f"to produce, {len(signals)} from the cache; per trial {resources}")
                storage = cfg.ray.storage_path or str(output_dir / "ray_results")
                with _phase(timings, "training"):
                    done = produce_on_ray(plan, missing, cache, resources, cluster, storage_path=storage,
                                          experiment_name=f"{cfg.name}-{run.run_id}", echo=say)
                totals["trained"] = done["trained"]
                totals["reused"] += done["reused"]
            finally:
                with _phase(timings, "ray_shutdown"):
                    release_ray(cluster)
            signals, missing = load_signals(plan, cache)
            if missing:
                raise RuntimeError(f"{len(missing)} models have no outputs in the cache after training, e.g. "
                                   f"{missing[0].job_id}; is cache.uri reachable from every Ray node?")
        else:
            say(f"all {len(plan.jobs)} models found in the cache {cache.uri}; nothing to train")
        with _phase(timings, "attacks"):
            reports = [evaluate_pool(cfg, t, assemble_pool(plan, t, signals)) for t in cfg.targets]
        with _phase(timings, "tracking"):
            for report in reports:
                _log_target(run, cfg, report, _target_params(cfg, plan_params, report),
                            _model_files(plan, cache, report.target.name))
        run.log_metrics({**{f"time.{k}_s": v for k, v in timings.items()},
                         "models.trained": totals["trained"], "models.reused": totals["reused"]})
    return AuditOutcome(run.run_id, tracking_uri, reports, timings, totals)


def rescore_run(run_id: str, overrides: list[str] | None = None, *, tracking_uri: str | None = None,
                echo: Callable[[str], None] | None = None) -> AuditOutcome:
    """Re-score a finished audit from its stored signals (no training), optionally with new attack knobs.

    ``overrides`` may only touch ``attacks.*``. The result is a new parent run tagged
    ``raymia.rescored_from = run_id`` with one child per target, as an audit logs them.
    """
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    for item in overrides or []:
        if not item.startswith("attacks."):
            raise UserError(f"--set '{item}': rescoring can only change attacks.* (the models are fixed)")
    timings: dict[str, float] = {}
    uri = resolve_tracking_uri(TrackingConfig(uri=tracking_uri))
    with open_run(uri, run_id) as source, tempfile.TemporaryDirectory() as d:
        raw = source.config()
        cfg = parse_config(apply_overrides(raw, overrides or []), source=f"run {run_id} config")
        children = source.children()
        say(f"rescoring run {run_id}: {len(children)} targets from stored signals")
        with audit_run(cfg, uri, tags={"raymia.rescored_from": run_id}) as run:
            reports = []
            with _phase(timings, "attacks"):
                for child in children:
                    pool = PoolSignals.from_parquet(source.download(child.info.run_id, "signals/pool.parquet", d))
                    target = next(t for t in cfg.targets if t.name == child.info.run_name)
                    reports.append(evaluate_pool(cfg, target, pool))
            with _phase(timings, "tracking"):
                for report, child in zip(reports, children):
                    params = {k: v for k, v in child.data.params.items()
                              if not k.startswith("attacks") and k != "attacker"}
                    _log_target(run, cfg, report, {**_target_params(cfg, params, report), **params}, {})
            run.log_metrics({f"time.{k}_s": v for k, v in timings.items()})
    return AuditOutcome(run.run_id, uri, reports, timings, {"trained": 0, "reused": 0})

