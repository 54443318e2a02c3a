"""Attack and utility metrics: ROC AUC, TPR at fixed FPR, balanced accuracy, accuracy.

Convention everywhere: a higher membership score means "more likely a member"; members are the positive class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax
from sklearn.metrics import roc_auc_score, roc_curve

#: FPR levels reported for every attack, and their metric-name suffixes.
FPR_LEVELS: dict[str, float] = {"1pct": 1e-2, "0.1pct": 1e-3, "0.01pct": 1e-4, "0pct": 0.0}


def _labelled(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    member, nonmember = np.asarray(member, dtype=np.float64), np.asarray(nonmember, dtype=np.float64)
    if len(member) == 0 or len(nonmember) == 0:
        raise ValueError("need at least one member and one non-member score")
    scores = np.concatenate([member, nonmember])
    labels = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    return labels, scores


def roc_auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """Area under the ROC curve; ties count one half, so ``roc_auc(-m, -n) == 1 - roc_auc(m, n)``."""
    labels, scores = _labelled(member, nonmember)
    return float(roc_auc_score(labels, scores))


def roc_points(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    labels, scores = _labelled(member, nonmember)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """Highest TPR among ROC points whose FPR is at most ``level`` (a threshold chosen on the scored set)."""
    ok = fpr <= level + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def best_balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """``max over thresholds of (TPR + TNR) / 2``: the oracle attack accuracy on balanced member/non-member sets."""
    return float(np.max(0.5 * (tpr + 1.0 - fpr)))


def balanced_accuracy(pred_member: np.ndarray, pred_nonmember: np.ndarray) -> float:
    """``(TPR + TNR) / 2`` of hard membership decisions (bool arrays for members and non-members)."""
    return float(0.5 * (np.mean(pred_member) + 1.0 - np.mean(pred_nonmember)))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits [n, C]`` against ``labels [n]``."""
    return float(np.mean(np.argmax(logits, axis=1) == labels)) if len(labels) else float("nan")


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the released confidence vectors: sum over equal-width confidence bins of
    (bin share) * |accuracy - mean confidence|, with confidence = max softmax probability."""
    p = softmax(logits.astype(np.float64), axis=1)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    return float(ece)


@dataclass(frozen=True)
class AttackMetrics:
    """Threshold-free summary of one attack's scores on the audited members and non-members.

    ``tpr_at_fpr`` maps the suffixes of :data:`FPR_LEVELS` to TPRs. With ``n_nonmembers`` non-members the
    smallest non-zero FPR is ``1 / n_nonmembers``: TPR at a lower FPR is TPR at zero false positives.
    """

    auc: float
    best_bal_acc: float
    tpr_at_fpr: dict[str, float]
    n_members: int
    n_nonmembers: int
    fpr: np.ndarray
    tpr: np.ndarray

    @classmethod
    def from_scores(cls, member: np.ndarray, nonmember: np.ndarray) -> "AttackMetrics":
        fpr, tpr = roc_points(member, nonmember)
        return cls(
            auc=roc_auc(member, nonmember),
            best_bal_acc=best_balanced_accuracy(fpr, tpr),
            tpr_at_fpr={name: tpr_at_fpr(fpr, tpr, level) for name, level in FPR_LEVELS.items()},
            n_members=len(member),
            n_nonmembers=len(nonmember),
            fpr=fpr,
            tpr=tpr,
        )
