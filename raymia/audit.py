"""Run one whole audit: data -> plan -> models (cache, Ray Tune) -> attacks -> MLflow -> summary table.

This is the only module that wires the layers together; ``raymia audit`` and ``jobs/audit.py`` call
:func:`run_audit`, ``raymia rescore`` calls :func:`rescore_run`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from torch import nn

import raymia
from raymia.cache import ModelCache, content_key
from raymia.config import AuditConfig, FrontierConfig, TargetConfig, TrackingConfig, apply_overrides, parse_config
from raymia.defenses import make_defense
from raymia.errors import UserError
from raymia.orchestration.session import phase, ray_session, storage_path
from raymia.orchestration.fanout import group_jobs, plugin_builders, produce_on_ray, run_tasks, trial_slots
from raymia.pipeline.diffence_audit import (calibrate, diffence_report, diffusion_artifacts, ensure_diffusion_model,
                                            load_diffusion_model, produce_diffence_signals)
from raymia.training.device import resolve_device
from raymia.frontier import Point, choose_champion, leakage_of, pareto_front
from raymia.orchestration.sweep import check_sweep, run_sweep
from raymia.pipeline.audit import (AuditPlan, TargetReport, assemble_pool, evaluate_pool, jobs_for_target,
                                   load_signals, plan_audit)
from raymia.quiet import quiet_defaults
from raymia.report import close, figure_png, frontier_figure, html_report, roc_figure, score_histograms, summary_table
from raymia.signals import PoolSignals
from raymia.tracking import AuditRun, audit_run, flat_params, open_run, register_champion, resolve_tracking_uri


@dataclass(frozen=True)
class AuditOutcome:
    """What an audit returns: the MLflow parent run, one report per target, seconds per phase, cache use."""

    run_id: str
    tracking_uri: str
    reports: list[TargetReport]
    timings: dict[str, float]
    models: dict[str, int]
    champion: tuple[Point, str] | None = None
    utility: list[dict] = dataclasses.field(default_factory=list)
    report_path: Path | None = None
    points: list[Point] = dataclasses.field(default_factory=list)
    front: list[Point] = dataclasses.field(default_factory=list)
    frontier: FrontierConfig | None = None

    def table_rows(self) -> list[dict]:
        leak = {p.name: p for p in self.points}
        front = {p.name for p in self.front}
        rows = []
        for r in self.reports:
            best = r.best_attack()
            row = {"target": r.target.name, "test_acc": r.test_acc, "gap": r.gap, "best_attack": best.name,
                   "auc": best.metrics.auc, "tpr_at_0.1pct_fpr": best.metrics.tpr_at_fpr["0.1pct"],
                   "n_nonmembers": best.metrics.n_nonmembers}
            if r.target.name in leak and len(self.reports) > 1:
                row.update(leakage=leak[r.target.name].leakage, on_front=r.target.name in front)
            rows.append(row)
        return rows

    def summary(self) -> str:
        if not self.reports:  # utility-only sweep: no attacks ran
            lines = [f"{u['target']:<40} test acc {u.get('test_acc', float('nan')):.3f}" for u in self.utility]
            return "\n".join([*lines, f"MLflow parent run: {self.run_id}"])
        rows = self.table_rows()
        n_non = rows[0]["n_nonmembers"]
        note = (f"TPR@0.1%FPR is measured on {n_non} non-members: the smallest non-zero FPR is "
                f"{100 / n_non:.2f}%, so it is the TPR at zero false positives." if n_non < 1000 else "")
        leak = ""
        if self.frontier is not None and "leakage" in rows[0]:
            who = "the strongest attack" if self.frontier.attack == "best" else self.frontier.attack
            leak = f"leakage = {self.frontier.leakage} of {who}; * = on the privacy-utility Pareto front."
        champ = f"champion: {self.champion[0].name} — {self.champion[1]}" if self.champion else ""
        report = f"report: {self.report_path}" if self.report_path else ""
        return "\n".join(filter(None, [summary_table(rows), note, leak, champ, report,
                                        f"MLflow parent run: {self.run_id}"]))


def _target_params(cfg: AuditConfig, plan_params: dict, report: TargetReport) -> dict:
    t = report.target
    return {
        **plan_params, "arch": t.model.arch, "defense": t.defense.name,
        "inference_defense": (report.inference or {}).get("name", "none"),
        **flat_params("inference", {k: v for k, v in (report.inference or {}).items() if k != "name"}),
        **flat_params("defense", t.defense.model_dump(exclude={"name"})),
        "reference.count": cfg.reference.count, "reference.pkeep": cfg.reference.pkeep,
        "attacks.enabled": ",".join(cfg.attacks.enabled), "attacks.queries": ",".join(cfg.attacks.queries),
        "attacks.loo_targets": cfg.attacks.loo_targets,
        "attacker": "adaptive: reference models trained with the target's exact recipe",
        **flat_params("model.params", t.model.params), **flat_params("train", t.train.model_dump()),
        **flat_params("attacks", cfg.attacks.knobs().model_dump()),
    }


def _log_target(run: AuditRun, cfg: AuditConfig, report: TargetReport, params: dict,
                model_files: dict[str, bytes]) -> str:
    t = report.target
    scores = io.BytesIO()
    report.scores.to_parquet(scores, index=False)
    figures = {"plots/roc_loglog.png": roc_figure(report.attacks, f"{t.name}: attacks on the target"),
               "plots/score_histograms.png": score_histograms(report.attacks, f"{t.name}: member vs non-member")}
    with tempfile.TemporaryDirectory() as d:
        signals = report.pool.to_parquet(Path(d) / "pool.parquet")
        try:
            return run.log_target(report, params=params, figures=figures, files={
                "scores/per_sample.parquet": scores.getvalue(), "signals/pool.parquet": signals, **model_files})
        finally:
            for fig in figures.values():
                close(fig)


def _model_files(plan: AuditPlan, cache: ModelCache, target: TargetConfig) -> dict[str, bytes]:
    """The target's weights (safetensors) and architecture spec: loadable without unpickling code."""
    from safetensors.torch import save

    job = jobs_for_target(plan, target)[0]
    cached = cache.load_model(job.key)
    model = make_defense(target.defense).model_spec(target.model)
    spec = {"arch": model.arch, "params": model.params, "input_shape": list(plan.dataset.input_shape),
            "num_classes": plan.dataset.num_classes}
    files = {"model/spec.json": json.dumps(spec, indent=2).encode()}
    if cached is not None:
        files["model/model.safetensors"] = save(cached[0])
    return files


