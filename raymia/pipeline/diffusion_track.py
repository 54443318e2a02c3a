"""The diffusion-model privacy track without Ray or MLflow: plan, train, attack and sample.

Systems audited (``defenses.enabled``):

- ``undefended``: one DDPM trained on all members;
- ``dualmd``: teachers θ1 on D1 and θ2 on D2 (disjoint halves of the members), deployed together and sampled
  alternately. Its headline numbers are the strongest white-box attacker holding both models: per sample, the
  better of the two teachers' scores. Also reported: the ε-function its DDPM sampler uses (θ2 at even t, θ1 at
  odd t) at timesteps of both parities, and each teacher on its own half and on the other half;
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
                           "teachers": [jobs["teacher1"].key, jobs["teacher2"].key],
                           "teacher_weights": cfg.defenses.teacher_weights})
        jobs["student"] = DiffusionJob("student", roles["members"], key, seed, ("teacher1", "teacher2"))
    return DiffusionPlan(cfg, dataset, roles, halves, jobs)


def raw_key(key: str) -> str:
    """The cache key of a model's raw (non-EMA) weights."""
    return content_key({"raw_weights_of": key})


def load_unet(plan: DiffusionPlan, name: str, cache: ModelCache, *, weights: str = "ema") -> nn.Module | None:
    """The trained model ``name`` (``weights``: ``ema`` or ``raw``; eval mode) from the cache, or ``None``."""
    key = plan.jobs[name].key if weights == "ema" else raw_key(plan.jobs[name].key)
    return load_cached_unet(cache, key, plan.config.model, plan.dataset.input_shape)


def teacher_weights(plan: DiffusionPlan, name: str) -> str:
    """Which weights of model ``name`` the systems use: the teachers' are ``defenses.teacher_weights``."""
    return plan.config.defenses.teacher_weights if name.startswith("teacher") else "ema"


def train_job(plan: DiffusionPlan, name: str, cache: ModelCache, *, device: torch.device | str = "cpu",
              schedule_log: list | None = None) -> dict[str, float]:
    """Train model ``name`` (unless the cache holds it) and store its EMA weights; returns ``{"seconds": ...}``.

    The student reads its teachers from the cache; ``schedule_log`` (a list) receives its recorded batches.
    """
    job, cfg = plan.jobs[name], plan.config
    if cache.has_model(job.key) and cache.has_model(raw_key(job.key)):
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
            teacher = load_unet(plan, t, cache, weights=teacher_weights(plan, t))
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
    cache.save_model(raw_key(job.key), unet.state_dict(), {"seconds": seconds})
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
        unet = load_unet(plan, name, cache, weights=teacher_weights(plan, name))
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

    ``attacks``: each attack at its configured timestep (the reported protocol); for DualMD the attacker holding
    both teachers (per sample, the better of their two scores). ``grid``: AUC per timestep of ``attacks.t_grid``;
    ``best_of_grid`` (attack -> (t, AUC)) picks t on the audited scores, an oracle. ``parts`` (DualMD):
    ``sampler_even`` / ``sampler_odd``, the deployed sampler's ε-function at the even / odd one of t and t + 1
    (θ2 / θ1); ``theta1_own`` (θ1 on D1), ``theta1_other`` (θ1 on D2), ``theta2_own``, ``theta2_other``, each
    against all non-members; ``cross``: every member scored by the teacher that never saw it (expected ≈ 0.5).
    ``fid``: named ``fid`` or ``fid_proxy``; ``samples``: a few images.
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

    def scores(eps: EpsFn, attack: str, t: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return (attack_scores(attack, eps, x["members"], abar, cfg.attacks, t),
                attack_scores(attack, eps, x["nonmembers"], abar, cfg.attacks, t))

    attacks, grid, parts = {}, {}, {}
    if not system.parts:
        for a_name in cfg.attacks.enabled:
            attacks[a_name] = _result(a_name, *scores(system.eps, a_name))
            grid[a_name] = {t: _result(a_name, *scores(system.eps, a_name, t)).metrics.auc for t in cfg.attacks.t_grid}
    else:
        t1, t2 = system.parts["theta1"], system.parts["theta2"]
        h1, h2 = (torch.from_numpy(h) for h in plan.half_positions())

        def both(a_name: str, t: int | None = None) -> tuple[torch.Tensor, ...]:
            (m1, n1), (m2, n2) = scores(t1, a_name, t), scores(t2, a_name, t)
            return torch.maximum(m1, m2), torch.maximum(n1, n2), m1, n1, m2, n2

        for name in ("sampler_even", "sampler_odd", "theta1_own", "theta1_other", "theta2_own", "theta2_other",
                     "cross"):
            parts[name] = {}
        for a_name in cfg.attacks.enabled:
            best_m, best_n, m1, n1, m2, n2 = both(a_name)
            attacks[a_name] = _result(a_name, best_m, best_n)
            grid[a_name] = {t: _result(a_name, *both(a_name, t)[:2]).metrics.auc for t in cfg.attacks.t_grid}
            t = cfg.attacks.default_t(a_name)
            even, odd = (t, t + 1) if t % 2 == 0 else (t + 1, t)
            parts["sampler_even"][a_name] = _result(a_name, *scores(system.eps, a_name, even))
            parts["sampler_odd"][a_name] = _result(a_name, *scores(system.eps, a_name, odd))
            parts["theta1_own"][a_name] = _result(a_name, m1[h1], n1)
            parts["theta1_other"][a_name] = _result(a_name, m1[h2], n1)
            parts["theta2_own"][a_name] = _result(a_name, m2[h2], n2)
            parts["theta2_other"][a_name] = _result(a_name, m2[h1], n2)
            parts["cross"][a_name] = _result(a_name, torch.cat([m2[h1], m1[h2]]), n1)  # non-members by θ1, as the official code
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
