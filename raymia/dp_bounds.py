"""Empirical lower bounds on a mechanism's ε from membership guesses (reference: dp-auditing.md §A, §B).

Two tools, both pure functions of scores or counts:

- :func:`eps_from_counts` / :func:`eps_estimate` — under (ε, δ)-DP every test telling D from a neighbour obeys
  FPR + e^ε·FNR ≥ 1 − δ and FNR + e^ε·FPR ≥ 1 − δ (Kairouz et al. 2015), so observed error rates give
  ε ≥ max(ln((1 − δ − FNR)/FPR), ln((1 − δ − FPR)/FNR)). Both rates are replaced by one-sided Clopper–Pearson
  upper bounds at α/2 each, so the bound holds with probability 1 − α *if every scored sample were an
  independent trial*. Samples of one trained model are not (A.7): on a single target this is an **estimate**.
  A threshold chosen on the audited scores must pay for the choice (Bonferroni over every possible cut); one
  chosen elsewhere (on reference models) is used at the full α.
- :func:`eps_one_run` — Steinke, Nasr & Jagielski (NeurIPS 2023): m canaries each included with an independent
  fair coin, r guesses of which v are right; if the mechanism is (ε, δ)-DP then
  P[#correct ≥ v] ≤ P[W ≥ v] + 2mδ · max_{i=1..v} P[v > W ≥ v − i] / i, W ~ Binomial(r, e^ε / (1 + e^ε)).
  The largest ε that this rejects at level β is a **certified** lower bound from one training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import binom


def cp_upper(k: int, n: int, a: float) -> float:
    """One-sided Clopper–Pearson upper bound at confidence 1 − a for k events in n trials (1 when k = n)."""
    return 1.0 if k >= n else float(beta_dist.ppf(1 - a, k + 1, n - k))


def eps_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """max(0, ln((1 − δ − FNR)/FPR), ln((1 − δ − FPR)/FNR)), each term only where its numerator is positive."""
    best = 0.0
    for num, den in ((1 - delta - fnr, fpr), (1 - delta - fpr, fnr)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
    return best


def eps_from_counts(fp: int, n_out: int, fn: int, n_in: int, *, delta: float, alpha: float = 0.05) -> float:
    """The ε lower bound of one threshold's counts, both error rates bounded above at α/2 each."""
    return eps_from_rates(cp_upper(fp, n_out, alpha / 2), cp_upper(fn, n_in, alpha / 2), delta)


@dataclass(frozen=True)
class EpsEstimate:
    """An ε lower bound from one attack's scores: the value, the threshold (member iff score ≥ threshold), the
    counts there, and how the threshold was chosen (``strategy``; ``alpha_used`` after any correction)."""

    eps: float
    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int
    alpha: float
    alpha_used: float
    delta: float
    strategy: str


def _counts(s_in: np.ndarray, s_out: np.ndarray, t: float) -> tuple[int, int, int, int]:
    tp, fp = int((s_in >= t).sum()), int((s_out >= t).sum())
    return tp, fp, len(s_in) - tp, len(s_out) - fp


def eps_estimate(s_in: np.ndarray, s_out: np.ndarray, *, delta: float, alpha: float = 0.05,
                 threshold: float | None = None) -> EpsEstimate:
    """The ε lower bound of scores ``s_in`` (members) vs ``s_out`` (non-members).

    With ``threshold`` (chosen without the audited scores, e.g. on reference models) the bound is computed there
    at level α. Without, every cut of the audited scores is tried and the confidence split over all of them
    (Bonferroni: α / (n_in + n_out + 1)), so the maximum is still a 1 − α statement.
    """
    s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    if threshold is not None:
        tp, fp, fn, tn = _counts(s_in, s_out, threshold)
        return EpsEstimate(eps_from_counts(fp, len(s_out), fn, len(s_in), delta=delta, alpha=alpha), float(threshold),
                           tp, fp, fn, tn, alpha, alpha, delta, "threshold fixed in advance")
    a = alpha / (len(s_in) + len(s_out) + 1)
    best = None
    for t in np.r_[np.unique(np.r_[s_in, s_out]), np.inf]:
        tp, fp, fn, tn = _counts(s_in, s_out, t)
        e = eps_from_counts(fp, len(s_out), fn, len(s_in), delta=delta, alpha=a)
        if best is None or e > best.eps:
            best = EpsEstimate(e, float(t), tp, fp, fn, tn, alpha, a, delta,
                               "best threshold on the audited scores, Bonferroni-corrected over every cut")
    return best


def best_threshold_for_eps(s_in: np.ndarray, s_out: np.ndarray, *, delta: float, alpha: float = 0.05) -> float:
    """The threshold maximising the (uncorrected) ε lower bound on scores other than the audited ones — e.g. a
    reference model's, to be applied once to the target."""
    s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    best_t, best_e = np.inf, -1.0
    for t in np.unique(np.r_[s_in, s_out]):
        tp, fp, fn, tn = _counts(s_in, s_out, t)
        e = eps_from_counts(fp, len(s_out), fn, len(s_in), delta=delta, alpha=alpha)
        if e > best_e:
            best_t, best_e = float(t), e
    return best_t


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al.'s bound on P[#correct ≥ v] for r guesses about m canaries under (ε, δ)-DP (capped at 1)."""
    q = math.exp(eps) / (1 + math.exp(eps)) if eps < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        window = binom.sf(v - i - 1, r, q) - binom.sf(v - 1, r, q)  # P[v > W >= v - i]
        tail += 2 * m * delta * float(np.max(window / i))
    return min(1.0, tail)


def eps_one_run(m: int, r: int, v: int, *, delta: float = 0.0, beta: float = 0.05, tol: float = 1e-7) -> float:
    """The largest ε the one-run test rejects at level ``beta``: sup{ε ≥ 0 : p(ε, δ) < β}; 0 if even ε = 0 is not
    rejected (p does not decrease in ε, so bracket and bisect, returning the low end)."""
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            return float("inf")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if one_run_p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo


def one_run_guesses(scores: np.ndarray, k_plus: int, k_minus: int, rng: np.random.Generator) -> np.ndarray:
    """Guesses ``[m]`` in {+1, 0, −1}: +1 for the k₊ highest scores, −1 for the k₋ lowest, 0 (abstain) elsewhere;
    ties at a cut are broken by ``rng`` (which must not depend on the coins)."""
    m = len(scores)
    if k_plus + k_minus > m:
        raise ValueError(f"{k_plus} + {k_minus} guesses for {m} canaries")
    order = np.lexsort((rng.random(m), scores))  # ascending score, random among ties
    guess = np.zeros(m, dtype=np.int8)
    if k_minus:
        guess[order[:k_minus]] = -1
    if k_plus:
        guess[order[m - k_plus:]] = 1
    return guess