def _produce_targets(plan: AuditPlan, cache: ModelCache, cfg: AuditConfig, run: AuditRun, timings: dict[str, float],
                     say: Callable[[str], None]) -> tuple[list[TargetReport], dict[str, int]]:
    """Audit mode: reuse cached models, train the rest in groups per Tune trial, attack each target here."""
    with phase(timings, "cache_lookup"):
        signals, missing = load_signals(plan, cache) if cfg.cache.reuse else ({}, list(plan.jobs))
    totals: dict = {"trained": 0, "reused": len(signals), "nodes": set()}
    if missing:
        what = f"{len(missing)} models to produce, {len(signals)} from the cache"
        with ray_session(cfg, timings, say, what) as (cluster, res):
            with phase(timings, "training"):
                done = produce_on_ray(plan, missing, cache, res, cluster, storage_path=storage_path(cfg),
                                      experiment_name=f"{cfg.name}-{run.run_id}", echo=say)
        totals["trained"], totals["reused"] = done["trained"], totals["reused"] + done["reused"]
        totals["nodes"] = done["nodes"]
        signals, missing = load_signals(plan, cache)
        if missing:
            raise RuntimeError(f"{len(missing)} models have no outputs in the cache after training, e.g. "
                               f"{missing[0].job_id}; is cache.uri reachable from every Ray node?")
    else:
        say(f"all {len(plan.jobs)} models found in the cache {cache.uri}; nothing to train")
    with phase(timings, "attacks"):
        reports = [evaluate_pool(cfg, t, assemble_pool(plan, t, signals)) for t in cfg.targets]
    return reports, totals


def _timed(fn: Callable[[], object]) -> Callable[[], dict]:
    def run() -> dict:
        start = time.perf_counter()
        fn()
        return {"seconds": time.perf_counter() - start}
    return run


def _ensure_diffusion_on_ray(plan: AuditPlan, cache: ModelCache, cfg: AuditConfig, resources: dict, run: AuditRun,
                             say: Callable[[str], None]) -> nn.Module:
    """The audit's diffusion model: from the cache, or trained as a Tune trial (which stores it there) first."""
    unet = load_diffusion_model(plan, cache)
    if unet is not None:
        return unet
    say(f"training the diffusion model ({cfg.diffence.train.steps} steps) for DIFFENCE")
    device = cfg.compute.device
    run_tasks({"diffusion-model": _timed(lambda: ensure_diffusion_model(plan, cache, device=resolve_device(device)))},
              resources, storage_path=storage_path(cfg), experiment_name=f"{cfg.name}-{run.run_id}-diffusion", echo=say)
    unet = load_diffusion_model(plan, cache)
    if unet is None:
        raise RuntimeError("the diffusion model is not in the cache after training; is cache.uri reachable from "
                           "every Ray node?")
    return unet


