"""Every attack on one target, from one set of inputs, summarised with the same metrics.

:class:`AttackInputs` gathers what attacks may see about a target: its outputs on the audited examples, the
reference models' outputs on the same examples with their keep-mask (LiRA, RMIA), the reference models'
outputs on the pool samples they did or did not train on (shadow calibration, NN attack), and on population
samples (RMIA's z). Two
layouts build it from :class:`~raymia.signals.PoolSignals`: a separately trained target
(:func:`separate_target_inputs`) and LiRA's leave-one-out, where reference model k is the target and the others
are its references (:func:`leave_one_out_inputs`).

Threshold sources: AUC and TPR@FPR are threshold-free (a sweep over the audited scores); ``best_bal_acc`` is
the oracle balanced accuracy; ``bal_acc_shadow`` applies thresholds fitted on reference models only (metric
and label-only attacks: class-dependent; ``nn``: the attack network's own decision); LiRA and RMIA have none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict

from raymia.attacks.lira import LiRAConfig, lira_scores, scaled_logit
from raymia.attacks.metric import METRIC_ATTACKS, class_thresholds
from raymia.attacks.nn import NNAttackConfig, nn_attack_scores
from raymia.attacks.outputs import ModelOutputs, ShadowOutputs
from raymia.attacks.rmia import RMIAConfig, rmia_scores, true_label_prob
from raymia.data.queries import LabelOnlyConfig
from raymia.metrics import AttackMetrics, balanced_accuracy, roc_auc
from raymia.signals import PoolSignals

LIRA_ATTACKS = ("lira_online", "lira_offline", "lira_online_fixed_var", "lira_offline_fixed_var")
RMIA_ATTACKS = ("rmia_online", "rmia_offline")
ATTACK_NAMES: tuple[str, ...] = (*METRIC_ATTACKS, "label_only_aug", "nn", *LIRA_ATTACKS, *RMIA_ATTACKS)


class AttackKnobs(BaseModel):
    """Per-attack settings (config section ``attacks``, minus the list of enabled attacks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nn: NNAttackConfig = NNAttackConfig()
    lira: LiRAConfig = LiRAConfig()
    rmia: RMIAConfig = RMIAConfig()
    label_only: LabelOnlyConfig = LabelOnlyConfig()


@dataclass(frozen=True, eq=False)
class AttackInputs:
    """What the attacker observes for one target (A query views, C classes, K reference models).

    Attributes:
        target: the target's logits ``[n, A, C]`` on the audited examples; ``labels [n]``.
        is_member: ``[n]`` ground truth — used only to compute metrics, never by an attack.
        refs / ref_in: reference logits ``[K, n, A, C]`` on the same examples, keep-mask ``[K, n]``.
        target_label_only: ``[n, V]`` labels the target predicts under the label-only views.
        shadow_logits / shadow_labels / shadow_in / shadow_label_only: reference models on their pool samples
            (IN or OUT), one row per (model, sample): ``[R, A, C]``, ``[R]``, ``[R]``, ``[R, V]``.
        z_target / z_refs / z_ref_in / z_labels: RMIA's population samples: ``[m, A, C]``, ``[K, m, A, C]``,
            ``[K, m]``, ``[m]``.
    """

    target: np.ndarray
    labels: np.ndarray
    is_member: np.ndarray
    refs: np.ndarray
    ref_in: np.ndarray
    target_label_only: np.ndarray
    shadow_logits: np.ndarray
    shadow_labels: np.ndarray
    shadow_in: np.ndarray
    shadow_label_only: np.ndarray
    z_target: np.ndarray
    z_refs: np.ndarray
    z_ref_in: np.ndarray
    z_labels: np.ndarray


def population_sample(n: int, rmia: RMIAConfig) -> np.ndarray:
    """Positions ``[m]`` of RMIA's z among ``n`` candidate population samples: all of them, or ``num_z`` drawn with
    ``rmia.seed`` (the same draw for every report of an audit, DIFFENCE's included)."""
    if rmia.num_z is None or rmia.num_z >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(rmia.seed).choice(n, rmia.num_z, replace=False))


