"""Attack one target: stack its and its reference models' outputs into a pool, run every attack, report.

Ray-free and MLflow-free: :func:`evaluate_pool` turns a :class:`~raymia.signals.PoolSignals` into a
:class:`TargetReport`, which any runner (a local process, a Tune trial, ``raymia rescore``) produces the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from raymia.attacks.suite import (
    AttackResult,
    leave_one_out_inputs,
    run_attacks,
    separate_target_inputs,
)
from raymia.config import AuditConfig, TargetConfig
from raymia.data.splits import ROLES
from raymia.metrics import AttackMetrics, accuracy, expected_calibration_error
from raymia.pipeline.dp_audit import PrivacyFindings, privacy_findings
from raymia.pipeline.plan import AuditPlan, TrainJob
from raymia.signals import ModelSignals, PoolSignals

#: Metrics also averaged over leave-one-out targets (``attacks.loo_targets``).
LOO_METRICS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")


def assemble_pool(plan: AuditPlan, jobs: Sequence[TrainJob], signals: dict[str, ModelSignals],
                  rows: np.ndarray | None = None) -> PoolSignals:
    """Stack the outputs of ``jobs`` (the target first, then its reference models) on ``rows`` (default: the
    plan's scored rows) with the keep-mask and each sample's role."""
    scored = plan.scored_indices if rows is None else rows
    roles = np.empty(len(scored), dtype=object)
    for role in ROLES:
        roles[np.isin(scored, plan.split[role])] = role
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
    interval: tuple[float, float] | None = None  # DIFFENCE's calibrated interval, for a +diffence report
    privacy: PrivacyFindings | None = None  # ε bounds and the most vulnerable samples (config ``audit``)

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
            "interval": self.interval,
            "bal_acc_shadow": {n: a.bal_acc_shadow for n, a in self.attacks.items()},
            "chosen": {n: a.chosen for n, a in self.attacks.items()},
        }))
        if self.privacy is not None:
            self.privacy.save(folder / "privacy")

    @classmethod
    def load(cls, folder: str | Path) -> "TargetReport":
        folder = Path(folder)
        meta = json.loads((folder / "report.json").read_text())
        scores = pd.read_parquet(folder / "scores.parquet")
        member = scores["is_member"].to_numpy()
        attacks = {}
        for name, bal in meta["bal_acc_shadow"].items():
            s = scores[name].to_numpy()
            attacks[name] = AttackResult(name, s[member], s[~member], AttackMetrics.from_scores(s[member], s[~member]), bal,
                                         meta.get("chosen", {}).get(name, {}))
        return cls(target=TargetConfig.model_validate(meta["target"]), train_acc=meta["train_acc"],
                   test_acc=meta["test_acc"], attacks=attacks, scores=scores,
                   reference_test_acc=meta["reference_test_acc"], pool=PoolSignals.from_parquet(folder / "pool.parquet"),
                   extra=meta["extra"], inference=meta.get("inference"),
                   interval=tuple(meta["interval"]) if meta.get("interval") else None,
                   privacy=PrivacyFindings.load(folder / "privacy") if (folder / "privacy").is_dir() else None)


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
    # numbers the target's training reported (defense.*) and, for an endpoint, what querying it cost (endpoint.*)
    extra: dict[str, float] = {k if "." in k else f"defense.{k}": v for k, v in pool.target_extra.items()}
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
                        inference=inference, privacy=privacy_findings(cfg, target, pool, attacks))
