"""DIFFENCE inside an audit (no Ray here): the diffusion model, the defender's calibration, and every model's
outputs through DIFFENCE — target and reference models alike (the adaptive attacker knows the defense, the
diffusion model, its knobs and the calibrated interval).

Outputs through DIFFENCE are computed on a subset of the scored rows: all audited samples, the test split (for
accuracy and ECE), the calibration splits and ``eval_population`` population samples (RMIA's z).
Label-only predictions are unchanged by construction (DIFFENCE preserves every query's label), so they are
copied from the undefended outputs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import raymia
from raymia.cache import ModelCache, content_key
from raymia.config import TargetConfig
from raymia.data.queries import QUERY_VIEWS
from raymia.defenses.diffence import Diffence, DiffenceConfig
from raymia.diffusion.model import build_unet, load_cached_unet, make_scheduler
from raymia.diffusion.train import train_diffusion
from raymia.pipeline.audit import AuditPlan, TargetReport, assemble_pool, derive_seed, evaluate_pool, jobs_for_target
from raymia.pipeline.factory import load_trained
from raymia.pipeline.jobs import TrainJob
from raymia.signals import ModelSignals, PoolSignals

#: DIFFENCE knobs that change outputs (chunking, precision and compilation do not, up to rounding).
_OUTPUT_KNOBS = ("n", "t_prime", "ddim_steps", "scenario", "noise_mode", "grid_points", "js_bins", "seed")


@dataclass(frozen=True, eq=False)
class DiffusionJob:
    """The audit's diffusion model: what it trains on and its cache key."""

    rows: np.ndarray
    seed: int
    key: str


def diffusion_job(plan: AuditPlan) -> DiffusionJob:
    cfg, split = plan.config, plan.split
    d = cfg.diffence
    rows = (np.union1d(split["target_members"], split["calibration_members"]) if d.train_data == "members"
            else split["population"])
    seed = derive_seed(cfg.seed, "diffusion")
    key = content_key({"kind": "diffusion", "spec": d.model.model_dump(), "train": d.train.model_dump(),
                       "data": plan.split.data_fingerprint, "rows": np.asarray(rows, np.int64), "seed": seed,
                       "code": raymia.__version__})
    return DiffusionJob(rows, seed, key)


def load_diffusion_model(plan: AuditPlan, cache: ModelCache) -> nn.Module | None:
    """The audit's diffusion model from the cache (eval mode), or ``None`` if it was not trained yet."""
    return load_cached_unet(cache, diffusion_job(plan).key, plan.config.diffence.model, plan.dataset.input_shape)


def ensure_diffusion_model(plan: AuditPlan, cache: ModelCache, *, device: torch.device | str = "cpu") -> nn.Module:
    """Load the audit's diffusion model from the cache, or train it (EMA) and store it."""
    unet = load_diffusion_model(plan, cache)
    if unet is not None:
        return unet
    job = diffusion_job(plan)
    d = plan.config.diffence
    unet = build_unet(d.model, plan.dataset.input_shape, seed=job.seed)
    ema = train_diffusion(unet, make_scheduler(d.model), torch.from_numpy(plan.dataset.x[job.rows]), d.train,
                          seed=job.seed, device=device)
    cache.save_model(job.key, ema.state_dict(), {"diffusion_steps": float(d.train.steps)})
    return ema.cpu().eval()


def diffence_rows(plan: AuditPlan) -> np.ndarray:
    """Sorted dataset rows queried through DIFFENCE (see the module docstring)."""
    split = plan.split
    pop = split["population"]
    n_pop = min(plan.config.diffence.eval_population, len(pop))
    pop = np.sort(np.random.default_rng(plan.config.seed).choice(pop, n_pop, replace=False)) if n_pop else pop[:0]
    parts = [split[r] for r in ("target_members", "target_nonmembers", "test", "calibration", "calibration_members")]
    return np.sort(np.concatenate([*parts, pop]))


def make_diffence(plan: AuditPlan, classifier: nn.Module, unet: nn.Module, interval: tuple[float, float] | None,
                  device: torch.device | str = "cpu") -> Diffence:
    d = plan.config.diffence
    cfg = DiffenceConfig(**{k: getattr(d, k) for k in DiffenceConfig.model_fields})
    return Diffence(classifier, unet, make_scheduler(d.model).alphas_cumprod, cfg, interval, device)


