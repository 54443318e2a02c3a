"""Run one whole audit: data -> plan -> Ray Tune training -> attacks -> MLflow -> summary table.

This is the only module that wires the layers together; ``raymia audit`` and ``jobs/audit.py`` call
:func:`run_audit`.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray

import raymia
from raymia.config import AuditConfig
from raymia.data.datasets import load_dataset
from raymia.orchestration.cluster import connect_ray, release_ray, trial_resources
from raymia.orchestration.fanout import train_on_ray
from raymia.pipeline.audit import AuditPlan, TargetReport, TrainedModel, evaluate_target, plan_audit
from raymia.report import close, roc_figure, score_histograms, summary_table
from raymia.tracking import AuditRun, audit_run, flat_params, resolve_tracking_uri


@dataclass(frozen=True)
class AuditOutcome:
    """What an audit returns: the MLflow parent run, one report per target, and seconds per phase."""

    run_id: str
    tracking_uri: str
    reports: list[TargetReport]
    timings: dict[str, float]

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


def _log_target(run: AuditRun, plan: AuditPlan, report: TargetReport, model: TrainedModel) -> None:
    cfg, t = plan.config, report.target
    from safetensors.torch import save

    params = {
        "dataset": plan.dataset.name, "arch": t.model.arch, "defense": "none", "seed": cfg.seed,
        "target_seed": plan.job(t.name, "target").seed, "split_hash": plan.split.content_hash(),
        "raymia_version": raymia.__version__, "shadows.count": cfg.shadows.count,
        "shadows.train_fraction": cfg.shadows.train_fraction, "attacks.enabled": ",".join(cfg.attacks.enabled),
        "attacker": "shadow models trained with the target's recipe",
        **flat_params("model.params", t.model.params), **flat_params("train", t.train.model_dump()),
        **flat_params("attacks.nn", cfg.attacks.nn.model_dump()),
    }
    scores = io.BytesIO()
    report.scores.to_parquet(scores, index=False)
    spec = {"arch": t.model.arch, "params": t.model.params, "input_shape": list(plan.dataset.input_shape),
            "num_classes": plan.dataset.num_classes}
    figures = {"plots/roc_loglog.png": roc_figure(report.attacks, f"{t.name}: attacks on the target"),
               "plots/score_histograms.png": score_histograms(report.attacks, f"{t.name}: member vs non-member")}
    try:
        run.log_target(report, params=params, figures=figures, files={
            "scores/per_sample.parquet": scores.getvalue(),
            "model/model.safetensors": save(model.state),
            "model/spec.json": json.dumps(spec, indent=2).encode(),
        })
    finally:
        for fig in figures.values():
            close(fig)


def run_audit(cfg: AuditConfig, *, echo: Callable[[str], None] | None = None) -> AuditOutcome:
    """Run the audit ``cfg`` end to end and return its outcome; progress lines go to ``echo`` (stderr)."""
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    timings: dict[str, float] = {}
    with _phase(timings, "data"):
        dataset = load_dataset(cfg.data.dataset, data_root=cfg.data.data_root, download=cfg.data.download,
                               path=cfg.data.path, params=cfg.data.params)
        plan = plan_audit(cfg, dataset)
    output_dir = cfg.output_dir.expanduser().resolve()
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    say(f"raymia {raymia.__version__}: audit '{cfg.name}' on {dataset.name} ({len(dataset)} samples, "
        f"split {plan.split.sizes()}); {len(cfg.targets)} targets x (1 + {cfg.shadows.count} shadows) = "
        f"{len(plan.jobs)} models; tracking {tracking_uri}")
    with audit_run(cfg, tracking_uri) as run:
        split_file = plan.split.to_parquet(output_dir / run.run_id / "split.parquet")
        run.log_files({"split/split.parquet": split_file})
        run.log_params({"dataset": dataset.name, "seed": cfg.seed, "split_hash": plan.split.content_hash(),
                        "data_fingerprint": plan.split.data_fingerprint, "raymia_version": raymia.__version__,
                        "ray_version": ray.__version__, "targets": ",".join(t.name for t in cfg.targets),
                        "shadows.count": cfg.shadows.count,
                        **{f"split.n_{role}": n for role, n in plan.split.sizes().items()}})
        with _phase(timings, "ray_start"):
            cluster = connect_ray(cfg.ray)
        try:
            resources = trial_resources(cfg.compute, cluster)
            say(f"Ray at {cluster.address} ({cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs); "
                f"per trial {resources}")
            storage = cfg.ray.storage_path or str(output_dir / "ray_results")
            with _phase(timings, "training"):
                models = train_on_ray(plan, resources, storage_path=storage, experiment_name=f"{cfg.name}-{run.run_id}",
                                      device=cfg.compute.device, max_concurrent_trials=cfg.compute.max_concurrent_trials,
                                      echo=say)
        finally:
            with _phase(timings, "ray_shutdown"):
                release_ray(cluster)
        with _phase(timings, "attacks"):
            reports = [evaluate_target(plan, t, models) for t in cfg.targets]
        with _phase(timings, "tracking"):
            for report in reports:
                _log_target(run, plan, report, models[plan.job(report.target.name, "target").job_id])
        run.log_metrics({f"time.{k}_s": v for k, v in timings.items()})
    return AuditOutcome(run.run_id, tracking_uri, reports, timings)