def attack_inputs(pool: PoolSignals, target_row: int, ref_rows: np.ndarray, audited: np.ndarray,
                  is_member: np.ndarray, rmia: RMIAConfig) -> AttackInputs:
    """What the attacker of model ``target_row`` observes on the pool positions ``audited`` (ground truth
    ``is_member``), with the models ``ref_rows`` as its references."""
    # z: population samples the target never trained on (with population in the reference pool, a leave-one-out
    # target trained on some of them)
    candidates = np.flatnonzero(pool.role_mask("population") & ~pool.keep[target_row])
    z = candidates[population_sample(len(candidates), rmia)]
    if pool.keep[target_row, z].any():
        raise AssertionError("RMIA's population overlaps the target's training rows")
    keep = pool.keep[ref_rows]
    trained_on = np.flatnonzero(keep.any(axis=0) & ~keep.all(axis=0))  # the reference pool: IN for some, OUT for others
    shadow_rows = np.ix_(ref_rows, trained_on)
    return AttackInputs(
        target=pool.logits[target_row, audited], labels=pool.labels[audited], is_member=is_member,
        refs=pool.logits[np.ix_(ref_rows, audited)], ref_in=pool.keep[np.ix_(ref_rows, audited)],
        target_label_only=pool.label_only[target_row, audited],
        shadow_logits=pool.logits[shadow_rows].reshape(-1, *pool.logits.shape[2:]),
        shadow_labels=np.tile(pool.labels[trained_on], len(ref_rows)),
        shadow_in=pool.keep[shadow_rows].reshape(-1),
        shadow_label_only=pool.label_only[shadow_rows].reshape(-1, pool.label_only.shape[2]),
        z_target=pool.logits[target_row, z], z_refs=pool.logits[np.ix_(ref_rows, z)],
        z_ref_in=pool.keep[np.ix_(ref_rows, z)],
        z_labels=pool.labels[z],
    )


def separate_target_inputs(pool: PoolSignals, rmia: RMIAConfig | None = None) -> AttackInputs:
    """The separately trained target, audited on its members and non-members."""
    audited = np.flatnonzero(pool.role_mask("target_members", "target_nonmembers"))
    return attack_inputs(pool, pool.model("target"), pool.reference_rows, audited,
                   pool.roles[audited] == "target_members", rmia or RMIAConfig())


def leave_one_out_inputs(pool: PoolSignals, k: int, rmia: RMIAConfig | None = None) -> AttackInputs:
    """LiRA's layout: reference model ``k`` is the target, the other reference models are its references,
    and the audited examples are IN for it where its keep-mask says so."""
    refs = pool.reference_rows
    audited = np.flatnonzero(pool.role_mask("target_members", "target_nonmembers"))
    return attack_inputs(pool, refs[k], np.delete(refs, k), audited, pool.keep[refs[k], audited], rmia or RMIAConfig())


@dataclass(frozen=True, eq=False)
class AttackResult:
    """One attack's scores on the audited members / non-members and their metrics; ``chosen``: knobs the attack
    tuned on reference models only (e.g. RMIA's ``a``), recorded with the result."""

    name: str
    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    metrics: AttackMetrics
    bal_acc_shadow: float | None
    chosen: dict[str, float] = field(default_factory=dict)


