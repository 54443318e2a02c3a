"""Plan, train and evaluate one audit: targets and their reference models, then every attack on every target.

Runs without Ray: :func:`produce_locally` trains in this process; orchestration fans the same
:func:`~raymia.pipeline.factory.produce_signals` out as Ray Tune trials.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from raymia.attacks.suite import AttackResult, leave_one_out_inputs, run_attacks, separate_target_inputs
from raymia.cache import ModelCache
from raymia.config import AuditConfig, TargetConfig
from raymia.data.datasets import Dataset
from raymia.data.queries import is_image, views_fingerprint
from raymia.data.splits import ROLES, SplitPlan, make_split_plan, reference_keep_mask
from raymia.errors import UserError
from raymia.metrics import AttackMetrics, accuracy, expected_calibration_error
from raymia.defenses import make_defense
from raymia.models.classifiers import build_model, check_model
from raymia.pipeline.factory import produce_signals
from raymia.pipeline.jobs import DefenseRows, TrainJob
from raymia.signals import ModelSignals, PoolSignals

#: Attacks whose metrics are also averaged over leave-one-out targets (``attacks.loo_targets``).
LOO_METRICS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")


def derive_seed(*parts: object) -> int:
    """A 31-bit seed determined by ``parts`` (e.g. the audit seed, a target name and a model index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True, eq=False)
class AuditPlan:
    """Everything decided before training: data, split, reference pool and keep-mask, the models to train."""

    config: AuditConfig
    dataset: Dataset
    split: SplitPlan
    pool: np.ndarray  # sorted dataset rows reference models sample their training sets from
    keep: np.ndarray  # bool [K, |pool|]
    jobs: list[TrainJob]
    scored_indices: np.ndarray  # sorted dataset rows every model is queried on
    views_id: str

    def job(self, target: str, role: str, index: int = 0) -> TrainJob:
        return next(j for j in self.jobs if j.target.name == target and j.role == role and j.index == index)

    def target_jobs(self, target: str) -> list[TrainJob]:
        """The target first, then its reference models in order."""
        return [j for j in self.jobs if j.target.name == target]


def check_target(target: TargetConfig, dataset: Dataset, *, field: str) -> None:
    """Build the target's (defended) architecture and run it once, so bad plug-ins or incompatible defenses fail
    before training."""
    defense = make_defense(target.defense)
    spec = defense.model_spec(target.model)
    check_model(spec, dataset.input_shape, dataset.num_classes, field=f"{field}.model")
    defense.check(build_model(spec, dataset.input_shape, dataset.num_classes), field=f"{field}.defense")


def plan_audit(cfg: AuditConfig, dataset: Dataset) -> AuditPlan:
    """Split the data, draw the reference keep-mask and list one job per target and reference model.

    The reference pool holds the audited samples (members and non-members; plus the population if configured),
    so every audited sample is IN for about ``pkeep * K`` reference models (LiRA/RMIA online need IN models).
    A sweep's configurations get their jobs inside their trials (:func:`jobs_for_target`).
    """
    for i, t in enumerate(cfg.targets):
        check_target(t, dataset, field=f"targets.{i}")
    if "hflip" in cfg.attacks.queries and not is_image(dataset.input_shape):
        raise UserError(f"hflip needs image inputs; {dataset.name} has feature vectors of shape "
                        f"{dataset.input_shape}; use [identity]", field="attacks.queries")
    fp = dataset.fingerprint()
    split = make_split_plan(len(dataset), cfg.split.fractions(), seed=cfg.seed, data_fingerprint=fp)
    ref = cfg.reference
    pool_roles = ["target_members", "target_nonmembers"] + (["population"] if ref.pool != "audited" else [])
    pool = np.sort(np.concatenate([split[r] for r in pool_roles]))
    keep = reference_keep_mask(len(pool), ref.count, fraction=ref.pkeep, seed=cfg.seed)
    views_id = views_fingerprint(list(cfg.attacks.queries), cfg.attacks.label_only)
    plan = AuditPlan(cfg, dataset, split, pool, keep, [], split.used_indices(), views_id)
    return dataclasses.replace(plan, jobs=[j for t in cfg.targets for j in jobs_for_target(plan, t)])


