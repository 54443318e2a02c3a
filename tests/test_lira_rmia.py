"""LiRA and RMIA against their formulas."""

import numpy as np
import pytest
from scipy.stats import norm

from raymia.attacks.lira import LiRAConfig, lira_scores, scaled_logit
from raymia.attacks.rmia import reference_prob, rmia_scores, true_label_prob


def test_scaled_logit_is_log_odds_of_the_true_class_and_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (5, 2, 7)).astype(np.float32)  # [n, A, C]
    labels = rng.integers(0, 7, 5)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    py = np.take_along_axis(p, labels[:, None, None], -1)[..., 0]
    np.testing.assert_allclose(scaled_logit(logits, labels), np.log(py / (1 - py)), rtol=1e-9)
    extreme = np.zeros((1, 1, 10), np.float32)
    extreme[0, 0, 3] = 80.0  # p_y rounds to 1 in float64: the naive log(p / (1 - p)) is inf
    assert scaled_logit(extreme, np.array([3]))[0, 0] == pytest.approx(80.0 - np.log(9.0))


def test_lira_online_is_the_gaussian_log_likelihood_ratio():
    rng = np.random.default_rng(0)
    k, n = 4000, 3
    ref_in = np.arange(k)[:, None] % 2 == 0
    ref_in = np.repeat(ref_in, n, axis=1)
    ref_phi = np.where(ref_in[..., None], rng.normal(2.0, 1.0, (k, n, 1)), rng.normal(0.0, 0.5, (k, n, 1)))
    target = np.array([[2.0], [0.0], [1.0]])
    online = lira_scores(target, ref_phi, ref_in, online=True)
    expected = norm.logpdf(target[:, 0], 2.0, 1.0) - norm.logpdf(target[:, 0], 0.0, 0.5)
    np.testing.assert_allclose(online, expected, rtol=0.05, atol=0.05)  # sampling error of the fitted spreads
    offline = lira_scores(target, ref_phi, ref_in, online=False)
    np.testing.assert_allclose(offline, norm.logcdf(target[:, 0], 0.0, 0.5), atol=0.06)
    pdf = lira_scores(target, ref_phi, ref_in, online=False, config=LiRAConfig(offline_test="pdf"))
    np.testing.assert_allclose(pdf, -norm.logpdf(target[:, 0], 0.0, 0.5), rtol=0.05, atol=0.05)


def test_lira_averages_views_and_fixed_variance_pools_within_example_spread():
    rng = np.random.default_rng(1)
    k, n = 400, 50
    ref_in = rng.random((k, n)) < 0.5
    centres = rng.normal(0, 10, (1, n, 2))  # very different example means: must not inflate the global variance
    ref_phi = centres + rng.normal(0, 1, (k, n, 2)) + 3.0 * ref_in[..., None]
    target = centres[0] + 3.0
    fixed = lira_scores(target, ref_phi, ref_in, online=True, fixed_variance=True)
    per_view = [norm.logpdf(target[:, v], centres[0, :, v] + 3, 1) - norm.logpdf(target[:, v], centres[0, :, v], 1)
                for v in range(2)]
    np.testing.assert_allclose(fixed, np.mean(per_view, axis=0), atol=0.4)


def test_rmia_counts_dominated_population_samples():
    rng = np.random.default_rng(0)
    k, n, m = 6, 40, 70
    px, pz = rng.random((n, 1)), rng.random((m, 1))
    ref_px, ref_pz = rng.random((k, n, 1)), rng.random((k, m, 1))
    in_x, in_z = rng.random((k, n)) < 0.5, rng.random((k, m)) < 0.5
    for online in (True, False):
        got = rmia_scores(px, ref_px, in_x, pz, ref_pz, in_z, online=online, gamma=1.5, a=0.3)
        pr_x = reference_prob(ref_px, in_x, online=online, a=0.3)[:, 0]
        pr_z = reference_prob(ref_pz, in_z, online=online, a=0.3)[:, 0]
        brute = [np.mean([(px[i, 0] / pr_x[i]) / (pz[j, 0] / pr_z[j]) >= 1.5 for j in range(m)]) for i in range(n)]
        np.testing.assert_allclose(got, brute)


def test_rmia_reference_probability_definitions():
    ref = np.array([[[0.9]], [[0.5]], [[0.3]], [[0.1]]])  # [K=4, n=1, A=1]
    ref_in = np.array([[True], [True], [False], [False]])
    assert reference_prob(ref, ref_in, online=True, a=0.3)[0, 0] == pytest.approx(0.5 * (0.7 + 0.2))
    assert reference_prob(ref, ref_in, online=False, a=0.3)[0, 0] == pytest.approx(0.5 * (1.3 * 0.2 + 0.7))
    logits = np.log(np.array([[[0.2, 0.8]]]))
    assert true_label_prob(logits, np.array([1]))[0, 0] == pytest.approx(0.8)
