"""Attacks against their definitions, and the sanity properties every MIA must have."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raymia.attacks import ATTACK_NAMES, ModelOutputs, class_thresholds
from raymia.attacks.metric import METRIC_ATTACKS, best_threshold
from raymia.attacks.nn import NNAttackConfig
from raymia.attacks.suite import AttackKnobs, run_attacks
from tests.synthetic import synthetic_inputs

FAST = AttackKnobs(nn=NNAttackConfig(epochs=8))


def test_score_definitions_match_the_formulas():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], dtype=np.float32)
    labels = np.array([0, 1])
    out = ModelOutputs(logits, labels)
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 1).numpy()
    rows = np.arange(2)
    py = p[rows, labels]
    ce = F.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels), reduction="none").numpy()
    np.testing.assert_allclose(METRIC_ATTACKS["loss"](out), -ce, rtol=1e-12)
    np.testing.assert_allclose(METRIC_ATTACKS["confidence"](out), py, rtol=1e-12)
    np.testing.assert_array_equal(METRIC_ATTACKS["correctness"](out), [1.0, 0.0])
    np.testing.assert_allclose(METRIC_ATTACKS["entropy"](out), (p * np.log(p)).sum(1), rtol=1e-12)
    mentr = []
    for i, y in enumerate(labels):
        wrong = sum(p[i, j] * np.log(1 - p[i, j]) for j in range(3) if j != y)
        mentr.append(-(1 - p[i, y]) * np.log(p[i, y]) - wrong)
    np.testing.assert_allclose(METRIC_ATTACKS["modified_entropy"](out), -np.array(mentr), rtol=1e-10)


def test_scores_are_finite_for_saturated_softmax():
    out = ModelOutputs(np.array([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype=np.float32), np.array([0, 0]))
    for name, score in METRIC_ATTACKS.items():
        assert np.isfinite(score(out)).all(), name


def test_class_dependent_thresholds_separate_what_one_global_threshold_cannot():
    # class 0: members score ~1, non-members ~0; class 1: members ~11, non-members ~10.
    s_in, y_in = np.array([1.0, 1.1, 11.0, 11.1]), np.array([0, 0, 1, 1])
    s_out, y_out = np.array([0.0, 0.1, 10.0, 10.1]), np.array([0, 0, 1, 1])
    thr = class_thresholds(s_in, y_in, s_out, y_out, num_classes=3)
    assert (s_in >= thr[y_in]).all() and (s_out < thr[y_out]).all()
    assert thr[2] == best_threshold(s_in, s_out)  # class with no shadow data falls back to the global threshold
    g = best_threshold(s_in, s_out)
    assert 0.5 * ((s_in >= g).mean() + (s_out < g).mean()) < 1.0


def test_every_attack_is_at_chance_on_identical_distributions():
    results = run_attacks(ATTACK_NAMES, synthetic_inputs(np.random.default_rng(0), k=8, margin=0.0), FAST)
    assert set(results) == set(ATTACK_NAMES)
    for name, r in results.items():
        assert abs(r.metrics.auc - 0.5) < 0.05, (name, r.metrics.auc)
        if r.bal_acc_shadow is not None:
            assert abs(r.bal_acc_shadow - 0.5) < 0.05, (name, r.bal_acc_shadow)


def test_every_attack_detects_a_leak_and_relabelling_flips_auc():
    inputs = synthetic_inputs(np.random.default_rng(1), n=2000, margin=1.5)
    results = run_attacks(ATTACK_NAMES, inputs, FAST)
    for name, r in results.items():
        assert r.metrics.auc > 0.55, (name, r.metrics.auc)
        if r.bal_acc_shadow is not None:
            assert r.bal_acc_shadow > 0.53, (name, r.bal_acc_shadow)
    flipped = run_attacks(ATTACK_NAMES, dataclasses.replace(inputs, is_member=~inputs.is_member), FAST)
    for name in ATTACK_NAMES:
        assert flipped[name].metrics.auc == pytest.approx(1.0 - results[name].metrics.auc, abs=1e-12), name


def test_low_fpr_attacks_beat_global_thresholds_when_examples_differ_in_difficulty():
    # Per-example calibration (LiRA, RMIA) removes the example-difficulty noise that a global loss threshold
    # suffers from: the core claim of Carlini et al. 2022.
    results = run_attacks(["loss", "lira_online", "lira_offline", "rmia_online"],
                          synthetic_inputs(np.random.default_rng(2), n=4000, k=32, margin=1.0), FAST)
    tpr = {name: r.metrics.tpr_at_fpr["1pct"] for name, r in results.items()}
    assert tpr["lira_online"] > tpr["loss"] and tpr["lira_offline"] > tpr["loss"] and tpr["rmia_online"] > tpr["loss"]


def test_threshold_ties_are_decided_exactly_not_by_float_rounding():
    """Among thresholds with the same balanced accuracy (compared as exact fractions), the smallest one wins."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    mismatches = 0
    for _ in range(300):
        s_in = rng.integers(0, 6, rng.integers(1, 12)).astype(float)
        s_out = rng.integers(0, 6, rng.integers(1, 12)).astype(float)
        cands = np.unique(np.r_[s_in, s_out])
        value = {t: Fraction(int((s_in >= t).sum()), len(s_in)) + Fraction(int((s_out < t).sum()), len(s_out))
                 for t in cands}
        best = max(value.values())
        expected = min(t for t, v in value.items() if v == best)
        mismatches += best_threshold(s_in, s_out) != expected
    assert mismatches == 0
    # a case where summing the two rates in floats ranks a tie wrongly: 3/4 + 2/6 and 1/4 + 5/6 are both 13/12
    s_in, s_out = np.array([0.0, 6.0, 3.0, 3.0]), np.array([0.0, 7.0, 4.0, 4.0, 4.0, 1.0])
    assert best_threshold(s_in, s_out) == 3.0


def test_nn_attack_trains_on_a_seeded_sample_of_at_most_max_rows_shadow_rows():
    from raymia.attacks.nn import NNAttackConfig, nn_attack_scores
    from raymia.attacks.outputs import ModelOutputs, ShadowOutputs

    rng = np.random.default_rng(0)
    member = rng.random(3000) < 0.5
    labels = rng.integers(0, 4, 3000)
    logits = rng.normal(size=(3000, 4)) + 3 * np.eye(4)[labels] * member[:, None]
    shadow = ShadowOutputs(ModelOutputs(logits, labels), member)
    target = ModelOutputs(logits[:200], labels[:200])
    small = NNAttackConfig(epochs=3, max_rows=500)
    a, b = nn_attack_scores(shadow, [target], small)[0], nn_attack_scores(shadow, [target], small)[0]
    np.testing.assert_array_equal(a, b)  # the sample is seeded
    full = nn_attack_scores(shadow, [target], NNAttackConfig(epochs=3, max_rows=None))[0]
    assert not np.allclose(a, full)  # a different training set: the cap took effect
