"""Run one diffusion-model privacy audit: data -> plan -> DDPMs (cache, Ray Tune) -> attacks + FID -> MLflow.

``raymia diffusion-audit`` and ``jobs/diffusion_audit.py`` call :func:`run_diffusion_audit`. Training runs as
Ray Tune trials in two stages (the undefended model and both teachers in parallel, then DistillMD's student);
attacks, sampling and FID run here on the results in the cache. MLflow gets a parent run and one child run per
system (``undefended``, ``dualmd``, ``distillmd``) with the metrics documented in the README.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import raymia
from raymia.cache import ModelCache
from raymia.config import DiffusionAuditConfig
from raymia.orchestration.fanout import run_tasks
from raymia.orchestration.session import phase, ray_session, storage_path
from raymia.pipeline.diffusion_audit import (DiffusionPlan, SystemReport, build_systems, evaluate_system,
                                             feature_extractor, plan_diffusion_audit, real_data_fid, train_job)
from raymia.quiet import quiet_defaults
from raymia.report import close, figure_png, plt, roc_figure
from raymia.tracking import AuditRun, audit_run, flat_params, resolve_tracking_uri
from raymia.training.device import resolve_device

PROTOCOL = {
    "mia.<attack>.*": "each attack at its configured timestep (attacks.loss_t / secmi_t / pia_t), fixed before "
                      "seeing any score: the number to report",
    "mia.<attack>.best_of_grid.*": "the best AUC over attacks.t_grid, chosen on the audited scores: an oracle, "
                                   "an upper bound (as PIA's published numbers)",
    "asr": "best balanced accuracy over thresholds swept on the audited scores (oracle)",
    "tpr_at_fpr": "threshold swept over the audited scores",
}


@dataclass
class DiffusionOutcome:
    run_id: str
    tracking_uri: str
    reports: list[SystemReport]
    timings: dict[str, float]
    real_fid: float
    report_path: Path

    def summary(self) -> str:
        attacks = list(self.reports[0].attacks)
        fid_name = self.reports[0].fid_name
        head = f"{'system':<12}" + "".join(f"{a + ' AUC':>11}" for a in attacks) + f"{fid_name:>11}"
        lines = [head, "-" * len(head)]
        for r in self.reports:
            lines.append(f"{r.name:<12}" + "".join(f"{r.attacks[a].metrics.auc:>11.3f}" for a in attacks)
                         + f"{r.fid:>11.3f}")
        lines.append(f"{fid_name} of real unseen images (the floor at this sample size): {self.real_fid:.3f}")
        lines += [f"report: {self.report_path}", f"MLflow parent run: {self.run_id}"]
        return "\n".join(lines)


def system_metrics(report: SystemReport) -> dict[str, float]:
    """The documented metric names of one system's child run."""
    def of(prefix: str, attacks: dict) -> dict[str, float]:
        m = {}
        for name, a in attacks.items():
            m[f"{prefix}{name}.auc"] = a.metrics.auc
            m[f"{prefix}{name}.asr"] = a.metrics.best_bal_acc
            for level in ("1pct", "0.1pct"):
                m[f"{prefix}{name}.tpr_at_{level}_fpr"] = a.metrics.tpr_at_fpr[level]
        return m

    m = of("mia.", report.attacks)
    for name, (t, auc) in report.best_of_grid().items():
        m[f"mia.{name}.best_of_grid.auc"], m[f"mia.{name}.best_of_grid.t"] = auc, float(t)
        m.update({f"mia.{name}.grid.t{t}.auc": v for t, v in report.grid[name].items()})
    best = report.strongest()
    m["mia.best.auc"], m["mia.best.tpr_at_1pct_fpr"] = best.metrics.auc, best.metrics.tpr_at_fpr["1pct"]
    for part, attacks in report.parts.items():
        m.update(of(f"{part}.mia.", attacks))
    m[report.fid_name] = report.fid
    m["mia.n_members"], m["mia.n_nonmembers"] = (best.metrics.n_members, best.metrics.n_nonmembers)
    return m


