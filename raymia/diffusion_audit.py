"""Run one diffusion-model privacy audit: data -> plan -> DDPMs (cache; Ray Tune or this process) -> attacks + FID
-> MLflow.

``raymia diffusion-audit`` and ``jobs/diffusion_audit.py`` call :func:`run_diffusion_audit`. On Ray, training
runs as Tune trials in two stages (the undefended model and both teachers in parallel, then DistillMD's
student); with ``local=True`` the same models train one after another in this process, without importing Ray.
Attacks, sampling and FID (:mod:`raymia.pipeline.diffusion_track`) run here on the results in the cache. MLflow
gets a parent run and one child run per system (``undefended``, ``dualmd``, ``distillmd``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import raymia
from raymia.cache import ModelCache
from raymia.config import DiffusionAuditConfig
from raymia.pipeline.diffusion_track import (
    SystemReport,
    build_systems,
    evaluate_system,
    feature_extractor,
    plan_diffusion_audit,
    real_data_fid,
    train_locally,
)
from raymia.pipeline.recipe import phase
from raymia.quiet import quiet_defaults
from raymia.report import diffusion_html
from raymia.tracking import REPORT_FILE, audit_run, flat_params, resolve_tracking_uri
from raymia.training.device import resolve_device

#: The trained models behind each system, as logged in its child run's ``models`` param.
SYSTEM_MODELS = {"undefended": "undefended", "dualmd": "teacher1+teacher2", "distillmd": "student"}


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


def run_diffusion_audit(cfg: DiffusionAuditConfig, *, local: bool = False,
                        echo: Callable[[str], None] | None = None) -> DiffusionOutcome:
    """Run the diffusion audit ``cfg`` end to end (``local``: without Ray); progress lines go to ``echo``."""
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
        f"{len(plan.jobs)} DDPMs ({cfg.train.steps} steps each); {'in this process' if local else 'on Ray'}; "
        f"cache {cache.uri}; tracking {tracking_uri}")
    device = resolve_device(cfg.compute.device)
    with audit_run(cfg, tracking_uri, tags={"raymia.kind": "diffusion-audit"}) as run:
        run.log_params({"dataset": dataset.name, "seed": cfg.seed, "data_fingerprint": dataset.fingerprint(),
                        **{f"split.n_{r}": n for r, n in sizes.items()}, "split.n_d1": len(plan.halves[0]),
                        "split.n_d2": len(plan.halves[1]), "systems": ",".join(cfg.defenses.enabled),
                        "runner": "local" if local else "ray",
                        **flat_params("model", cfg.model.model_dump(mode="json")),
                        **flat_params("train", cfg.train.model_dump(mode="json")),
                        **flat_params("defenses", cfg.defenses.model_dump(mode="json", exclude={"student"})),
                        **flat_params("attacks", cfg.attacks.model_dump(mode="json")),
                        **flat_params("sampling", cfg.sampling.model_dump(mode="json"))})
        with phase(timings, "training"):
            if local:
                trained = train_locally(plan, cache, device=device, echo=say)
            else:
                from raymia.orchestration.fanout import train_ddpms_on_ray
                from raymia.orchestration.session import ray_session

                with ray_session(cfg, timings, say) as session:
                    trained = train_ddpms_on_ray(plan, cache, session, experiment_name=f"{cfg.name}-{run.run_id}",
                                                 echo=say)
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
            for r in reports:
                params = {"system": r.name, "models": SYSTEM_MODELS[r.name], "fid_metric": fid_name,
                          **({"student_recipe": (cfg.defenses.student or cfg.train).model_dump_json()}
                             if r.name == "distillmd" else {})}
                run.log_system(r, params=params)
            page = diffusion_html(cfg.name, run.run_id, reports, real_fid)
            report_path = output_dir / run.run_id / "report.html"
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(page)
            run.log_files({REPORT_FILE: page.encode()})
        run.log_metrics({**{f"time.{k}_s": v for k, v in timings.items()}, f"{fid_name}.real_floor": real_fid,
                         **facts, **{f"time.train.{k}_s": v for k, v in trained.items()}})
    return DiffusionOutcome(run.run_id, tracking_uri, reports, timings, real_fid, report_path)