def calibrate(plan: AuditPlan, target_job: TrainJob, unet: nn.Module, cache: ModelCache, *,
              device: torch.device | str = "cpu", builders: dict | None = None) -> tuple[float, float] | None:
    """The target's interval from the defender's known members / non-members (``None`` for scenario 3)."""
    loaded = load_trained(target_job, plan.dataset, cache, builders)
    if loaded is None:
        raise RuntimeError(f"{target_job.job_id} is not in the cache; train the classifiers first")
    defended = make_diffence(plan, loaded[0], unet, None, device)
    split, x = plan.split, plan.dataset.x
    return defended.calibrate(x[split["calibration_members"]], x[split["calibration"]])


def signals_key(job: TrainJob, plan: AuditPlan, interval: tuple[float, float] | None) -> str:
    d = plan.config.diffence
    return content_key({"model": job.key, "diffusion": diffusion_job(plan).key, "interval": interval,
                        "diffence": {k: getattr(d, k) for k in _OUTPUT_KNOBS}, "rows": diffence_rows(plan)})


def produce_diffence_signals(jobs: list[TrainJob], plan: AuditPlan, unet: nn.Module,
                             interval: tuple[float, float] | None, cache: ModelCache, *,
                             device: torch.device | str = "cpu", builders: dict | None = None) -> int:
    """Query each job's classifier through DIFFENCE on :func:`diffence_rows` (each query view) and cache the
    outputs; returns how many were computed (the rest were cached)."""
    rows = diffence_rows(plan)
    pos = np.searchsorted(plan.scored_indices, rows)
    views = list(plan.config.attacks.queries)
    done = 0
    for job in jobs:
        key = signals_key(job, plan, interval)
        if plan.config.cache.reuse and cache.load_signals(key, plan.views_id) is not None:
            continue
        loaded = load_trained(job, plan.dataset, cache, builders)
        plain = cache.load_signals(job.key, plan.views_id)
        if loaded is None or plain is None:
            raise RuntimeError(f"{job.job_id} is not in the cache; train the classifiers first")
        defended = make_diffence(plan, loaded[0], unet, interval, device)
        x = plan.dataset.x[rows]
        seed = derive_seed(plan.config.diffence.seed, job.key)
        logits = np.stack([defended(QUERY_VIEWS[v](x), seed=seed + i) for i, v in enumerate(views)], axis=1)
        cache.save_signals(key, plan.views_id, ModelSignals(logits.astype(np.float32), plain.label_only[pos],
                                                            dict(plain.extra)))
        done += 1
    return done


def diffence_pool(plan: AuditPlan, target: TargetConfig, jobs: list[TrainJob], interval: tuple[float, float] | None,
                  cache: ModelCache) -> PoolSignals:
    """The +diffence pool of one configuration, on :func:`diffence_rows`."""
    rows = diffence_rows(plan)
    signals = {}
    for job in jobs:
        s = cache.load_signals(signals_key(job, plan, interval), plan.views_id)
        if s is None:
            raise RuntimeError(f"no DIFFENCE outputs cached for {job.job_id}")
        signals[job.job_id] = s
    return assemble_pool(dataclasses.replace(plan, scored_indices=rows, jobs=jobs), target, signals)


def diffusion_artifacts(unet: nn.Module) -> dict[str, bytes]:
    """The diffusion model as ``save_pretrained`` writes it (config.json + safetensors), for MLflow."""
    files = {}
    with tempfile.TemporaryDirectory() as d:
        unet.save_pretrained(d, safe_serialization=True)
        for f in Path(d).iterdir():
            files[f"diffusion_model/{f.name}"] = f.read_bytes()
    return files


def diffence_report(plan: AuditPlan, target: TargetConfig, interval: tuple[float, float] | None,
                    cache: ModelCache) -> TargetReport:
    """Attack ``target`` as deployed behind DIFFENCE (reported as ``<name>+diffence``)."""
    jobs = jobs_for_target(plan, target)
    variant = target.model_copy(update={"name": f"{target.name}+diffence"})
    d = plan.config.diffence
    knobs = {k: getattr(d, k) for k in ("n", "t_prime", "ddim_steps", "scenario", "noise_mode", "train_data")}
    report = evaluate_pool(plan.config, variant, diffence_pool(plan, variant, _renamed(jobs, variant), interval, cache),
                           inference={"name": "diffence", **knobs})
    if interval is not None:
        report.extra.update({"diffence.interval_low": interval[0], "diffence.interval_high": interval[1]})
    return report


def _renamed(jobs: list[TrainJob], target: TargetConfig) -> list[TrainJob]:
    """The same jobs (same cache keys) filed under the variant's name."""
    return [dataclasses.replace(j, target=target, job_id=j.job_id.replace(j.target.name, target.name, 1)) for j in jobs]