def _diffence_variants(plan: AuditPlan, cache: ModelCache, cfg: AuditConfig, run: AuditRun,
                       timings: dict[str, float], say: Callable[[str], None], builders: dict
                       ) -> tuple[list[TargetReport], nn.Module]:
    """Audit every target again through DIFFENCE: diffusion model, calibration, every model's outputs, attacks.
    Returns the reports and the diffusion model."""
    with ray_session(cfg, timings, say, "DIFFENCE outputs") as (cluster, resources):
        with phase(timings, "diffence"):
            unet = _ensure_diffusion_on_ray(plan, cache, cfg, resources, run, say)
            intervals = {t.name: calibrate(plan, jobs_for_target(plan, t)[0], unet, cache, builders=builders)
                         for t in cfg.targets}
            groups = group_jobs(plan.jobs, slots=trial_slots(cluster, resources), models_per_trial=None)
            device = cfg.compute.device
            tasks = {f"{g[0].target.name}#{i}": _timed(lambda g=g: produce_diffence_signals(
                g, plan, unet, intervals[g[0].target.name], cache, device=resolve_device(device), builders=builders))
                for i, g in enumerate(groups)}
            run_tasks(tasks, resources, storage_path=storage_path(cfg), experiment_name=f"{cfg.name}-{run.run_id}-diffence",
                      echo=say)
    with phase(timings, "attacks"):
        return [diffence_report(plan, t, intervals[t.name], cache) for t in cfg.targets], unet


def _decide(run: AuditRun, cfg: AuditConfig, reports: list[TargetReport], child_ids: dict[str, str],
            report_dir: Path, say: Callable[[str], None]) -> tuple[list[Point], list[Point], tuple[Point, str] | None]:
    """Frontier figure and table, ``report.html``, and the champion (registered in the MLflow Model Registry)."""
    fr = cfg.frontier
    leak_name = f"{fr.leakage} of {'the strongest attack' if fr.attack == 'best' else fr.attack}"
    points = [Point(r.target.name, r.target.defense.name, r.test_acc, leakage_of(r, fr), child_ids.get(r.target.name))
              for r in reports]
    front = pareto_front(points)
    champion = choose_champion(points, cfg.champion, leak_name) if cfg.champion else None
    figures = {"plots/frontier.png": frontier_figure(points, front, leak_name, champion[0] if champion else None)}
    rows = [{"configuration": p.name, "defense": p.defense, "test_acc": p.test_acc, "leakage": p.leakage,
             "on_front": p in front, "champion": bool(champion and p == champion[0]), "run_id": p.run_id}
            for p in points]
    html = html_report(cfg.name, run.run_id, reports, rows, leak_name, figures, champion)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.html").write_text(html)
    (report_dir / "frontier.png").write_bytes(figure_png(figures["plots/frontier.png"]))
    for path, fig in figures.items():
        run.client.log_figure(run.run_id, fig, path)
        close(fig)
    run.log_files({"report.html": html.encode(), "frontier.json": json.dumps(rows, indent=2).encode()})
    if champion:
        win, why = champion
        version = register_champion(run, cfg.champion.registry_name, win.run_id)
        say(f"champion: {win.name} (child run {win.run_id}) — {why}; registered as "
            f"models:/{cfg.champion.registry_name}@champion (version {version})")
    return points, front, champion


def sweep_experiment(cfg: AuditConfig) -> str:
    """The sweep's Tune experiment name: the same for the same sweep (tracking and Ray address aside), so that
    running an interrupted sweep's command again finds and resumes it."""
    return f"{cfg.name}-sweep-{content_key(cfg.model_dump(mode='json', exclude={'tracking', 'ray'}))[:16]}"


