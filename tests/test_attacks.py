"""Attacks against their definitions, and the sanity properties every MIA must have."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raymia.attacks import ATTACK_NAMES, ModelOutputs, ShadowOutputs, class_thresholds, run_attacks
from raymia.attacks.metric import METRIC_ATTACKS, best_threshold
from raymia.attacks.nn import NNAttackConfig
from raymia.models.classifiers import ModelSpec, build_model
from raymia.training.loop import TrainRecipe, predict_logits, train_classifier

NN_FAST = NNAttackConfig(epochs=15)


def _outputs(rng, n, c=10, margin=0.0):
    """Random logits where the true class gets an extra ``margin`` (a crude stand-in for memorisation)."""
    labels = rng.integers(0, c, n)
    logits = rng.normal(0, 2, (n, c))
    logits[np.arange(n), labels] += 3.0 + rng.exponential(1.0, n) + margin
    return ModelOutputs(logits.astype(np.float32), labels)


def _shadow(rng, n, margin):
    members, nonmembers = _outputs(rng, n, margin=margin), _outputs(rng, n)
    return ShadowOutputs(ModelOutputs(np.r_[members.logits, nonmembers.logits], np.r_[members.labels, nonmembers.labels]),
                         np.r_[np.ones(n, bool), np.zeros(n, bool)])


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
    rng = np.random.default_rng(0)
    members, nonmembers = _outputs(rng, 4000), _outputs(rng, 4000)
    results = run_attacks(ATTACK_NAMES, members, nonmembers, _shadow(rng, 2000, margin=0.0), nn_config=NN_FAST)
    for name, r in results.items():
        assert abs(r.metrics.auc - 0.5) < 0.05, (name, r.metrics.auc)
        assert abs(r.bal_acc_shadow - 0.5) < 0.05, (name, r.bal_acc_shadow)


def test_every_attack_detects_a_separable_leak():
    rng = np.random.default_rng(1)
    members, nonmembers = _outputs(rng, 2000, margin=4.0), _outputs(rng, 2000)
    results = run_attacks(ATTACK_NAMES, members, nonmembers, _shadow(rng, 2000, margin=4.0), nn_config=NN_FAST)
    for name, r in results.items():
        assert r.metrics.auc > 0.6, (name, r.metrics.auc)
        assert r.bal_acc_shadow > 0.55, (name, r.bal_acc_shadow)


# ---------------------------------------------------------------------------------------- real digits models

SPEC, RECIPE = ModelSpec(params={"hidden": [256]}), TrainRecipe(epochs=60, batch_size=32)


def _fit(digits, idx, seed):
    model = build_model(SPEC, digits.input_shape, digits.num_classes, seed=seed)
    train_classifier(model, torch.from_numpy(digits.x[idx]), torch.from_numpy(digits.y[idx]), RECIPE, seed=seed)
    return model


def _out(digits, model, idx):
    return ModelOutputs(predict_logits(model, digits.x[idx]), digits.y[idx])


def _shadows(digits, pool, seed):
    rng = np.random.default_rng(seed)
    logits, labels, member = [], [], []
    for k in range(2):
        keep = np.zeros(len(pool), bool)
        keep[rng.choice(len(pool), len(pool) // 2, replace=False)] = True
        o = _out(digits, _fit(digits, pool[keep], seed + k), pool)
        logits.append(o.logits), labels.append(o.labels), member.append(keep)
    return ShadowOutputs(ModelOutputs(np.concatenate(logits), np.concatenate(labels)), np.concatenate(member))


@pytest.fixture(scope="module")
def perm(digits):
    return np.random.default_rng(0).permutation(len(digits))


def test_attacks_are_at_chance_when_the_model_saw_neither_set(digits, perm):
    target = _fit(digits, perm[:400], seed=7)
    members, nonmembers = perm[400:1000], perm[1000:1600]  # both unseen by the target
    results = run_attacks(ATTACK_NAMES, _out(digits, target, members), _out(digits, target, nonmembers),
                          _shadows(digits, perm[:800], seed=100), nn_config=NN_FAST)
    for name, r in results.items():
        assert abs(r.metrics.auc - 0.5) < 0.05, (name, r.metrics.auc)


def test_attacks_beat_chance_on_an_overfit_digits_model(digits, perm):
    members, nonmembers = perm[:150], perm[1000:1600]
    target = _fit(digits, members, seed=8)
    results = run_attacks(ATTACK_NAMES, _out(digits, target, members), _out(digits, target, nonmembers),
                          _shadows(digits, perm[300:600], seed=200), nn_config=NN_FAST)
    for name, r in results.items():
        floor = 0.52 if name == "correctness" else 0.55  # correctness AUC is bounded by the accuracy gap
        assert r.metrics.auc > floor, (name, r.metrics.auc)
        assert r.bal_acc_shadow > 0.52, (name, r.bal_acc_shadow)
