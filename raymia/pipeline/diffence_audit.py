"""DIFFENCE inside an audit (no Ray here): the diffusion model, the defender's calibration, and every model's
outputs through DIFFENCE — target and reference models alike (the adaptive attacker knows the defense, the
diffusion model, its knobs and the calibrated interval).

Outputs through DIFFENCE are computed on a subset of the scored rows: all audited samples, the test split (for
accuracy and ECE), the calibration splits, the canaries of one-run auditing and exactly the population samples the plain report uses as RMIA's z
(all of them, or ``attacks.rmia.num_z`` drawn the same way), so both reports are judged against the same z.
Label-only predictions are unchanged by construction (DIFFENCE preserves every query's label), so they are
copied from the undefended outputs.

Each query's noise is seeded from its bytes and a per-model seed (:func:`~raymia.defenses.diffence.query_seed`),
as the Serve deployment seeds it: the target's outputs here are exactly what a deployment with the same knobs and
``seed`` releases, so auditing that deployment over HTTP gives the same numbers; each reference model has its own
seed (independent noise). A black-box target (``endpoint``) is taken to be the deployed DIFFENCE already: its
outputs are used as they came, and its interval is ``diffence.interval`` (the deployment's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import raymia
from raymia.attacks.suite import population_sample
from raymia.cache import ModelCache
from raymia.config import TargetConfig
from raymia.data.queries import QUERY_VIEWS
from raymia.defenses.diffence import Diffence, query_seed
from raymia.diffusion.model import build_unet, load_cached_unet, make_noise_schedule
from raymia.diffusion.train import train_diffusion
from raymia.keys import content_key, derive_seed
from raymia.pipeline.evaluate import TargetReport, assemble_pool, evaluate_pool
from raymia.pipeline.factory import Builders, load_trained
from raymia.pipeline.plan import AuditPlan, TrainJob, jobs_for_target
from raymia.signals import ModelSignals

Interval = tuple[float, float] | None


@dataclass(frozen=True, eq=False)
class DiffenceUNetJob:
    """The audit's diffusion model for DIFFENCE: the dataset rows it trains on, its seed and its cache key."""

    rows: np.ndarray
    seed: int
    key: str


def unet_job(plan: AuditPlan) -> DiffenceUNetJob:
    cfg, split = plan.config, plan.split
    d = cfg.diffence
    rows = (np.union1d(split["target_members"], split["calibration_members"]) if d.train_data == "members"
            else split["population"])
    seed = derive_seed(cfg.seed, "diffusion")
    key = content_key({"kind": "diffusion", "spec": d.model.model_dump(), "train": d.train.model_dump(),
                       "data": plan.split.data_fingerprint, "rows": np.asarray(rows, np.int64), "seed": seed,
                       "code": raymia.__version__})
    return DiffenceUNetJob(rows, seed, key)


def load_diffusion_model(plan: AuditPlan, cache: ModelCache) -> nn.Module | None:
    """The audit's diffusion model from the cache (eval mode), or ``None`` if it was not trained yet."""
    return load_cached_unet(cache, unet_job(plan).key, plan.config.diffence.model, plan.dataset.input_shape)


def ensure_diffusion_model(plan: AuditPlan, cache: ModelCache, *, device: torch.device | str = "cpu") -> nn.Module:
    """Load the audit's diffusion model from the cache, or train it (EMA) and store it."""
    unet = load_diffusion_model(plan, cache)
    if unet is not None:
        return unet
    job = unet_job(plan)
    d = plan.config.diffence
    unet = build_unet(d.model, plan.dataset.input_shape, seed=job.seed)
    ema = train_diffusion(unet, make_noise_schedule(d.model), torch.from_numpy(plan.dataset.x[job.rows]), d.train,
                          seed=job.seed, device=device)
    cache.save_model(job.key, ema.state_dict(), {"diffusion_steps": float(d.train.steps)})
    return ema.cpu().eval()


def diffence_rows(plan: AuditPlan) -> np.ndarray:
    """Sorted dataset rows queried through DIFFENCE (see the module docstring)."""
    split = plan.split
    pop = split["population"]  # sorted, as in the plain pool, so the draw picks the same z
    pop = pop[population_sample(len(pop), plan.config.attacks.rmia)]
    parts = [split[r] for r in ("target_members", "target_nonmembers", "test", "calibration", "calibration_members",
                                "canaries")]
    return np.sort(np.concatenate([*parts, pop]))


def make_diffence(plan: AuditPlan, classifier: nn.Module, unet: nn.Module, interval: Interval,
                  device: torch.device | str = "cpu") -> Diffence:
    d = plan.config.diffence
    return Diffence(classifier, unet, make_noise_schedule(d.model).alphas_cumprod, d, interval, device)


def _loaded(job: TrainJob, plan: AuditPlan, cache: ModelCache, builders: Builders | None) -> nn.Module:
    loaded = load_trained(job, plan.dataset, cache, builders)
    if loaded is None:
        raise RuntimeError(f"{job.job_id} is not in the cache; train the classifiers first")
    return loaded[0]


