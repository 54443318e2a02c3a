"""Metric definitions and their uncertainty: AUC (+ DeLong), TPR at fixed FPR (+ threshold, counts, Clopper–Pearson),
balanced accuracy; checked against independent computations."""

import numpy as np
import pytest
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from raymia.metrics import (
    AttackMetrics,
    balanced_accuracy,
    best_balanced_accuracy,
    clopper_pearson,
    delong_interval,
    roc_auc,
    roc_points,
    tpr_at_fpr,
)


def test_negating_scores_gives_one_minus_auc():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 5, 300).astype(float)  # heavy ties
    n = rng.integers(0, 4, 200).astype(float)
    assert roc_auc(-m, -n) == pytest.approx(1 - roc_auc(m, n), abs=1e-12)
    labels = np.r_[np.ones(300), np.zeros(200)]
    assert roc_auc(m, n) == pytest.approx(roc_auc_score(labels, np.r_[m, n]), abs=1e-12)


def test_auc_extremes_and_ties():
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.ones(10), np.ones(7)) == 0.5


def test_roc_points_equal_sklearns_curve():
    rng = np.random.default_rng(1)
    m, n = rng.integers(0, 30, 400).astype(float), rng.integers(0, 25, 300).astype(float)
    fpr, tpr, thr, tp, fp = roc_points(m, n)
    ref_fpr, ref_tpr, ref_thr = roc_curve(np.r_[np.ones(400), np.zeros(300)], np.r_[m, n], drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])
    np.testing.assert_allclose(tp, tpr * 400)
    np.testing.assert_allclose(fp, fpr * 300)


def test_tpr_at_fpr_reads_the_roc_curve_with_its_threshold_and_counts():
    # 1000 non-members at 0..999, members: 10 above every non-member, 90 mixed in.
    non = np.arange(1000.0)
    mem = np.r_[np.full(10, 5000.0), np.linspace(0, 999, 90)]
    zero = tpr_at_fpr(mem, non, 0.0)
    assert zero.tpr == pytest.approx(0.10) and zero.fp == 0 and zero.threshold == 5000.0 and zero.resolvable
    one = tpr_at_fpr(mem, non, 1e-3)  # one FP allowed admits the member at 999
    assert one.tpr == pytest.approx(0.11) and (one.tp, one.fp, one.fpr) == (11, 1, 0.001) and one.threshold == 999.0
    assert one.resolvable and not tpr_at_fpr(mem, non, 1e-4).resolvable  # 0.01 % of 1000 is under one sample
    summary = AttackMetrics.from_scores(mem, non)
    assert summary.n_nonmembers == 1000 and summary.tpr_at_fpr["0.1pct"] == pytest.approx(0.11)


def test_an_fpr_equal_to_the_level_is_admitted():
    # exactly 10 of 10,000 non-members above the member block: FPR = 0.001 exactly at the threshold 1.0
    non = np.r_[np.zeros(9990), np.full(10, 1.0)]
    mem = np.r_[np.full(50, 1.0), np.zeros(50)]
    r = tpr_at_fpr(mem, non, 1e-3)
    assert (r.fp, r.tp) == (10, 50) and r.fpr == 1e-3  # "FPR <= level"; the official LiRA code's "<" would give 0
    assert tpr_at_fpr(mem, non, 9.99e-4).tp == 0


def test_clopper_pearson_matches_the_beta_quantiles_and_covers():
    assert clopper_pearson(0, 20) == (0.0, pytest.approx(beta.ppf(0.975, 1, 20)))
    assert clopper_pearson(20, 20) == (pytest.approx(beta.ppf(0.025, 20, 1)), 1.0)
    lo, hi = clopper_pearson(7, 50)
    assert lo == pytest.approx(beta.ppf(0.025, 7, 44)) and hi == pytest.approx(beta.ppf(0.975, 8, 43))
    rng = np.random.default_rng(0)
    covered = [lo <= 0.3 <= hi for lo, hi in (clopper_pearson(int(k), 60) for k in rng.binomial(60, 0.3, 2000))]
    assert np.mean(covered) >= 0.95  # exact intervals are conservative


def test_delong_interval_matches_the_bootstrap_and_covers_the_true_auc():
    rng = np.random.default_rng(0)
    m, n = rng.normal(0.8, 1, 300), rng.normal(0, 1, 400)
    lo, hi = delong_interval(m, n)
    boot = []
    for _ in range(400):
        boot.append(roc_auc(rng.choice(m, len(m)), rng.choice(n, len(n))))
    assert lo == pytest.approx(np.quantile(boot, 0.025), abs=0.01) and hi == pytest.approx(np.quantile(boot, 0.975), abs=0.01)
    true_auc = 0.7161  # Phi(0.8 / sqrt(2))
    hits = 0
    for _ in range(300):
        a, b = rng.normal(0.8, 1, 200), rng.normal(0, 1, 200)
        lo, hi = delong_interval(a, b)
        hits += lo <= true_auc <= hi
    assert 0.92 <= hits / 300 <= 0.98


def test_balanced_accuracies():
    assert balanced_accuracy(np.array([1, 1, 0, 1], bool), np.array([0, 0, 1, 0], bool)) == pytest.approx(0.75)
    fpr, tpr, *_ = roc_points(np.array([3.0, 4.0]), np.array([1.0, 2.0, 3.5]))
    assert best_balanced_accuracy(fpr, tpr) == pytest.approx(0.5 * (1 + 2 / 3))
