"""Attack and utility metrics with their uncertainty: ROC AUC with a DeLong interval, TPR at fixed FPR with the
threshold, realised FPR, counts and a Clopper–Pearson interval, balanced accuracy, accuracy, ECE.

Convention everywhere: a higher membership score means "more likely a member"; members are the positive class.
Decision rule at threshold t: member iff score >= t. "TPR at FPR f" is the highest TPR over thresholds whose
realised FPR is at most f (FPR equal to f admitted; the official LiRA code uses strict ``<``). It is resolvable
only with at least 1/f non-members: below that, the smallest non-zero FPR exceeds f and the number is the TPR at
zero false positives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax
from scipy.stats import beta, norm, rankdata

#: FPR levels reported for every attack, and their metric-name suffixes.
FPR_LEVELS: dict[str, float] = {"1pct": 1e-2, "0.1pct": 1e-3, "0.01pct": 1e-4, "0pct": 0.0}
#: Two-sided confidence level of every interval raymia reports.
CONFIDENCE = 0.95


def _labelled(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    member, nonmember = np.asarray(member, dtype=np.float64), np.asarray(nonmember, dtype=np.float64)
    if len(member) == 0 or len(nonmember) == 0:
        raise ValueError("need at least one member and one non-member score")
    return member, nonmember


def roc_auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U / (m n)); ties count one half, so
    ``roc_auc(-m, -n) == 1 - roc_auc(m, n)``."""
    member, nonmember = _labelled(member, nonmember)
    ranks = rankdata(np.concatenate([member, nonmember]))
    n_in, n_out = len(member), len(nonmember)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def delong_interval(member: np.ndarray, nonmember: np.ndarray, confidence: float = CONFIDENCE
                    ) -> tuple[float, float]:
    """Two-sided ``confidence`` interval of the AUC from DeLong's variance (structural components from midranks),
    clipped to [0, 1]."""
    member, nonmember = _labelled(member, nonmember)
    n_in, n_out = len(member), len(nonmember)
    all_ranks = rankdata(np.concatenate([member, nonmember]))
    v10 = (all_ranks[:n_in] - rankdata(member)) / n_out          # per member: share of non-members below it
    v01 = 1.0 - (all_ranks[n_in:] - rankdata(nonmember)) / n_in  # per non-member: share of members above it
    auc = float(v10.mean())
    var = (v10.var(ddof=1) / n_in if n_in > 1 else 0.0) + (v01.var(ddof=1) / n_out if n_out > 1 else 0.0)
    half = norm.ppf(0.5 + confidence / 2) * np.sqrt(max(var, 0.0))
    return float(max(0.0, auc - half)), float(min(1.0, auc + half))


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided binomial interval for k successes in n trials (each tail (1 - confidence) / 2)."""
    a = (1 - confidence) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def roc_points(member: np.ndarray, nonmember: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ROC at every distinct threshold, from (0, 0) to (1, 1): ``(fpr, tpr, thresholds, tp, fp)``; the
    first threshold is +inf (nothing flagged)."""
    member, nonmember = _labelled(member, nonmember)
    scores = np.concatenate([member, nonmember])
    is_member = np.concatenate([np.ones(len(member), bool), np.zeros(len(nonmember), bool)])
    order = np.argsort(-scores, kind="mergesort")
    s, lab = scores[order], is_member[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last position of every distinct score
    tp = np.r_[0, np.cumsum(lab)[last]]
    fp = np.r_[0, (last + 1)] - tp
    return fp / len(nonmember), tp / len(member), np.r_[np.inf, s[last]], tp, fp


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
class TprAtFpr:
    """The TPR at one FPR level, with what it rests on.

    ``threshold``: member iff score >= threshold (+inf: nothing flagged); ``fpr``: the FPR realised there;
    ``tp`` of ``n_members`` and ``fp`` of ``n_nonmembers``; ``ci``: Clopper–Pearson interval of the TPR;
    ``resolvable``: at least 1/level non-members (else this is the TPR at zero false positives).
    """

    level: float
    tpr: float
    threshold: float
    fpr: float
    tp: int
    n_members: int
    fp: int
    n_nonmembers: int
    ci: tuple[float, float]
    resolvable: bool


def tpr_at_fpr(member: np.ndarray, nonmember: np.ndarray, level: float, *,
               roc: tuple[np.ndarray, ...] | None = None) -> TprAtFpr:
    """The highest TPR among thresholds whose realised FPR is at most ``level`` (chosen on the scored set)."""
    fpr, tpr, thr, tp, fp = roc if roc is not None else roc_points(member, nonmember)
    n_in, n_out = len(member), len(nonmember)
    ok = np.flatnonzero(fp <= level * n_out + 1e-9)  # counts, not rates: no rounding at the boundary
    i = ok[np.argmax(tp[ok])]
    return TprAtFpr(level, float(tpr[i]), float(thr[i]), float(fpr[i]), int(tp[i]), n_in, int(fp[i]), n_out,
                    clopper_pearson(int(tp[i]), n_in), level == 0 or level * n_out >= 1)


@dataclass(frozen=True)
class AttackMetrics:
    """Summary of one attack's scores on the audited members and non-members.

    ``auc`` with its DeLong interval ``auc_ci``; ``tpr_at_fpr`` maps the suffixes of :data:`FPR_LEVELS` to
    TPRs and ``at_fpr`` to their full :class:`TprAtFpr` records; ``fpr`` / ``tpr`` are the ROC points.
    """

    auc: float
    auc_ci: tuple[float, float]
    best_bal_acc: float
    at_fpr: dict[str, TprAtFpr]
    n_members: int
    n_nonmembers: int
    fpr: np.ndarray
    tpr: np.ndarray

    @property
    def tpr_at_fpr(self) -> dict[str, float]:
        return {name: r.tpr for name, r in self.at_fpr.items()}

    @classmethod
    def from_scores(cls, member: np.ndarray, nonmember: np.ndarray) -> "AttackMetrics":
        member, nonmember = _labelled(member, nonmember)
        roc = roc_points(member, nonmember)
        return cls(
            auc=roc_auc(member, nonmember),
            auc_ci=delong_interval(member, nonmember),
            best_bal_acc=best_balanced_accuracy(roc[0], roc[1]),
            at_fpr={name: tpr_at_fpr(member, nonmember, level, roc=roc) for name, level in FPR_LEVELS.items()},
            n_members=len(member),
            n_nonmembers=len(nonmember),
            fpr=roc[0],
            tpr=roc[1],
        )
