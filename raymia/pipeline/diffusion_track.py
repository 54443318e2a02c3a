"""The diffusion-model privacy track without Ray or MLflow: plan, train, attack and sample.

Systems audited (``defenses.enabled``):

- ``undefended``: one DDPM trained on all members;
- ``dualmd``: teachers θ1 on D1 and θ2 on D2 (disjoint halves of the members), deployed together — sampled
  alternately, attacked white-box through the ε-function of its DDPM sampler (θ2 at even t, θ1 at odd t), and
  each teacher scored alone;
- ``distillmd``: a student trained on the members against the other half's teacher; only it is deployed.

Models are trained by :func:`train_job` (one call per model: the platform runs them as Ray Tune trials, the
teachers in parallel) and stored in the model cache under content keys; evaluation loads them from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from raymia.attacks.diffusion import attack_scores
from raymia.attacks.suite import AttackResult
from raymia.cache import ModelCache
from raymia.config import DiffusionAuditConfig
from raymia.data.datasets import Dataset
from raymia.diffusion.dual_model import DistillSchedule, parity_eps, split_halves
from raymia.diffusion.fid import (
    Features,
    frechet_distance,
    inception_features,
    proxy_features,
)
from raymia.diffusion.model import (
    build_unet,
    load_cached_unet,
    make_noise_schedule,
    to_model_range,
)
from raymia.diffusion.sampling import EpsFn, sample, unet_eps
from raymia.diffusion.train import train_diffusion
from raymia.keys import content_key, derive_seed
from raymia.metrics import AttackMetrics

#: Which trained models each audited system needs.
SYSTEM_MODELS = {"undefended": ("undefended",), "dualmd": ("teacher1", "teacher2"),
                 "distillmd": ("teacher1", "teacher2", "student")}


@dataclass(frozen=True, eq=False)
class DiffusionJob:
    """One diffusion model to train: its name, the dataset rows it learns from and its cache key. The student
    also names its teachers (their halves are the plan's)."""

    name: str
    rows: np.ndarray
    key: str
    seed: int
    teachers: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class DiffusionPlan:
    """Data, the members / non-members / held-out split, the halves and the jobs to train."""

    config: DiffusionAuditConfig
    dataset: Dataset
    roles: dict[str, np.ndarray]
    halves: tuple[np.ndarray, np.ndarray]
    jobs: dict[str, DiffusionJob]

    def half_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Where D1 and D2 sit inside the (sorted) members array: rows of any array ordered like the members."""
        return tuple(np.searchsorted(self.roles["members"], h) for h in self.halves)

    def stages(self) -> list[list[DiffusionJob]]:
        """Jobs in dependency order: the independent models first (in parallel), then the student."""
        first = [j for j in self.jobs.values() if not j.teachers]
        return [s for s in (first, [j for j in self.jobs.values() if j.teachers]) if s]


def plan_diffusion_audit(cfg: DiffusionAuditConfig, dataset: Dataset) -> DiffusionPlan:
    """Seeded disjoint roles (``members``, ``nonmembers``, ``heldout``), member halves and the training jobs."""
    n = len(dataset)
    perm = np.random.default_rng(cfg.seed).permutation(n)
    sizes = [int(n * f) for f in (cfg.split.members, cfg.split.nonmembers, cfg.split.heldout)]
    bounds = np.cumsum([0, *sizes])
    roles = {r: np.sort(perm[bounds[i]:bounds[i + 1]]) for i, r in enumerate(("members", "nonmembers", "heldout"))}
    halves = split_halves(roles["members"], derive_seed(cfg.seed, "halves"))
    needed = {m for s in cfg.defenses.enabled for m in SYSTEM_MODELS[s]}
    base = {"data": dataset.fingerprint(), "spec": cfg.model.model_dump(mode="json"), "kind": "ddpm"}
    jobs: dict[str, DiffusionJob] = {}
    for name, rows in (("undefended", roles["members"]), ("teacher1", halves[0]), ("teacher2", halves[1])):
        if name in needed:
            seed = derive_seed(cfg.seed, name)
            jobs[name] = DiffusionJob(name, rows, content_key({**base, "rows": rows, "seed": seed,
                                                               "recipe": cfg.train.model_dump(mode="json")}), seed)
    if "student" in needed:
        recipe = cfg.defenses.student or cfg.train
        seed = derive_seed(cfg.seed, "student")
        key = content_key({**base, "rows": roles["members"], "seed": seed, "recipe": recipe.model_dump(mode="json"),
                           "teachers": [jobs["teacher1"].key, jobs["teacher2"].key]})
        jobs["student"] = DiffusionJob("student", roles["members"], key, seed, ("teacher1", "teacher2"))
    return DiffusionPlan(cfg, dataset, roles, halves, jobs)


def load_unet(plan: DiffusionPlan, name: str, cache: ModelCache) -> nn.Module | None:
    """The trained model ``name`` (EMA weights, eval mode) from the cache, or ``None`` if it is not there."""
    return load_cached_unet(cache, plan.jobs[name].key, plan.config.model, plan.dataset.input_shape)


def train_job(plan: DiffusionPlan, name: str, cache: ModelCache, *, device: torch.device | str = "cpu",
              schedule_log: list | None = None) -> dict[str, float]:
    """Train model ``name`` (unless the cache holds it) and store its EMA weights; returns ``{"seconds": ...}``.

    The student reads its teachers from the cache; ``schedule_log`` (a list) receives its recorded batches.
    """
    job, cfg = plan.jobs[name], plan.config
    if cache.has_model(job.key):
        return {"seconds": 0.0, "reused": 1.0}
    start = time.perf_counter()
    x01 = torch.from_numpy(plan.dataset.x[job.rows])
    unet = build_unet(cfg.model, plan.dataset.input_shape, seed=job.seed)
    target_fn = batch_rows = None
    recipe = cfg.train
    if job.teachers:
        recipe = cfg.defenses.student or cfg.train
        teachers = []
        for t in job.teachers:
            teacher = load_unet(plan, t, cache)
            if teacher is None:
                raise RuntimeError(f"DistillMD's {t} is not in the cache {cache.uri}; train it first")
            teachers.append(unet_eps(teacher.to(device)))
        schedule = DistillSchedule(plan.half_positions(), recipe.batch_size, tuple(teachers),
                                   record=schedule_log is not None)
        target_fn, batch_rows = schedule.target, schedule.batch_rows
    ema = train_diffusion(unet, make_noise_schedule(cfg.model), x01, recipe, seed=job.seed, device=device,
                          target_fn=target_fn, batch_rows=batch_rows)
    seconds = time.perf_counter() - start
    cache.save_model(job.key, ema.state_dict(), {"seconds": seconds})
    if schedule_log is not None and job.teachers:
        schedule_log.extend(schedule.log)
    return {"seconds": seconds, "reused": 0.0}


@dataclass
class DiffusionSystem:
    """A deployed system: its white-box ε-function, the ε-functions its sampler alternates, and (DualMD) the
    ε-function of each model in it."""

    name: str
    eps: EpsFn
    samplers: list[EpsFn]
    parts: dict[str, EpsFn] = field(default_factory=dict)


def build_systems(plan: DiffusionPlan, cache: ModelCache, device: torch.device | str = "cpu"
                  ) -> dict[str, DiffusionSystem]:
    """The enabled systems, from the trained models in the cache."""
    unets = {}
    for name in plan.jobs:  # exactly the models the enabled systems need
        unet = load_unet(plan, name, cache)
        if unet is None:
            raise RuntimeError(f"diffusion model '{name}' is not in the cache {cache.uri}; train it first")
        unets[name] = unet_eps(unet.to(device))
    systems = {}
    for s in plan.config.defenses.enabled:
        if s == "undefended":
            systems[s] = DiffusionSystem(s, unets["undefended"], [unets["undefended"]])
        elif s == "dualmd":
            t1, t2 = unets["teacher1"], unets["teacher2"]
            systems[s] = DiffusionSystem(s, parity_eps(t1, t2), [t1, t2], {"theta1": t1, "theta2": t2})
        else:
            systems[s] = DiffusionSystem(s, unets["student"], [unets["student"]])
    return systems


@dataclass
class SystemReport:
    """One system's privacy and utility.

    ``attacks``: each attack at its configured timestep (the reported protocol). ``grid``: AUC per timestep of
    ``attacks.t_grid``; ``best_of_grid`` (attack -> (t, AUC)) picks t on the audited scores, an oracle.
    ``parts`` (DualMD): each teacher's attacks on all members, and ``cross``: every member scored by the teacher
    that never saw it (expected ≈ 0.5). ``fid``: named ``fid`` or ``fid_proxy``; ``samples``: a few images.
    """

    name: str
    attacks: dict[str, AttackResult]
    grid: dict[str, dict[int, float]]
    parts: dict[str, dict[str, AttackResult]]
    fid: float
    fid_name: str
    samples: torch.Tensor
    seconds: float = 0.0

    def best_of_grid(self) -> dict[str, tuple[int, float]]:
        return {a: max(g.items(), key=lambda kv: kv[1]) for a, g in self.grid.items() if g}

    def strongest(self) -> AttackResult:
        return max(self.attacks.values(), key=lambda a: a.metrics.auc)


def _result(name: str, member: torch.Tensor | np.ndarray, nonmember: torch.Tensor | np.ndarray) -> AttackResult:
    m, n = np.asarray(member, dtype=np.float64), np.asarray(nonmember, dtype=np.float64)
    return AttackResult(name, m, n, AttackMetrics.from_scores(m, n), None)


def feature_extractor(plan: DiffusionPlan, device: torch.device | str = "cpu") -> tuple[Features, str, dict]:
    """FID features: Inception-v3 from the configured local file (``fid``), else a CNN trained on the held-out
    images (``fid_proxy``). Returns the extractor, the metric's name and facts worth logging."""
    cfg = plan.config
    if cfg.fid.inception_weights is not None:
        return inception_features(cfg.fid.inception_weights, device=device), "fid", {}
    held = plan.roles["heldout"]
    fn, acc = proxy_features(torch.from_numpy(plan.dataset.x[held]), plan.dataset.y[held],
                             seed=derive_seed(cfg.seed, "fid"), epochs=cfg.fid.proxy_epochs, device=device)
    return fn, "fid_proxy", {"fid_proxy.extractor_train_acc": acc}


def evaluate_system(plan: DiffusionPlan, system: DiffusionSystem, features: Features, fid_name: str, *,
                    device: torch.device | str = "cpu") -> SystemReport:
    """Attack the system white-box on the members vs non-members, sample from it and compute FID."""
    cfg = plan.config
    start = time.perf_counter()
    schedule = make_noise_schedule(cfg.model)
    abar = schedule.alphas_cumprod.to(device)
    x = {r: to_model_range(torch.from_numpy(plan.dataset.x[plan.roles[r]])).to(device)
         for r in ("members", "nonmembers")}

    def run(attack: str, eps: EpsFn, t: int | None = None) -> AttackResult:
        return _result(attack, attack_scores(attack, eps, x["members"], abar, cfg.attacks, t),
                       attack_scores(attack, eps, x["nonmembers"], abar, cfg.attacks, t))

    attacks, grid, parts = {}, {}, {}
    for a_name in cfg.attacks.enabled:
        attacks[a_name] = run(a_name, system.eps)
        grid[a_name] = {t: run(a_name, system.eps, t).metrics.auc for t in cfg.attacks.t_grid}
    if system.parts:
        halves = [torch.from_numpy(h) for h in plan.half_positions()]
        for part, eps in system.parts.items():
            parts[part] = {a_name: run(a_name, eps) for a_name in cfg.attacks.enabled}
        t1, t2 = system.parts["theta1"], system.parts["theta2"]
        cross = {}
        for a_name in cfg.attacks.enabled:  # D1 judged by θ2, D2 by θ1; non-members by θ1 (as the official code)
            s1 = attack_scores(a_name, t2, x["members"][halves[0]], abar, cfg.attacks)
            s2 = attack_scores(a_name, t1, x["members"][halves[1]], abar, cfg.attacks)
            cross[a_name] = _result(a_name, torch.cat([s1, s2]), parts["theta1"][a_name].nonmember_scores)
        parts["cross"] = cross
    s = cfg.sampling
    images = sample(system.samplers, schedule.betas, s.n_samples, plan.dataset.input_shape,
                    sampler=s.sampler, steps=s.steps, seed=derive_seed(cfg.seed, "samples"), device=device,
                    batch=s.batch_size)
    real = torch.from_numpy(plan.dataset.x[plan.roles["heldout"]])
    fid = frechet_distance(features(images), features(real))
    return SystemReport(system.name, attacks, grid, parts, fid, fid_name, images[:64],
                        time.perf_counter() - start)


def real_data_fid(plan: DiffusionPlan, features: Features) -> float:
    """FID of real unseen images (the non-members) against the held-out set: the floor a perfect model reaches
    with this many samples."""
    return frechet_distance(features(torch.from_numpy(plan.dataset.x[plan.roles["nonmembers"]])),
                            features(torch.from_numpy(plan.dataset.x[plan.roles["heldout"]])))


def train_locally(plan: DiffusionPlan, cache: ModelCache, *, device: torch.device | str = "cpu",
                  echo: Callable[[str], None] = lambda line: None) -> dict[str, float]:
    """Train the models the cache lacks in this process, stage by stage; returns seconds per trained model."""
    seconds = {}
    for stage in plan.stages():
        for job in stage:
            out = train_job(plan, job.name, cache, device=device)
            if not out.get("reused"):
                seconds[job.name] = out["seconds"]
                echo(f"  trained {job.name}  {out['seconds']:.1f} s")
    return seconds