def sample_grid(images: torch.Tensor, title: str) -> Any:
    """Up to 64 images ``[n, C, H, W]`` in [0, 1] as one figure."""
    n = min(len(images), 64)
    side = math.ceil(math.sqrt(n))
    fig, axes = plt.subplots(side, side, figsize=(side * 0.6, side * 0.6 + 0.4))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
    fig.suptitle(title, fontsize=8)
    return fig


def _html(cfg: DiffusionAuditConfig, run_id: str, reports: list[SystemReport], real_fid: float) -> str:
    def img(fig: Any) -> str:
        data = base64.b64encode(figure_png(fig)).decode()
        close(fig)
        return f'<img src="data:image/png;base64,{data}">'

    attacks = list(reports[0].attacks)
    head = ["system", *[f"{a} AUC (best-of-grid)" for a in attacks], "TPR@1%FPR (strongest)", reports[0].fid_name]
    rows = []
    for r in reports:
        grid = r.best_of_grid()
        cells = [r.name, *[f"{r.attacks[a].metrics.auc:.3f} ({grid[a][1]:.3f} at t={grid[a][0]})" if a in grid
                           else f"{r.attacks[a].metrics.auc:.3f}" for a in attacks],
                 f"{r.strongest().metrics.tpr_at_fpr['1pct']:.3f}", f"{r.fid:.3f}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    body = [f"<h1>raymia diffusion audit: {html.escape(cfg.name)}</h1>",
            f"<p>MLflow parent run <code>{run_id}</code>. White-box attacks on members vs non-members; AUC at each "
            "attack's configured timestep, in brackets the best over the t-grid (an oracle). "
            f"{html.escape(reports[0].fid_name)} against held-out real images; real unseen images score "
            f"{real_fid:.3f}.</p>",
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"]
    for r in reports:
        body.append(f"<h2>{html.escape(r.name)}</h2>")
        body.append(img(roc_figure(r.attacks, f"{r.name}: white-box attacks")))
        body.append(img(sample_grid(r.samples, f"{r.name}: samples")))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;font-size:13px}img{max-width:560px;display:inline-block;margin:0.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>raymia: {html.escape(cfg.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def _train(plan: DiffusionPlan, cache: ModelCache, cfg: DiffusionAuditConfig, run: AuditRun,
           timings: dict[str, float], say: Callable[[str], None]) -> dict[str, float]:
    """Train what the cache lacks as Tune trials, stage by stage; returns seconds per trained model."""
    seconds: dict[str, float] = {}
    missing = [[j for j in stage if not cache.has_model(j.key)] for stage in plan.stages()]
    if not any(missing):
        say(f"all {len(plan.jobs)} diffusion models found in the cache {cache.uri}; nothing to train")
        return seconds
    device = cfg.compute.device
    with ray_session(cfg, timings, say, f"{sum(map(len, missing))} diffusion models to train") as (cluster, res):
        with phase(timings, "training"):
            for i, stage in enumerate(missing):
                if not stage:
                    continue
                tasks = {j.name: (lambda name=j.name: train_job(plan, name, cache, device=resolve_device(device)))
                         for j in stage}
                stage_res = res
                if len(stage) == 1 and res.get("gpu", 0) == 0 and cfg.compute.cpus_per_trial == 1:
                    stage_res = {**res, "cpu": cluster.cpus}  # a lone trial may use every core
                done = run_tasks(tasks, stage_res, storage_path=storage_path(cfg),
                                 experiment_name=f"{cfg.name}-{run.run_id}-stage{i + 1}", echo=say)
                seconds.update({name: float(m["seconds"]) for name, m in done.items()})
    for stage in missing:
        for j in stage:
            if not cache.has_model(j.key):
                raise RuntimeError(f"diffusion model '{j.name}' is not in the cache after training; is cache.uri "
                                   "reachable from every Ray node?")
    return seconds


def run_diffusion_audit(cfg: DiffusionAuditConfig, *, echo: Callable[[str], None] | None = None) -> DiffusionOutcome:
    """Run the diffusion audit ``cfg`` end to end; progress lines go to ``echo`` (stderr)."""
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    quiet_defaults()
    timings: dict[str, float] = {}
    with phase(timings, "data"):
        dataset = cfg.data.load()
        plan = plan_diffusion_audit(cfg, dataset)
    output_dir = cfg.output_dir.expanduser().resolve()
    cache = ModelCache(cfg.cache.uri or output_dir / "cache")
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    sizes = {r: len(v) for r, v in plan.roles.items()}
    say(f"raymia {raymia.__version__}: diffusion audit '{cfg.name}' on {dataset.name} {sizes}, halves "
        f"{len(plan.halves[0])}/{len(plan.halves[1])}; systems {', '.join(cfg.defenses.enabled)}; "
        f"{len(plan.jobs)} DDPMs ({cfg.train.steps} steps each); cache {cache.uri}; tracking {tracking_uri}")
    with audit_run(cfg, tracking_uri, tags={"raymia.kind": "diffusion-audit"}) as run:
        run.log_params({"dataset": dataset.name, "seed": cfg.seed, "data_fingerprint": dataset.fingerprint(),
                        **{f"split.n_{r}": n for r, n in sizes.items()}, "split.n_d1": len(plan.halves[0]),
                        "split.n_d2": len(plan.halves[1]), "systems": ",".join(cfg.defenses.enabled),
                        **flat_params("model", cfg.model.model_dump(mode="json")),
                        **flat_params("train", cfg.train.model_dump(mode="json")),
                        **flat_params("attacks", cfg.attacks.model_dump(mode="json")),
                        **flat_params("sampling", cfg.sampling.model_dump(mode="json"))})
        trained = _train(plan, cache, cfg, run, timings, say)
        device = resolve_device(cfg.compute.device)
        with phase(timings, "evaluation"):
            systems = build_systems(plan, cache, device)
            features, fid_name, facts = feature_extractor(plan, device)
            real_fid = real_data_fid(plan, features)
            reports = []
            for system in systems.values():
                reports.append(evaluate_system(plan, system, features, fid_name, device=device))
                r = reports[-1]
                say(f"  {r.name}: " + ", ".join(f"{a} AUC {v.metrics.auc:.3f}" for a, v in r.attacks.items())
                    + f"; {fid_name} {r.fid:.3f}  ({r.seconds:.1f} s)")
        with phase(timings, "tracking"):
            models = {"undefended": "undefended", "dualmd": "teacher1+teacher2", "distillmd": "student"}
            for r in reports:
                params = {"system": r.name, "models": models[r.name], "fid_metric": fid_name,
                          **({"student_recipe": (cfg.defenses.student or cfg.train).model_dump_json()}
                             if r.name == "distillmd" else {})}
                with run.child(r.name, params=params, tags={"raymia.kind": "diffusion-system",
                                                            "t_selection": PROTOCOL["mia.<attack>.*"]}) as child:
                    run.log_metrics(system_metrics(r), child)
                    run.client.log_figure(child, roc_figure(r.attacks, f"{r.name}: white-box attacks"),
                                          "plots/roc.png")
                    run.client.log_figure(child, sample_grid(r.samples, f"{r.name}: samples"), "plots/samples.png")
                    plt.close("all")
                    run.log_files({"protocol.json": json.dumps(PROTOCOL, indent=2).encode(),
                                   "grid.json": json.dumps(r.grid, indent=2).encode()}, child)
            page = _html(cfg, run.run_id, reports, real_fid)
            report_path = output_dir / run.run_id / "report.html"
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(page)
            run.log_files({"report.html": page.encode()})
        run.log_metrics({**{f"time.{k}_s": v for k, v in timings.items()}, f"{fid_name}.real_floor": real_fid,
                         **facts, **{f"time.train.{k}_s": v for k, v in trained.items()}})
    return DiffusionOutcome(run.run_id, tracking_uri, reports, timings, real_fid, report_path)