def jobs_for_target(plan: AuditPlan, target: TargetConfig) -> list[TrainJob]:
    """The target's job (trained on the members and the defender's known members) and one job per reference model
    (its keep-mask row)."""
    cfg, split, fp = plan.config, plan.split, plan.split.data_fingerprint
    rows = DefenseRows(split["calibration"], split["population"])
    members = np.union1d(split["target_members"], split["calibration_members"])  # known members are trained on too
    # seeds follow what is trained, not the configuration's name: a renamed configuration (e.g. "<name>+diffence")
    # maps to the same models in the cache
    recipe = json.dumps(target.model_dump(mode="json", exclude={"name"}), sort_keys=True)
    jobs = [TrainJob(f"{target.name}/target", target, "target", 0, members,
                     derive_seed(cfg.seed, recipe, "target"), fp, rows)]
    for k in range(cfg.reference.count):
        jobs.append(TrainJob(f"{target.name}/ref-{k:03d}", target, "reference", k, plan.pool[plan.keep[k]],
                             derive_seed(cfg.seed, recipe, "reference", k), fp, rows))
    return jobs


def produce_locally(plan: AuditPlan, cache: ModelCache, *, device: torch.device | str = "cpu",
                    reuse: bool = True) -> None:
    """Train (or reuse) every model of the plan in this process, no Ray: for tests and debugging."""
    produce_signals(plan.jobs, plan.dataset, plan.scored_indices, cache, query_views=list(plan.config.attacks.queries),
                    label_only=plan.config.attacks.label_only, views_id=plan.views_id, reuse=reuse,
                    strategy=plan.config.reference.strategy, device=device)


def load_signals(plan: AuditPlan, cache: ModelCache) -> tuple[dict[str, ModelSignals], list[TrainJob]]:
    """Outputs of every job found intact in the cache, and the jobs still missing."""
    found, missing = {}, []
    for job in plan.jobs:
        s = cache.load_signals(job.key, plan.views_id)
        if s is None:
            missing.append(job)
        else:
            found[job.job_id] = s
    return found, missing


def assemble_pool(plan: AuditPlan, target: TargetConfig, signals: dict[str, ModelSignals]) -> PoolSignals:
    """Stack the target's and its reference models' outputs with the keep-mask and each sample's role."""
    scored = plan.scored_indices
    roles = np.empty(len(scored), dtype=object)
    for role in ROLES:
        roles[np.isin(scored, plan.split[role])] = role
    jobs = plan.target_jobs(target.name)
    return PoolSignals(
        indices=scored, labels=plan.dataset.y[scored], roles=roles.astype(str),
        model_ids=np.asarray(["target" if j.role == "target" else f"ref-{j.index:03d}" for j in jobs]),
        logits=np.stack([signals[j.job_id].logits for j in jobs]),
        keep=np.stack([np.isin(scored, j.train_indices) for j in jobs]),
        label_only=np.stack([signals[j.job_id].label_only for j in jobs]),
        query_views=tuple(plan.config.attacks.queries),
        target_extra=dict(signals[jobs[0].job_id].extra),
    )


