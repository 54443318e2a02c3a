"""Metric-based attacks (Yeom et al. 2018; Song & Mittal 2021) and their class-dependent thresholds.

Each score function maps :class:`ModelOutputs` to ``[n]`` membership scores, higher = more likely a member:

- ``loss``              log p_y  (the negated cross-entropy; Yeom et al.)
- ``correctness``       1[argmax p = y]
- ``confidence``        p_y, the probability of the TRUE class
- ``entropy``           -H(p) = sum_j p_j log p_j
- ``modified_entropy``  -Mentr, Mentr = -(1 - p_y) log p_y - sum_{j != y} p_j log(1 - p_j)  (logs clamped at 1e-30)
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from raymia.attacks.outputs import ModelOutputs

_LOG_FLOOR = np.log(1e-30)


def loss_score(out: ModelOutputs) -> np.ndarray:
    return out.log_probs()[np.arange(len(out)), out.labels]


def correctness_score(out: ModelOutputs) -> np.ndarray:
    return (np.argmax(out.logits, axis=1) == out.labels).astype(np.float64)


def confidence_score(out: ModelOutputs) -> np.ndarray:
    return np.exp(loss_score(out))


def entropy_score(out: ModelOutputs) -> np.ndarray:
    logp = out.log_probs()
    return np.sum(np.exp(logp) * logp, axis=1)


def modified_entropy_score(out: ModelOutputs) -> np.ndarray:
    logp = out.log_probs()
    p = np.exp(logp)
    rows = np.arange(len(out))
    p_y = p[rows, out.labels]
    log_p = np.maximum(logp, _LOG_FLOOR)
    with np.errstate(divide="ignore"):  # p_j == 1 gives log(0) = -inf, floored just below
        log_1mp = np.maximum(np.log1p(-np.minimum(p, 1.0)), _LOG_FLOOR)
    wrong = p * log_1mp
    wrong[rows, out.labels] = 0.0
    mentr = -(1.0 - p_y) * log_p[rows, out.labels] - wrong.sum(axis=1)
    return -mentr


METRIC_ATTACKS: dict[str, Callable[[ModelOutputs], np.ndarray]] = {
    "loss": loss_score,
    "correctness": correctness_score,
    "confidence": confidence_score,
    "entropy": entropy_score,
    "modified_entropy": modified_entropy_score,
}


def best_threshold(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Threshold t maximising ``(frac(in >= t) + frac(out < t)) / 2`` over the observed score values; ties go to
    the smallest t. The objective is compared as the exact integer ``#(in >= t) * n_out + #(out < t) * n_in``, so
    float rounding never decides a tie."""
    cands = np.unique(np.concatenate([scores_in, scores_out]))
    s_in, s_out = np.sort(scores_in), np.sort(scores_out)
    n_in, n_out = max(len(s_in), 1), max(len(s_out), 1)
    tp = len(s_in) - np.searchsorted(s_in, cands, side="left")
    tn = np.searchsorted(s_out, cands, side="left")
    return float(cands[np.argmax(tp.astype(np.int64) * n_out + tn.astype(np.int64) * n_in)])


def class_thresholds(scores_in: np.ndarray, labels_in: np.ndarray, scores_out: np.ndarray, labels_out: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """Per-class thresholds ``[num_classes]`` fitted on shadow IN/OUT scores (Song & Mittal).

    A class without both IN and OUT shadow samples falls back to the threshold fitted on all classes.
    """
    fallback = best_threshold(scores_in, scores_out)
    thr = np.full(num_classes, fallback, dtype=np.float64)
    for c in range(num_classes):
        s_in, s_out = scores_in[labels_in == c], scores_out[labels_out == c]
        if len(s_in) and len(s_out):
            thr[c] = best_threshold(s_in, s_out)
    return thr
