"""Run the configured attacks on one target and summarise each with the same metrics.

Threshold sources are explicit: AUC and TPR@FPR are threshold-free (a sweep over the audited scores);
``best_bal_acc`` is the oracle balanced accuracy (threshold chosen on the audited scores);
``bal_acc_shadow`` applies thresholds fitted on shadow models only (class-dependent for metric attacks,
the attack network's own decision for ``nn``), which is what a real attacker achieves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymia.attacks.metric import METRIC_ATTACKS, class_thresholds
from raymia.attacks.nn import NNAttackConfig, nn_attack_scores
from raymia.attacks.outputs import ModelOutputs, ShadowOutputs
from raymia.metrics import AttackMetrics, balanced_accuracy

ATTACK_NAMES: tuple[str, ...] = (*METRIC_ATTACKS, "nn")


@dataclass(frozen=True, eq=False)
class AttackResult:
    """One attack's scores on the audited members / non-members and their metrics."""

    name: str
    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    metrics: AttackMetrics
    bal_acc_shadow: float


def run_attacks(names: list[str] | tuple[str, ...], members: ModelOutputs, nonmembers: ModelOutputs,
                shadow: ShadowOutputs, *, nn_config: NNAttackConfig | None = None) -> dict[str, AttackResult]:
    """Score the target's outputs on its ``members`` and ``nonmembers`` with every attack in ``names``.

    ``shadow`` holds shadow models' outputs on their own IN/OUT samples; it calibrates thresholds and trains
    the NN attack. The target's membership labels are only used to compute metrics.
    """
    unknown = set(names) - set(ATTACK_NAMES)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; known: {list(ATTACK_NAMES)}")
    shadow_in, shadow_out = shadow.split()
    num_classes = members.logits.shape[1]
    results: dict[str, AttackResult] = {}
    for name in names:
        if name == "nn":
            s_mem, s_non = nn_attack_scores(shadow, [members, nonmembers], nn_config)
            bal = balanced_accuracy(s_mem > 0, s_non > 0)
        else:
            score = METRIC_ATTACKS[name]
            s_mem, s_non = score(members), score(nonmembers)
            thr = class_thresholds(score(shadow_in), shadow_in.labels, score(shadow_out), shadow_out.labels,
                                   num_classes)
            bal = balanced_accuracy(s_mem >= thr[members.labels], s_non >= thr[nonmembers.labels])
        results[name] = AttackResult(name, s_mem, s_non, AttackMetrics.from_scores(s_mem, s_non), bal)
    return results