@dataclass(frozen=True, eq=False)
class TargetReport:
    """Utility and every attack's result for one target configuration."""

    target: TargetConfig
    train_acc: float
    test_acc: float
    attacks: dict[str, AttackResult]
    scores: pd.DataFrame  # one row per audited sample: index, label, is_member, one column per attack
    reference_test_acc: float
    pool: PoolSignals
    extra: dict[str, float] = field(default_factory=dict)
    inference: dict | None = None  # the inference-time defense the outputs went through (e.g. DIFFENCE knobs)

    @property
    def gap(self) -> float:
        return self.train_acc - self.test_acc

    def best_attack(self) -> AttackResult:
        """The attack with the highest AUC (ties: the first configured)."""
        return max(self.attacks.values(), key=lambda a: a.metrics.auc)

    def save(self, folder: str | Path) -> None:
        """Write the report as files (JSON, Parquet) that :meth:`load` turns back into the same report."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.pool.to_parquet(folder / "pool.parquet")
        self.scores.to_parquet(folder / "scores.parquet", index=False)
        (folder / "report.json").write_text(json.dumps({
            "target": self.target.model_dump(mode="json"), "train_acc": self.train_acc, "test_acc": self.test_acc,
            "reference_test_acc": self.reference_test_acc, "extra": self.extra, "inference": self.inference,
            "bal_acc_shadow": {n: a.bal_acc_shadow for n, a in self.attacks.items()},
        }))

    @classmethod
    def load(cls, folder: str | Path) -> "TargetReport":
        folder = Path(folder)
        meta = json.loads((folder / "report.json").read_text())
        scores = pd.read_parquet(folder / "scores.parquet")
        member = scores["is_member"].to_numpy()
        attacks = {}
        for name, bal in meta["bal_acc_shadow"].items():
            s = scores[name].to_numpy()
            attacks[name] = AttackResult(name, s[member], s[~member], AttackMetrics.from_scores(s[member], s[~member]), bal)
        return cls(target=TargetConfig.model_validate(meta["target"]), train_acc=meta["train_acc"],
                   test_acc=meta["test_acc"], attacks=attacks, scores=scores,
                   reference_test_acc=meta["reference_test_acc"], pool=PoolSignals.from_parquet(folder / "pool.parquet"),
                   extra=meta["extra"], inference=meta.get("inference"))


def evaluate_pool(cfg: AuditConfig, target: TargetConfig, pool: PoolSignals, *, inference: dict | None = None
                  ) -> TargetReport:
    """Every enabled attack against the target in ``pool`` (and, if configured, leave-one-out targets)."""
    knobs = cfg.attacks.knobs()
    inputs = separate_target_inputs(pool, knobs.rmia)
    attacks = run_attacks(cfg.attacks.enabled, inputs, knobs)
    t = pool.model("target")
    acc = {role: accuracy(pool.logits[t, pool.role_mask(role), 0], pool.labels[pool.role_mask(role)])
           for role in ("target_members", "test")}
    test = pool.role_mask("test")
    ref_acc = [accuracy(pool.logits[r, test, 0], pool.labels[test]) for r in pool.reference_rows]
    extra: dict[str, float] = {f"defense.{k}": v for k, v in pool.target_extra.items()}
    extra["ece"] = expected_calibration_error(pool.logits[t, test, 0], pool.labels[test])
    n_loo = min(cfg.attacks.loo_targets, len(pool.reference_rows))
    for k in range(n_loo):
        for name, r in run_attacks(cfg.attacks.enabled, leave_one_out_inputs(pool, k, knobs.rmia), knobs).items():
            vals = {"auc": r.metrics.auc, **{f"tpr_at_{lvl}_fpr": v for lvl, v in r.metrics.tpr_at_fpr.items()}}
            for metric in LOO_METRICS:
                key = f"loo.{name}.{metric}"
                extra[key] = extra.get(key, 0.0) + vals[metric] / n_loo
    audited = np.flatnonzero(pool.role_mask("target_members", "target_nonmembers"))
    columns = {}
    for name, a in attacks.items():
        col = np.empty(len(audited))
        col[inputs.is_member], col[~inputs.is_member] = a.member_scores, a.nonmember_scores
        columns[name] = col
    scores = pd.DataFrame({"index": pool.indices[audited], "label": inputs.labels, "is_member": inputs.is_member,
                           **columns})
    return TargetReport(target=target, train_acc=acc["target_members"], test_acc=acc["test"], attacks=attacks,
                        scores=scores, reference_test_acc=float(np.mean(ref_acc)), pool=pool, extra=extra,
                        inference=inference)
