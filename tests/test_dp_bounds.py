"""ε lower bounds against the worked values of the DP-auditing reference (dp-auditing.md §A.8, §B.6)."""

import numpy as np
import pytest

from raymia.dp_bounds import (eps_estimate, eps_from_counts, eps_one_run, one_run_guesses, one_run_p_value)


@pytest.mark.parametrize(("fp", "n_out", "fn", "n_in", "delta", "expected"), [
    (0, 449, 0, 449, 0.0, 4.7976), (0, 449, 0, 449, 1e-5, 4.7976), (0, 449, 404, 449, 1e-5, 2.2026),
    (1, 1000, 900, 1000, 0.0, 2.6926), (900, 1000, 1, 1000, 0.0, 2.6926), (5, 1000, 500, 1000, 0.0, 3.6961),
    (1, 10000, 9000, 10000, 1e-5, 5.1303),
])
def test_two_rate_bound_reproduces_the_reference_vectors(fp, n_out, fn, n_in, delta, expected):
    assert eps_from_counts(fp, n_out, fn, n_in, delta=delta) == pytest.approx(expected, abs=1e-4)


def test_a_threshold_chosen_on_the_audited_scores_pays_for_the_choice():
    s_in, s_out = np.arange(449.0) + 1000, np.arange(449.0)  # perfect separation
    chosen = eps_estimate(s_in, s_out, delta=0.0)
    assert chosen.eps == pytest.approx(3.75, abs=0.01)  # 4.80 -> 3.75 with Bonferroni over 2n + 1 cuts
    fixed = eps_estimate(s_in, s_out, delta=0.0, threshold=1000.0)
    assert fixed.eps == pytest.approx(4.7976, abs=1e-4) and (fixed.tp, fixed.fp) == (449, 0)
    rng = np.random.default_rng(0)
    null = eps_estimate(rng.normal(size=500), rng.normal(size=500), delta=1e-5)
    assert null.eps < 0.5  # identically distributed scores give (almost) no evidence


@pytest.mark.parametrize(("m", "r", "v", "delta", "beta", "expected"), [
    (1000, 100, 95, 0.0, 0.05, 2.1724), (1000, 100, 95, 1e-6, 0.05, 2.1717), (1000, 100, 95, 1e-5, 0.05, 2.1652),
    (1000, 100, 95, 1e-4, 0.05, 2.0940), (1000, 100, 95, 1e-5, 0.01, 1.9172), (1000, 100, 100, 0.0, 0.05, 3.4930),
    (1000, 100, 90, 0.0, 0.05, 1.6308), (1000, 100, 80, 0.0, 0.05, 0.9584), (1000, 100, 70, 0.0, 0.05, 0.4717),
    (1000, 100, 60, 0.0, 0.05, 0.0519), (1000, 100, 50, 0.0, 0.05, 0.0), (1000, 100, 75, 1e-4, 0.05, 0.6730),
    (100000, 1510, 1439, 1e-5, 0.05, 2.6759), (10000, 1000, 950, 1e-5, 0.05, 2.6910), (898, 90, 85, 1e-5, 0.05, 2.0512),
])
def test_one_run_bound_reproduces_the_reference_vectors(m, r, v, delta, beta, expected):
    assert eps_one_run(m, r, v, delta=delta, beta=beta) == pytest.approx(expected, abs=2e-4)


def test_a_search_over_k_must_be_corrected_and_the_delta_floor_bites():
    assert eps_one_run(1000, 100, 95, delta=1e-5, beta=0.05 / 33) == pytest.approx(1.609, abs=1e-3)
    assert eps_one_run(1000, 100, 95, delta=1e-5, beta=0.05 / 528) == 0.0
    assert one_run_p_value(1000, 100, 95, 0.0, 1e-5) == pytest.approx(3.6e-4, rel=0.05)
    assert eps_one_run(1000, 100, 95, delta=2e-3) == 0.0


def test_guesses_take_the_top_and_bottom_and_abstain_elsewhere():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    g = one_run_guesses(scores, 2, 1, np.random.default_rng(0))
    assert g.tolist() == [-1, 1, 0, 0, 1, 0]