def calibrate(plan: AuditPlan, target_job: TrainJob, unet: nn.Module, cache: ModelCache, *,
              device: torch.device | str = "cpu", builders: Builders | None = None, reuse: bool = True) -> Interval:
    """The target's interval from the defender's known members / non-members (``None`` for scenario 3).

    Stored in the cache under the classifier's, the diffusion model's and the knobs' keys, so every runner that
    audits this configuration (a Tune trial, the driver, a local run) computes it once.
    """
    d = plan.config.diffence
    if target_job.given and target_job.target.endpoint is not None:
        return None if d.scenario == 3 or d.n == 0 else tuple(d.interval)  # the deployment's (checked in config)
    key = content_key({"kind": "diffence-interval", "model": target_job.key, "diffusion": unet_job(plan).key,
                       "knobs": d.output_knobs(), "rows": [plan.split["calibration_members"], plan.split["calibration"]]})
    stored = cache.load_record(key) if reuse else None
    if stored is not None:
        return None if stored["interval"] is None else tuple(stored["interval"])
    defended = make_diffence(plan, _loaded(target_job, plan, cache, builders), unet, None, device)
    split, x = plan.split, plan.dataset.x
    interval = defended.calibrate(x[split["calibration_members"]], x[split["calibration"]])
    cache.save_record(key, {"interval": None if interval is None else list(interval)})
    return interval


def signals_key(job: TrainJob, plan: AuditPlan, interval: Interval) -> str:
    return content_key({"model": job.key, "diffusion": unet_job(plan).key, "interval": interval,
                        "diffence": plan.config.diffence.output_knobs(), "rows": diffence_rows(plan),
                        "noise": "per-query"})


def model_seed(job: TrainJob, plan: AuditPlan) -> int:
    """The DIFFENCE seed a model's deployment would run with: the configured one for the target (what the Serve
    deployment of this audit's champion uses), a derived one per reference model."""
    d = plan.config.diffence
    return d.seed if job.role == "target" else derive_seed(d.seed, job.key)


def produce_diffence_signals(jobs: list[TrainJob], plan: AuditPlan, unet: nn.Module, interval: Interval,
                             cache: ModelCache, *, device: torch.device | str = "cpu",
                             builders: Builders | None = None, reuse: bool = True) -> int:
    """Query each job's classifier through DIFFENCE on :func:`diffence_rows` (each query view) and cache the
    outputs; returns how many were computed (the rest were cached)."""
    rows = diffence_rows(plan)
    pos = np.searchsorted(plan.scored_indices, rows)
    views = list(plan.config.attacks.queries)
    done = 0
    for job in jobs:
        key = signals_key(job, plan, interval)
        if reuse and cache.load_signals(key, plan.views_id) is not None:
            continue
        plain = cache.load_signals(job.key, plan.views_id)
        if plain is None:
            raise RuntimeError(f"{job.job_id} has no outputs in the cache; train the classifiers first")
        if job.given and job.target.endpoint is not None:  # already what the deployed defense releases
            cache.save_signals(key, plan.views_id, ModelSignals(plain.logits[pos], plain.label_only[pos],
                                                                dict(plain.extra)))
            done += 1
            continue
        defended = make_diffence(plan, _loaded(job, plan, cache, builders), unet, interval, device)
        seed = model_seed(job, plan)
        views_x = [QUERY_VIEWS[v](plan.dataset.x[rows]) for v in views]
        logits = np.stack([defended(q, seeds=[query_seed(seed, row) for row in q]) for q in views_x], axis=1)
        cache.save_signals(key, plan.views_id, ModelSignals(logits.astype(np.float32), plain.label_only[pos],
                                                            dict(plain.extra)))
        done += 1
    return done


def missing_diffence_signals(jobs: list[TrainJob], plan: AuditPlan, interval: Interval,
                             cache: ModelCache) -> list[TrainJob]:
    """The jobs whose outputs through DIFFENCE are not in the cache yet."""
    return [j for j in jobs if cache.load_signals(signals_key(j, plan, interval), plan.views_id) is None]


def diffence_report(plan: AuditPlan, target: TargetConfig, interval: Interval, cache: ModelCache) -> TargetReport:
    """Attack ``target`` as deployed behind DIFFENCE (reported as ``<name>+diffence``)."""
    jobs = jobs_for_target(plan, target)
    variant = target.model_copy(update={"name": f"{target.name}+diffence"})
    signals = {}
    for job in jobs:
        s = cache.load_signals(signals_key(job, plan, interval), plan.views_id)
        if s is None:
            raise RuntimeError(f"no DIFFENCE outputs cached for {job.job_id}")
        signals[job.job_id] = s
    d = plan.config.diffence
    pool = assemble_pool(plan, jobs, signals, rows=diffence_rows(plan))
    report = evaluate_pool(plan.config, variant, pool,
                           inference={"name": "diffence", **d.output_knobs(), "train_data": d.train_data})
    return dataclasses.replace(report, interval=interval)