def run_audit(cfg: AuditConfig, *, echo: Callable[[str], None] | None = None) -> AuditOutcome:
    """Run the audit ``cfg`` end to end and return its outcome; progress lines go to ``echo`` (stderr)."""
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    quiet_defaults()
    timings: dict[str, float] = {}
    with phase(timings, "data"):
        dataset = cfg.data.load()
        plan = plan_audit(cfg, dataset)
        if cfg.sweep is not None:
            check_sweep(plan)
    output_dir = cfg.output_dir.expanduser().resolve()
    cache = ModelCache(cfg.cache.uri or output_dir / "cache")
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    what = (f"{len(cfg.targets)} targets x (1 + {cfg.reference.count} reference models) = {len(plan.jobs)} models"
            if cfg.sweep is None else f"a sweep over {len(cfg.sweep.defenses)} defense entries "
            f"(objective: {cfg.sweep.objective}), 1 + {cfg.reference.count} models per configuration")
    say(f"raymia {raymia.__version__}: audit '{cfg.name}' on {dataset.name} ({len(dataset)} samples, split "
        f"{plan.split.sizes()}); {what}; cache {cache.uri}; tracking {tracking_uri}")
    with audit_run(cfg, tracking_uri) as run:
        split_file = plan.split.to_parquet(output_dir / run.run_id / "split.parquet")
        run.log_files({"split/split.parquet": split_file})
        plan_params = {"dataset": dataset.name, "seed": cfg.seed, "split_hash": plan.split.content_hash(),
                       "data_fingerprint": plan.split.data_fingerprint, "raymia_version": raymia.__version__}
        run.log_params({**plan_params, "ray_version": ray.__version__, "mode": "sweep" if cfg.sweep else "targets",
                        "targets": ",".join(t.name for t in cfg.targets), "reference.count": cfg.reference.count,
                        "cache": cache.uri, **{f"split.n_{role}": n for role, n in plan.split.sizes().items()}})
        failed: list[tuple[str, str]] = []
        finals: list[dict] = []
        builders = plugin_builders(plan)
        unet = None
        if cfg.sweep is None:
            reports, totals = _produce_targets(plan, cache, cfg, run, timings, say)
            if cfg.diffence is not None:
                defended, unet = _diffence_variants(plan, cache, cfg, run, timings, say, builders)
                reports += defended
        else:
            with ray_session(cfg, timings, say, "one Tune trial per configuration") as (cluster, resources):
                if cfg.diffence is not None:
                    unet = _ensure_diffusion_on_ray(plan, cache, cfg, resources, run, say)
                with phase(timings, "training"):
                    reports, finals, failed = run_sweep(plan, cache, resources, storage_path=storage_path(cfg),
                                                        experiment_name=sweep_experiment(cfg), echo=say,
                                                        token=run.run_id)
            mine = [f for f in finals if f.get("run_token") == run.run_id]  # not restored from an earlier driver
            totals = {"trained": sum(int(f.get("trained", 0)) for f in mine), "reused": -1,
                      "nodes": {f["node"] for f in finals if "node" in f},
                      "restored": len(finals) - len(mine)}
        if unet is not None:
            run.log_files(diffusion_artifacts(unet))
            run.log_params(flat_params("diffence", cfg.diffence.model_dump(mode="json", exclude={"train", "model"})))
        child_ids: dict[str, str] = {}
        with phase(timings, "tracking"):
            for report in reports:
                child_ids[report.target.name] = _log_target(run, cfg, report, _target_params(cfg, plan_params, report),
                                                            _model_files(plan, cache, report.target))
            if cfg.sweep is not None and cfg.sweep.objective == "utility":
                for final in finals:
                    run.log_utility_child(final["target"], final)
            for name, error in failed:
                run.log_failed_child(name, error)
        champion, points, front = None, [], []
        if reports:
            with phase(timings, "decision"):
                points, front, champion = _decide(run, cfg, reports, child_ids, output_dir / run.run_id, say)
        run.log_metrics({**{f"time.{k}_s": v for k, v in timings.items()}, "models.trained": totals["trained"],
                         **({"models.reused": totals["reused"]} if totals["reused"] >= 0 else {}),
                         **({"configurations.restored": totals["restored"]} if "restored" in totals else {}),
                         "configurations.failed": len(failed), "cluster.nodes_used": len(totals["nodes"])})
        if failed:
            say(f"{len(failed)} configurations failed: " + "; ".join(f"{n}: {e.splitlines()[0]}" for n, e in failed))
    return AuditOutcome(run.run_id, tracking_uri, reports, timings, totals, champion, finals,
                        output_dir / run.run_id / "report.html", points, front, cfg.frontier)


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
            with phase(timings, "attacks"):
                for child in children:
                    pool = PoolSignals.from_parquet(source.download(child.info.run_id, "signals/pool.parquet", d))
                    target_file = Path(source.download(child.info.run_id, "target.json", d))
                    target = TargetConfig.model_validate_json(target_file.read_text())
                    reports.append(evaluate_pool(cfg, target, pool))
            with phase(timings, "tracking"):
                for report, child in zip(reports, children):
                    params = {k: v for k, v in child.data.params.items()
                              if not k.startswith("attacks") and k != "attacker"}
                    _log_target(run, cfg, report, {**_target_params(cfg, params, report), **params}, {})
            run.log_metrics({f"time.{k}_s": v for k, v in timings.items()})
    return AuditOutcome(run.run_id, uri, reports, timings, {"trained": 0, "reused": 0})

