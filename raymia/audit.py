"""Run one whole audit and report it: data -> plan -> the recipe per configuration -> MLflow -> decision.

Two modes, two functions, one result type: :func:`audit_targets` (the configurations listed under ``targets``)
and :func:`audit_sweep` (a ``sweep`` over defenses); :func:`run_audit` picks the one the config asks for.
Each runs on Ray (fan-out over the cluster) or, with ``local=True``, in this process without importing Ray;
either way every configuration is audited by :mod:`raymia.pipeline.recipe`. :func:`rescore_run` re-scores a
finished audit from its stored outputs.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import raymia
from raymia.cache import ModelCache
from raymia.data.datasets import Dataset
from raymia.data.queries import is_image
from raymia.config import (
    AuditConfig,
    FrontierConfig,
    TargetConfig,
    TrackingConfig,
    apply_overrides,
    parse_config,
)
from raymia.errors import UserError
from raymia.frontier import Point, choose_champion, leakage_of, pareto_front
from raymia.keys import content_key
from raymia.pipeline.cost import Cost, Progress, describe_cost, estimate_seconds, plan_cost
from raymia.pipeline.cost import calibrate as measure_rates
from raymia.pipeline.diffence_audit import load_diffusion_model
from raymia.pipeline.evaluate import TargetReport, evaluate_pool
from raymia.pipeline.factory import Builders, load_trained
from raymia.pipeline.plan import (
    AuditPlan,
    jobs_for_target,
    plan_audit,
    plugin_builders,
    sweep_targets,
)
from raymia.pipeline.recipe import (
    UtilityResult,
    audit_locally,
    phase,
    utility_configuration,
)
from raymia.quiet import quiet_defaults
from raymia.registry import ModelPackage, fetch_state_dict, model_package, unet_artifacts
from raymia.report import (close, figure_png, frontier_figure, html_report, privacy_summary, roc_png, summary_table,
                           vulnerable_figure)
from raymia.signals import PoolSignals
from raymia.tracking import (
    FRONTIER_PLOT,
    SIGNALS_FILE,
    SPLIT_FILE,
    TARGET_FILE,
    AuditRun,
    audit_note,
    audit_run,
    flat_params,
    open_run,
    resolve_tracking_uri,
    seed_spread,
    split_datasets,
    target_params,
)
from raymia.training.device import resolve_device

Echo = Callable[[str], None]


@dataclass(frozen=True)
class ModelCounts:
    """Models an audit trained and reused; Ray nodes its trials ran on (0 when local); sweep configurations
    restored from an interrupted run. ``None``: not known (a sweep's trials report only what they trained)."""

    trained: int
    reused: int | None = None
    nodes: int = 0
    restored: int | None = None
    train_flops: float | None = None  # counted training FLOPs of the models trained (raymia.pipeline.cost)


@dataclass(frozen=True)
class Decision:
    """The privacy-utility frontier over the audited configurations and the champion (with the reason)."""

    points: list[Point]
    front: list[Point]
    champion: tuple[Point, str] | None = None


@dataclass(frozen=True)
class AuditOutcome:
    """What an audit returns: the MLflow parent run, one report per audited configuration (``+diffence``
    variants included), utility-only results, seconds per phase, model counts and the decision."""

    run_id: str
    tracking_uri: str
    reports: list[TargetReport]
    timings: dict[str, float]
    models: ModelCounts
    utility: list[UtilityResult] = field(default_factory=list)
    decision: Decision | None = None
    report_path: Path | None = None
    frontier: FrontierConfig | None = None
    seed_spread: dict[str, dict[str, tuple[float, float, int]]] = field(default_factory=dict)  # name -> metric -> mean, sd, n

    @property
    def champion(self) -> tuple[Point, str] | None:
        return self.decision.champion if self.decision else None

    def table_rows(self) -> list[dict]:
        leak = {p.name: p for p in self.decision.points} if self.decision else {}
        front = {p.name for p in self.decision.front} if self.decision else set()
        rows = []
        for r in self.reports:
            best = r.best_attack()
            row = {"target": r.target.name, "test_acc": r.test_acc, "gap": r.gap, "best_attack": best.name,
                   "auc": best.metrics.auc, "auc_ci": best.metrics.auc_ci, "tpr": best.metrics.at_fpr["0.1pct"]}
            if r.target.name in leak and len(self.reports) > 1:
                row.update(leakage=leak[r.target.name].leakage, on_front=r.target.name in front)
            if r.target.name in self.seed_spread:
                row["seeds"] = self.seed_spread[r.target.name]["mia.best.auc"]
            rows.append(row)
        return rows

    def summary(self) -> str:
        if not self.reports:  # utility-only sweep: no attacks ran
            lines = [f"{u.target.name:<40} test acc {u.test_acc:.3f}" for u in self.utility]
            return "\n".join([*lines, f"MLflow parent run: {self.run_id}"])
        rows = self.table_rows()
        leak = ""
        if self.frontier is not None and "leakage" in rows[0]:
            who = "the strongest attack" if self.frontier.attack == "best" else self.frontier.attack
            leak = f"leakage = {self.frontier.leakage} of {who}; * = on the privacy-utility Pareto front."
        champ = f"champion: {self.champion[0].name} — {self.champion[1]}" if self.champion else ""
        report = f"report: {self.report_path}" if self.report_path else ""
        return "\n".join(filter(None, [summary_table(rows), leak, privacy_summary(self.reports), champ, report,
                                        f"MLflow parent run: {self.run_id}"]))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class _Started:
    """An audit under way: its config, plan, cache, MLflow parent run and the facts every child records."""

    cfg: AuditConfig
    plan: AuditPlan
    cache: ModelCache
    run: AuditRun
    tracking_uri: str
    output_dir: Path
    timings: dict[str, float]
    builders: Builders
    plan_params: dict[str, object]
    say: Echo
    targets: list[TargetConfig]  # the configurations to audit: ``targets``, or the sweep's, expanded
    datasets: list  # the MLflow dataset inputs every target run records (tracking.split_datasets)
    progress: Progress | None = None  # models done / total and an ETA, from the planned cost

    @property
    def device(self):  # noqa: ANN201 - a torch.device
        return resolve_device(self.cfg.compute.device)


def _ray_version() -> str:
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _with_registry_weights(cfg: AuditConfig, output_dir: Path, tracking_uri: str, say: Echo) -> AuditConfig:
    """``cfg`` with each ``model_uri`` target's weights fetched from MLflow into ``output_dir/given/`` (its
    ``weights``); the tracking store is also where the model is looked up."""
    if not any(t.model_uri for t in cfg.targets):
        return cfg
    targets = []
    for i, t in enumerate(cfg.targets):
        if t.model_uri is not None:
            dest = output_dir / "given" / f"{t.name}-{content_key({'uri': t.model_uri})[:12]}.safetensors"
            fetch_state_dict(t.model_uri, dest, tracking_uri=tracking_uri, allow_pickle=t.allow_pickle,
                             field=f"targets.{i}.model_uri", warn=say)
            t = t.model_copy(update={"weights": dest})
        targets.append(t)
    return cfg.model_copy(update={"targets": targets})


@contextmanager
def _start(cfg: AuditConfig, say: Echo, *, local: bool) -> Iterator[_Started]:
    """Load the data, plan, open the MLflow parent run and log the split and the audit's params."""
    quiet_defaults()
    timings: dict[str, float] = {}
    output_dir = cfg.output_dir.expanduser().resolve()
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    with phase(timings, "data"):
        cfg = _with_registry_weights(cfg, output_dir, tracking_uri, say)
        dataset = cfg.data.load()
        plan = plan_audit(cfg, dataset)
        builders = plugin_builders(cfg)
        targets = list(cfg.targets) if cfg.sweep is None else sweep_targets(cfg, dataset)
    cache = ModelCache(cfg.cache.uri or output_dir / "cache")
    what = (f"{len(cfg.targets)} targets x (1 + {cfg.reference.count} reference models) = {len(plan.jobs)} models"
            if cfg.sweep is None else f"a sweep over {len(cfg.sweep.defenses)} defense entries "
            f"(objective: {cfg.sweep.objective}), 1 + {cfg.reference.count} models per configuration")
    where = "in this process (no Ray)" if local else "on Ray"
    cost, runs = audit_cost(cfg, plan, targets), max(1, len(cfg.seeds))
    if (mismatch := plan.size_mismatch()) is not None:
        say(f"warning: {mismatch}")
    say(f"raymia {raymia.__version__}: audit '{cfg.name}' on {dataset.name} ({len(dataset)} samples, split "
        f"{plan.split.sizes()}); {what}; {where}; cache {cache.uri}; tracking {tracking_uri}")
    say(f"plan: {describe_cost(cost)}")
    with audit_run(cfg, tracking_uri) as run:
        split_file = plan.split.to_parquet(output_dir / run.run_id / "split.parquet")
        run.log_files({SPLIT_FILE: split_file})
        plan_params = {"dataset": dataset.name, "seed": cfg.seed, "split_hash": plan.split.content_hash(),
                       "data_fingerprint": plan.split.data_fingerprint, "raymia_version": raymia.__version__}
        run.log_params({**plan_params, "ray_version": _ray_version(), "mode": "sweep" if cfg.sweep else "targets",
                        "runner": "local" if local else "ray",
                        "targets": ",".join(t.name for t in cfg.targets), "reference.count": cfg.reference.count,
                        "cache": cache.uri, **{f"split.n_{role}": n for role, n in plan.split.sizes().items()}})
        run.log_metrics({"cost.models": cost.models, "cost.networks": cost.networks,
                         "cost.train_flops": cost.train_flops, "cost.query_flops": cost.query_flops})
        datasets = split_datasets(dataset.name, plan_params["split_hash"], plan.split.sizes(), dataset.input_shape,
                                  run.artifact_uri(SPLIT_FILE))
        yield _Started(cfg, plan, cache, run, tracking_uri, output_dir, timings, builders, plan_params, say, targets,
                       datasets, Progress(cost, runs))


def _model(s: _Started, report: TargetReport, unet) -> ModelPackage | None:  # noqa: ANN001 - a UNet or None
    """The configuration's MLflow model: the target's weights and spec and, for a ``+diffence`` report, the
    diffusion model with DIFFENCE's knobs and the interval it was audited with. Example inputs: test samples."""
    job = jobs_for_target(s.plan, report.target)[0]
    loaded = load_trained(job, s.plan.dataset, s.cache, s.builders)
    behind = (report.inference or {}).get("name") == "diffence" and unet is not None
    d = s.cfg.diffence
    return model_package(job.spec, s.plan.dataset.input_shape, s.plan.dataset.num_classes,
                         loaded[0].state_dict() if loaded else None, s.plan.dataset.x[s.plan.split["test"][:2]],
                         diffence=(unet, d, d.model, report.interval) if behind else None)


def _vulnerable_pngs(dataset: Dataset, reports: list[TargetReport]) -> dict[str, bytes]:
    """Each image target's most vulnerable samples as a PNG (label, the target's prediction, vulnerability)."""
    out = {}
    for r in reports:
        v = r.privacy.vulnerable if r.privacy is not None else None
        if v is None or not is_image(dataset.input_shape):
            continue
        top = v.top[:24]
        pos = np.searchsorted(r.pool.indices, v.rows[top])
        preds = r.pool.logits[r.pool.model("target"), pos, 0].argmax(-1)
        fig = vulnerable_figure(dataset.x[v.rows[top]], r.pool.labels[pos], preds, v.score[top],
                                f"{r.target.name}: most vulnerable samples (leave-one-out LiRA)")
        out[r.target.name] = figure_png(fig)
        close(fig)
    return out


def _decide(s: _Started, reports: list[TargetReport], child_ids: dict[str, str], rocs: dict[str, bytes]) -> Decision:
    """Frontier figure and table, ``report.html``, and the champion (registered in the MLflow Model Registry)."""
    cfg, run, say = s.cfg, s.run, s.say
    fr = cfg.frontier
    leak_name = f"{fr.leakage} of {'the strongest attack' if fr.attack == 'best' else fr.attack}"
    points = []
    for r in reports:
        leak, ci = leakage_of(r, fr)
        points.append(Point(r.target.name, r.target.defense.name, r.test_acc, leak, child_ids.get(r.target.name), ci))
    front = pareto_front(points)
    champion = choose_champion(points, cfg.champion, leak_name) if cfg.champion else None
    figure = frontier_figure(points, front, leak_name, champion[0] if champion else None)
    rows = [{"configuration": p.name, "defense": p.defense, "test_acc": p.test_acc, "leakage": p.leakage,
             "leakage_ci95": list(p.leakage_ci), "on_front": p in front, "champion": bool(champion and p == champion[0]), "run_id": p.run_id}
            for p in points]
    html = html_report(cfg.name, run.run_id, reports, rows, leak_name, {FRONTIER_PLOT: figure}, rocs, champion,
                       _vulnerable_pngs(s.plan.dataset, reports))
    report_dir = s.output_dir / run.run_id
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.html").write_text(html)
    (report_dir / "frontier.png").write_bytes(figure_png(figure))
    run.log_decision(html=html, rows=rows, figures={FRONTIER_PLOT: figure})
    if champion:
        win, why = champion
        version = run.register_champion(cfg.champion.registry_name, win.run_id)
        say(f"champion: {win.name} (child run {win.run_id}) — {why}; registered as "
            f"models:/{cfg.champion.registry_name}@champion (version {version})")
    return Decision(points, front, champion)


def _finish(s: _Started, *, reports: list[TargetReport], models: ModelCounts,
            utility: list[UtilityResult] | None = None, failed: list[tuple[str, str]] | None = None,
            repeats: list[list[TargetReport]] | None = None) -> AuditOutcome:
    """Log every configuration as a child run (with ``repeats``: the other seeds' reports of the same
    configurations, as nested runs and a mean ± sd on the child), decide, log the parent's metrics; the outcome."""
    cfg, run, failed, utility = s.cfg, s.run, failed or [], utility or []
    by_seed = {r.target.name: [r] for r in reports}
    for again in repeats or []:
        for r in again:
            by_seed.setdefault(r.target.name, []).append(r)
    unet = load_diffusion_model(s.plan, s.cache) if cfg.diffence is not None else None
    if unet is not None:
        run.log_files(unet_artifacts(unet))
        run.log_params(flat_params("diffence", cfg.diffence.model_dump(mode="json", exclude={"train", "model"})))
    child_ids: dict[str, str] = {}
    with phase(s.timings, "tracking"):
        rocs = {r.target.name: roc_png(r) for r in reports}
        vulnerable = _vulnerable_pngs(s.plan.dataset, reports)
        for report in reports:
            name = report.target.name
            child_ids[name] = run.log_target(report, params=target_params(cfg, report, s.plan_params),
                                             model=_model(s, report, unet), datasets=s.datasets, roc=rocs[name],
                                             vulnerable_png=vulnerable.get(name))
            if len(by_seed[name]) > 1:
                run.log_repeats(child_ids[name], by_seed[name], cfg.seeds)
        for result in utility:
            run.log_utility_child(result)
        for name, error in failed:
            run.log_failed_child(name, error)
    decision = None
    if reports:
        with phase(s.timings, "decision"):
            decision = _decide(s, reports, child_ids, rocs)
    rows = [{"configuration": p.name, "test_acc": p.test_acc, "leakage": p.leakage, "on_front": p in decision.front}
            for p in decision.points] if decision else []
    champ = (f"{decision.champion[0].name} ({decision.champion[1]}), registered as "
             f"`models:/{cfg.champion.registry_name}@champion`" if decision and decision.champion else None)
    run.describe(audit_note(cfg.name, s.plan.dataset.name, s.plan.split.sizes(), cfg.reference.count,
                            list(cfg.attacks.enabled), rows, champ))
    run.log_metrics({**{f"time.{k}_s": v for k, v in s.timings.items()}, "models.trained": models.trained,
                     **({"models.reused": models.reused} if models.reused is not None else {}),
                     **({"flops.trained": models.train_flops} if models.train_flops is not None else {}),
                     **({"configurations.restored": models.restored} if models.restored is not None else {}),
                     "configurations.failed": len(failed), "cluster.nodes_used": models.nodes})
    if failed:
        s.say(f"{len(failed)} configurations failed: " + "; ".join(f"{n}: {e.splitlines()[0]}" for n, e in failed))
    return AuditOutcome(run_id=run.run_id, tracking_uri=s.tracking_uri, reports=reports, timings=s.timings,
                        models=models, utility=utility, decision=decision,
                        seed_spread={n: seed_spread(rs) for n, rs in by_seed.items() if len(rs) > 1},
                        report_path=s.output_dir / run.run_id / "report.html" if reports else None,
                        frontier=cfg.frontier)


def _plans(s: _Started) -> Iterator[AuditPlan]:
    """The plan of every seed the audit runs: ``seeds`` (the first one reported), else just ``seed``."""
    yield s.plan
    for seed in s.cfg.seeds[1:]:
        # from the data as loaded: the first plan's dataset may carry that seed's relabelled canaries
        yield plan_audit(s.cfg.model_copy(update={"seed": seed}), s.cfg.data.load())


def _targets_once(s: _Started, plan: AuditPlan, *, local: bool, suffix: str
                  ) -> tuple[list[TargetReport], int, set, float]:
    """One seed of a targets audit: fan out on Ray (unless local), then the recipe per configuration."""
    nodes, trained, flops = set(), None, 0.0
    if not local:
        from raymia.orchestration.fanout import fan_out_audit
        from raymia.orchestration.session import ray_session

        with ray_session(s.cfg, s.timings, s.say) as session:
            totals = fan_out_audit(plan, s.cache, session, experiment_name=f"{s.cfg.name}-{s.run.run_id}{suffix}",
                                   builders=s.builders, timings=s.timings, echo=s.say, progress=s.progress)
        nodes, trained, flops = totals.nodes, totals.trained, totals.train_flops
    audits, _ = audit_locally(plan, s.targets, s.cache, device=s.device, builders=s.builders, timings=s.timings,
                              echo=s.say if local else lambda line: None, progress=s.progress if local else None)
    trained = sum(a.trained for a in audits) if trained is None else trained
    flops += sum(a.train_flops for a in audits)
    return [r for a in audits for r in a.reports], trained, nodes, flops


def audit_targets(cfg: AuditConfig, *, local: bool = False, echo: Echo | None = None) -> AuditOutcome:
    """Audit every configuration under ``targets`` (once per seed of ``seeds``): on Ray, the models are first
    produced in parallel on the cluster (whatever the cache lacks), then the recipe runs per configuration on the
    driver."""
    say = echo or _stderr
    with _start(cfg, say, local=local) as s:
        runs, trained, nodes, flops = [], 0, set(), 0.0
        for i, plan in enumerate(_plans(s)):
            if i:
                say(f"repeat {i + 1}/{len(cfg.seeds)}: seed {plan.config.seed}")
            reports, n, where, f = _targets_once(s, plan, local=local, suffix=f"-seed{plan.config.seed}" if i else "")
            runs.append(reports)
            trained, nodes, flops = trained + n, nodes | where, flops + f
        models = ModelCounts(trained=trained, reused=len(s.plan.jobs) * len(runs) - trained, nodes=len(nodes),
                             train_flops=flops)
        return _finish(s, reports=runs[0], repeats=runs[1:], models=models)


def sweep_experiment(cfg: AuditConfig) -> str:
    """The sweep's Tune experiment name: the same for the same sweep (tracking and Ray address aside), so that
    running an interrupted sweep's command again finds and resumes it."""
    return f"{cfg.name}-sweep-{content_key(cfg.model_dump(mode='json', exclude={'tracking', 'ray'}))[:16]}"


def audit_sweep(cfg: AuditConfig, *, local: bool = False, echo: Echo | None = None) -> AuditOutcome:
    """Audit (or, ``objective: utility``, only train) every configuration of the ``sweep``: one Ray Tune trial
    each, or one after another in this process; with ``seeds``, the same configurations once per seed."""
    say = echo or _stderr
    with _start(cfg, say, local=local) as s:
        if cfg.sweep.objective == "utility":
            if local:
                utility = [utility_configuration(s.plan, t, device=s.device, builders=s.builders) for t in s.targets]
                return _finish(s, reports=[], utility=utility, models=ModelCounts(trained=len(s.targets)))
            out = _sweep_on_ray(s, s.plan, "")
            return _finish(s, reports=[], utility=out.utility, failed=out.failed, models=_sweep_counts(s, [out]))
        runs, failed, outs = [], [], []
        for i, plan in enumerate(_plans(s)):
            if i:
                say(f"repeat {i + 1}/{len(cfg.seeds)}: seed {plan.config.seed}")
            if local:
                audits, fails = audit_locally(plan, s.targets, s.cache, device=s.device, builders=s.builders,
                                              timings=s.timings, echo=say, progress=s.progress)
                runs.append([r for a in audits for r in a.reports])
                outs.append((sum(a.trained for a in audits), sum(a.train_flops for a in audits)))
            else:
                out = _sweep_on_ray(s, plan, f"-seed{plan.config.seed}" if i else "")
                runs.append(out.reports)
                fails = out.failed
                outs.append(out)
            failed += fails if i == 0 else []
        models = (ModelCounts(trained=sum(n for n, _ in outs), train_flops=sum(f for _, f in outs)) if local
                  else _sweep_counts(s, outs))
        return _finish(s, reports=runs[0], repeats=runs[1:], failed=failed, models=models)


def _sweep_on_ray(s: _Started, plan: AuditPlan, suffix: str):  # noqa: ANN202 - a tune_sweep.SweepResults
    from raymia.orchestration.fanout import diffusion_model_on_ray
    from raymia.orchestration.session import ray_session, storage_path
    from raymia.orchestration.tune_sweep import run_sweep

    cfg = plan.config
    with ray_session(cfg, s.timings, s.say) as session:
        _, resources = session.connect("one Tune trial per configuration")
        if cfg.diffence is not None:
            diffusion_model_on_ray(plan, s.cache, session, experiment_name=f"{cfg.name}-{s.run.run_id}-diffusion{suffix}",
                                   echo=s.say)
        with phase(s.timings, "training"):
            return run_sweep(plan, s.targets, s.cache, resources, builders=s.builders, storage_path=storage_path(cfg),
                             experiment_name=sweep_experiment(cfg) + suffix, echo=s.say, token=s.run.run_id)


def _sweep_counts(s: _Started, outs: list) -> ModelCounts:
    finals = [f for out in outs for f in out.finals]
    mine = [f for f in finals if f.get("run_token") == s.run.run_id]  # not restored from an earlier driver
    return ModelCounts(trained=sum(int(f.get("trained", 0)) for f in mine),
                       nodes=len({f["node"] for f in finals if "node" in f}), restored=len(finals) - len(mine),
                       train_flops=sum(float(f.get("train_flops", 0.0)) for f in mine))


def audit_cost(cfg: AuditConfig, plan: AuditPlan, targets: list[TargetConfig]) -> Cost:
    """The planned work of every seed's plan (seeds differ in their canaries' coins, so in training sizes)."""
    cost = plan_cost(plan, targets)
    for seed in cfg.seeds[1:]:
        cost = cost + plan_cost(plan_audit(cfg.model_copy(update={"seed": seed}), cfg.data.load()), targets)
    return cost


def validate_audit(cfg: AuditConfig, *, source: str, calibrate: bool = True) -> str:
    """What ``raymia validate`` prints: the config is valid, its data loads and its plan builds; how many models
    it trains and queries, their counted FLOPs and (``calibrate``) a wall-time estimate from a short timed
    calibration on this machine."""
    quiet_defaults()
    dataset = cfg.data.load()
    plan = plan_audit(cfg, dataset)
    targets = list(cfg.targets) if cfg.sweep is None else sweep_targets(cfg, dataset)
    runs = max(1, len(cfg.seeds))
    cost = audit_cost(cfg, plan, targets)
    seconds = None
    if calibrate:
        seconds = estimate_seconds(cost, measure_rates(plan, targets[0], device=resolve_device(cfg.compute.device)))
    what = (f"{len(targets)} target configurations" if cfg.sweep is None
            else f"a sweep of {len(targets)} configurations from {len(cfg.sweep.defenses)} defense entries")
    lines = [f"{source}: OK ({what}, {cfg.reference.count} reference models each, {runs} seed(s); "
             f"{dataset.name}: {len(dataset)} samples, split {plan.split.sizes()})",
             f"attacks: {', '.join(cfg.attacks.enabled)}",
             f"cost: {describe_cost(cost, seconds)}"]
    if seconds is not None:
        lines.append(f"  (calibrated on {targets[0].name}'s architecture; on a Ray cluster with C CPUs expect about "
                     f"this x {os.cpu_count()} / C, plus a few seconds per Tune trial; cached models cost nothing)")
    if (mismatch := plan.size_mismatch()) is not None:
        lines.append(f"warning: {mismatch}")
    return "\n".join(lines)


def run_audit(cfg: AuditConfig, *, local: bool = False, echo: Echo | None = None) -> AuditOutcome:
    """Run the audit ``cfg`` end to end (``local``: in this process, without Ray); progress goes to ``echo``."""
    run = audit_targets if cfg.sweep is None else audit_sweep
    return run(cfg, local=local, echo=echo)


def rescore_run(run_id: str, overrides: list[str] | None = None, *, tracking_uri: str | None = None,
                echo: Echo | None = None) -> AuditOutcome:
    """Re-score a finished audit from its stored signals (no training), optionally with new attack knobs.

    ``overrides`` may only touch ``attacks.*``. The result is a new parent run tagged
    ``raymia.rescored_from = run_id`` with one child per target, as an audit logs them.
    """
    say = echo or _stderr
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
                    pool = PoolSignals.from_parquet(source.download(child.info.run_id, SIGNALS_FILE, d))
                    target_file = Path(source.download(child.info.run_id, TARGET_FILE, d))
                    target = TargetConfig.model_validate_json(target_file.read_text())
                    reports.append(evaluate_pool(cfg, target, pool))
            with phase(timings, "tracking"):
                for report, child in zip(reports, children):
                    params = {k: v for k, v in child.data.params.items()
                              if not k.startswith("attacks") and k != "attacker"}
                    run.log_target(report, params={**target_params(cfg, report, params), **params}, model=None,
                                   datasets=child.inputs.dataset_inputs)
            run.log_metrics({f"time.{k}_s": v for k, v in timings.items()})
    return AuditOutcome(run_id=run.run_id, tracking_uri=uri, reports=reports, timings=timings,
                        models=ModelCounts(trained=0, reused=0))
