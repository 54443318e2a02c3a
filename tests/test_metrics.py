"""Metric definitions: AUC, TPR at fixed FPR, balanced accuracy."""

import numpy as np
import pytest

from raymia.metrics import AttackMetrics, balanced_accuracy, best_balanced_accuracy, roc_auc, roc_points, tpr_at_fpr


def test_negating_scores_gives_one_minus_auc():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 5, 300).astype(float)  # heavy ties
    n = rng.integers(0, 4, 200).astype(float)
    assert roc_auc(-m, -n) == pytest.approx(1 - roc_auc(m, n), abs=1e-12)


def test_auc_extremes_and_ties():
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.ones(10), np.ones(7)) == 0.5


def test_tpr_at_fpr_reads_the_roc_curve():
    # 1000 non-members at 0..999, members: 10 above every non-member, 90 mixed in.
    non = np.arange(1000.0)
    mem = np.r_[np.full(10, 5000.0), np.linspace(0, 999, 90)]
    fpr, tpr = roc_points(mem, non)
    assert tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(0.10)
    assert tpr_at_fpr(fpr, tpr, 1e-3) == pytest.approx(0.11)  # one FP allowed admits the member at 999
    summary = AttackMetrics.from_scores(mem, non)
    assert summary.n_nonmembers == 1000 and summary.tpr_at_fpr["0.1pct"] == pytest.approx(0.11)


def test_balanced_accuracies():
    assert balanced_accuracy(np.array([1, 1, 0, 1], bool), np.array([0, 0, 1, 0], bool)) == pytest.approx(0.75)
    fpr, tpr = roc_points(np.array([3.0, 4.0]), np.array([1.0, 2.0, 3.5]))
    assert best_balanced_accuracy(fpr, tpr) == pytest.approx(0.5 * (1 + 2 / 3))
