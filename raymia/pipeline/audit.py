"""Plan, train and evaluate one audit: targets and their shadow models, then every attack on every target."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from raymia.attacks import ModelOutputs, ShadowOutputs, run_attacks
from raymia.attacks.suite import AttackResult
from raymia.config import AuditConfig, TargetConfig
from raymia.data.datasets import Dataset
from raymia.data.splits import SplitPlan, make_split_plan, shadow_keep_mask
from raymia.metrics import accuracy
from raymia.models.classifiers import build_model, check_model
from raymia.training.loop import predict_logits, train_classifier


def derive_seed(*parts: object) -> int:
    """A 31-bit seed determined by ``parts`` (e.g. the audit seed, a target name and a model index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True, eq=False)
class TrainJob:
    """One classifier to train: a target or one of its shadow models."""

    job_id: str
    target: TargetConfig
    role: Literal["target", "shadow"]
    index: int
    train_indices: np.ndarray
    seed: int


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained classifier's weights and its logits ``[n_scored, C]`` on the plan's scored samples."""

    job_id: str
    logits: np.ndarray
    state: dict[str, torch.Tensor]
    epochs_run: int
    final_loss: float
    seconds: float


@dataclass(frozen=True, eq=False)
class AuditPlan:
    """Everything decided before training: data, split, shadow assignment and the list of models to train."""

    config: AuditConfig
    dataset: Dataset
    split: SplitPlan
    shadow_keep: np.ndarray  # bool [n_shadows, |population|]
    jobs: list[TrainJob]
    scored_indices: np.ndarray  # sorted dataset rows every model is evaluated on

    def job(self, target: str, role: str, index: int = 0) -> TrainJob:
        return next(j for j in self.jobs if j.target.name == target and j.role == role and j.index == index)


def plan_audit(cfg: AuditConfig, dataset: Dataset) -> AuditPlan:
    """Split the data, assign shadow training sets and list one job per target and per shadow model.

    Every architecture is built once and run on two inputs first, so a bad plug-in fails before training.
    """
    for i, t in enumerate(cfg.targets):
        check_model(t.model, dataset.input_shape, dataset.num_classes, field=f"targets.{i}.model")
    split = make_split_plan(len(dataset), cfg.split.fractions(), seed=cfg.seed,
                            data_fingerprint=dataset.fingerprint())
    pool = split["population"]
    keep = shadow_keep_mask(len(pool), cfg.shadows.count, fraction=cfg.shadows.train_fraction, seed=cfg.seed)
    jobs: list[TrainJob] = []
    for t in cfg.targets:
        jobs.append(TrainJob(f"{t.name}/target", t, "target", 0, split["target_members"],
                             derive_seed(cfg.seed, t.name, "target")))
        for k in range(cfg.shadows.count):
            jobs.append(TrainJob(f"{t.name}/shadow-{k:03d}", t, "shadow", k, pool[keep[k]],
                                 derive_seed(cfg.seed, t.name, "shadow", k)))
    return AuditPlan(cfg, dataset, split, keep, jobs, split.used_indices())


def run_train_job(job: TrainJob, dataset: Dataset, scored_indices: np.ndarray, *, device: torch.device | str = "cpu",
                  progress: bool = False, builders: Mapping[str, Callable[..., nn.Module]] | None = None
                  ) -> TrainedModel:
    """Train one job's classifier from its seed and compute its logits on ``scored_indices``.

    ``builders`` maps plug-in import paths to functions already resolved by the caller (for workers that
    cannot import the user's module).
    """
    start = time.perf_counter()
    model = build_model(job.target.model, dataset.input_shape, dataset.num_classes, seed=job.seed,
                        builder=(builders or {}).get(job.target.model.arch))
    x = torch.from_numpy(dataset.x[job.train_indices])
    y = torch.from_numpy(dataset.y[job.train_indices])
    result = train_classifier(model, x, y, job.target.train, seed=job.seed, device=device, progress=progress,
                              desc=job.job_id)
    logits = predict_logits(model, dataset.x[scored_indices], device=device)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return TrainedModel(job.job_id, logits, state, result.epochs_run, result.final_loss,
                        time.perf_counter() - start)


def train_all_locally(plan: AuditPlan, *, device: torch.device | str = "cpu") -> dict[str, TrainedModel]:
    """Train every job in this process, one after another (no Ray): for tests and debugging."""
    return {j.job_id: run_train_job(j, plan.dataset, plan.scored_indices, device=device) for j in plan.jobs}


@dataclass(frozen=True, eq=False)
class TargetReport:
    """Utility and every attack's result for one target configuration."""

    target: TargetConfig
    train_acc: float
    test_acc: float
    attacks: dict[str, AttackResult]
    scores: pd.DataFrame  # one row per audited sample: index, label, is_member, one column per attack
    shadow_test_acc: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return self.train_acc - self.test_acc

    def best_attack(self) -> AttackResult:
        """The attack with the highest AUC (ties: the first configured)."""
        return max(self.attacks.values(), key=lambda a: a.metrics.auc)


def _outputs(plan: AuditPlan, model: TrainedModel, rows: np.ndarray) -> ModelOutputs:
    pos = np.searchsorted(plan.scored_indices, rows)
    return ModelOutputs(model.logits[pos], plan.dataset.y[rows])


def evaluate_target(plan: AuditPlan, target: TargetConfig, models: dict[str, TrainedModel]) -> TargetReport:
    """Run every enabled attack against one target, calibrated on that target's shadow models."""
    cfg = plan.config
    split, pool = plan.split, plan.split["population"]
    tgt = models[plan.job(target.name, "target").job_id]
    members = _outputs(plan, tgt, split["target_members"])
    nonmembers = _outputs(plan, tgt, split["target_nonmembers"])
    test = _outputs(plan, tgt, split["test"])

    shadow_logits, shadow_labels, shadow_member, shadow_acc = [], [], [], []
    for k in range(cfg.shadows.count):
        sh = models[plan.job(target.name, "shadow", k).job_id]
        out = _outputs(plan, sh, pool)
        shadow_logits.append(out.logits)
        shadow_labels.append(out.labels)
        shadow_member.append(plan.shadow_keep[k])
        held_out = _outputs(plan, sh, split["test"])
        shadow_acc.append(accuracy(held_out.logits, held_out.labels))
    shadow = ShadowOutputs(ModelOutputs(np.concatenate(shadow_logits), np.concatenate(shadow_labels)),
                           np.concatenate(shadow_member))

    attacks = run_attacks(cfg.attacks.enabled, members, nonmembers, shadow, nn_config=cfg.attacks.nn)
    rows = np.concatenate([split["target_members"], split["target_nonmembers"]])
    scores = pd.DataFrame({
        "index": rows,
        "label": plan.dataset.y[rows],
        "is_member": np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)],
        **{name: np.r_[a.member_scores, a.nonmember_scores] for name, a in attacks.items()},
    })
    return TargetReport(target=target, train_acc=accuracy(members.logits, members.labels),
                        test_acc=accuracy(test.logits, test.labels), attacks=attacks, scores=scores,
                        shadow_test_acc=float(np.mean(shadow_acc)))