def _label_only_score(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Fraction of label-only views ``[n, V]`` still classified as the true label."""
    return (preds == labels[:, None]).mean(axis=1)


def _shadow_calibrated(score: Callable[..., np.ndarray], target_args: tuple, shadow_args: tuple, inputs: AttackInputs,
                       num_classes: int) -> tuple[np.ndarray, float]:
    """Scores of the target and balanced accuracy with class-dependent thresholds fitted on the shadows."""
    s_target, s_shadow = score(*target_args), score(*shadow_args)
    m, sin = inputs.is_member, inputs.shadow_in
    thr = class_thresholds(s_shadow[sin], inputs.shadow_labels[sin], s_shadow[~sin], inputs.shadow_labels[~sin],
                           num_classes)
    decided = s_target >= thr[inputs.labels]
    return s_target, balanced_accuracy(decided[m], decided[~m])


#: Reference models used as pseudo-targets when RMIA's ``a`` is tuned.
RMIA_TUNING_TARGETS = 4


def tune_rmia_a(inputs: AttackInputs, cfg: RMIAConfig) -> float:
    """``a`` on the grid 0, 0.1, ..., 1 maximising the mean offline-RMIA AUC over up to
    :data:`RMIA_TUNING_TARGETS` reference models, each attacked as a pseudo-target with the others as its
    references and its own keep-mask as the membership — reference models only, never the target's audited
    memberships (ML Privacy Meter tunes on the target's complement model, which leaks them)."""
    p = true_label_prob(inputs.refs, inputs.labels, cfg.temperature)
    pz = true_label_prob(inputs.z_refs, inputs.z_labels, cfg.temperature)
    k = len(p)
    grid = np.round(np.linspace(0, 1, 11), 10)
    auc = np.zeros(len(grid))
    targets = range(min(RMIA_TUNING_TARGETS, k - 1)) if k > 1 else []
    for j in targets:
        others = np.delete(np.arange(k), j)
        member, z = inputs.ref_in[j], ~inputs.z_ref_in[j]  # z: population the pseudo-target never trained on
        if member.all() or not member.any():
            continue
        for g, a in enumerate(grid):
            s = rmia_scores(p[j], p[others], inputs.ref_in[others], pz[j][z], pz[others][:, z],
                            inputs.z_ref_in[others][:, z], online=False, gamma=cfg.gamma, a=float(a))
            auc[g] += roc_auc(s[member], s[~member])
    return float(grid[int(np.argmax(auc))])  # ties: the smallest a


def run_attacks(names: list[str] | tuple[str, ...], inputs: AttackInputs, knobs: AttackKnobs | None = None
                ) -> dict[str, AttackResult]:
    """Score the target with every attack in ``names``; ``inputs.is_member`` is only used for metrics."""
    unknown = set(names) - set(ATTACK_NAMES)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; known: {list(ATTACK_NAMES)}")
    knobs = knobs or AttackKnobs()
    c = inputs.target.shape[-1]
    identity = ModelOutputs(inputs.target[:, 0], inputs.labels)
    shadow_identity = ModelOutputs(inputs.shadow_logits[:, 0], inputs.shadow_labels)
    scores: dict[str, tuple[np.ndarray, float | None]] = {}
    chosen: dict[str, dict[str, float]] = {}
    rmia_a: float | None = None  # tuned once, shared by online and offline RMIA
    for name in names:
        if name in METRIC_ATTACKS:
            scores[name] = _shadow_calibrated(METRIC_ATTACKS[name], (identity,), (shadow_identity,), inputs, c)
        elif name == "label_only_aug":
            scores[name] = _shadow_calibrated(_label_only_score, (inputs.target_label_only, inputs.labels),
                                              (inputs.shadow_label_only, inputs.shadow_labels), inputs, c)
        elif name == "nn":
            (s,) = nn_attack_scores(ShadowOutputs(shadow_identity, inputs.shadow_in), [identity], knobs.nn)
            scores[name] = (s, balanced_accuracy(s[inputs.is_member] > 0, s[~inputs.is_member] > 0))
        elif name in LIRA_ATTACKS:
            s = lira_scores(scaled_logit(inputs.target, inputs.labels), scaled_logit(inputs.refs, inputs.labels),
                            inputs.ref_in, online="online" in name, fixed_variance=name.endswith("fixed_var"),
                            config=knobs.lira)
            scores[name] = (s, None)
        else:  # RMIA
            cfg = knobs.rmia
            if rmia_a is None:
                rmia_a = tune_rmia_a(inputs, cfg) if cfg.a == "auto" else float(cfg.a)
            t = cfg.temperature
            s = rmia_scores(true_label_prob(inputs.target, inputs.labels, t), true_label_prob(inputs.refs, inputs.labels, t),
                            inputs.ref_in, true_label_prob(inputs.z_target, inputs.z_labels, t),
                            true_label_prob(inputs.z_refs, inputs.z_labels, t), inputs.z_ref_in,
                            online=name == "rmia_online", gamma=cfg.gamma, a=rmia_a)
            scores[name] = (s, None)
            chosen[name] = {"a": rmia_a}
    m = inputs.is_member
    return {name: AttackResult(name, s[m], s[~m], AttackMetrics.from_scores(s[m], s[~m]), bal, chosen.get(name, {}))
            for name, (s, bal) in scores.items()}
