"""Likelihood Ratio Attack (Carlini et al., S&P 2022, "Membership Inference Attacks From First Principles").

Statistic: the scaled logit phi = log p_y - log sum_{j != y} p_j = z_y - logsumexp_{j != y} z_j (exact and
stable in float64). For each audited example and query view, fit Gaussians to phi under the reference models
that trained on it (IN) and those that did not (OUT), then

- online:  mean over views of  log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out);
- offline: mean over views of  log Phi((phi - mu_out) / s_out), the paper's one-sided test (how far phi sits
  above the OUT distribution); ``offline_test: pdf`` gives the official code's -log N(phi; mu_out, s_out).

Variance: per example, or one global variance per side ("fixed variance", better with few reference models).
The global variance is the pooled within-example variance (the official code's ``np.std`` over all IN scores
also counts the spread of the means, and reuses the IN spread for OUT; both deviations are avoided here).
Examples with fewer than two IN (OUT) scores use the global variance; an example without any OUT model uses the
mean of all examples' OUT centres, and one without any IN model gets its offline score in the online attack
(neither happens with the default complementary-pair keep-mask, where every example is IN for exactly half).
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy.special import logsumexp
from scipy.stats import norm

_MIN_STD = 1e-4


class LiRAConfig(BaseModel):
    """Knobs that implementations disagree on; each run records them as MLflow params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: Literal["mean", "median"] = "mean"
    offline_test: Literal["cdf", "pdf"] = "cdf"


def log_odds(logits: np.ndarray, k: np.ndarray) -> np.ndarray:
    """log p_k - log sum_{j != k} p_j = z_k - logsumexp_{j != k} z_j, in float64; ``logits [..., C]``, class
    ``k`` broadcastable to ``[...]``. Exact and overflow-free (no softmax is formed)."""
    z = logits.astype(np.float64)
    idx = np.broadcast_to(np.asarray(k)[..., None], z.shape[:-1] + (1,))
    z_k = np.take_along_axis(z, idx, axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, idx, -np.inf, axis=-1)
    return z_k - logsumexp(others, axis=-1)


def scaled_logit(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's phi ``[..., n, A]`` from logits ``[..., n, A, C]`` and true labels ``[n]``."""
    return log_odds(logits, labels[:, None])


def _fit(phi: np.ndarray, mask: np.ndarray, center: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-example centre and spread of ``phi [K, n, A]`` over models where ``mask [K, n]`` holds.

    Returns ``(mu [n, A], std [n, A], count [n], pooled_std)``.
    """
    masked = np.where(mask[..., None], phi, np.nan)
    count = mask.sum(axis=0)
    with warnings.catch_warnings():  # all-NaN slices (no IN or no OUT model) are handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        mu = np.nanmedian(masked, axis=0) if center == "median" else np.nanmean(masked, axis=0)
        var = np.nanvar(masked, axis=0)
    usable = count >= 2
    pooled = float(np.sqrt(np.mean(var[usable]))) if usable.any() else 1.0
    std = np.where(usable[:, None], np.sqrt(var), pooled)
    if (count == 0).any() and (count > 0).any():
        mu = np.where((count > 0)[:, None], mu, np.nanmean(mu[count > 0], axis=0))
    return mu, np.maximum(std, _MIN_STD), count, max(pooled, _MIN_STD)


def lira_scores(target_phi: np.ndarray, ref_phi: np.ndarray, ref_in: np.ndarray, *, online: bool,
                fixed_variance: bool = False, config: LiRAConfig | None = None) -> np.ndarray:
    """Membership scores ``[n]`` (higher = member).

    Args:
        target_phi: the target's scaled logits ``[n, A]`` on the audited examples.
        ref_phi: reference models' scaled logits ``[K, n, A]`` on the same examples.
        ref_in: ``[K, n]``, True where reference model k trained on example i.
    """
    cfg = config or LiRAConfig()
    mu_out, s_out, n_out, pooled_out = _fit(ref_phi, ~ref_in, cfg.center)
    if fixed_variance:
        s_out = np.full_like(s_out, pooled_out)
    if cfg.offline_test == "cdf":
        offline = norm.logcdf(target_phi, mu_out, s_out).mean(axis=1)
    else:
        offline = -norm.logpdf(target_phi, mu_out, s_out).mean(axis=1)
    if n_out.max() == 0:
        raise ValueError("no reference model is OUT for any audited example; lower reference.pkeep")
    if not online:
        return offline
    mu_in, s_in, n_in, pooled_in = _fit(ref_phi, ref_in, cfg.center)
    if fixed_variance:
        s_in = np.full_like(s_in, pooled_in)
    has_in = n_in > 0
    mu_in = np.where(has_in[:, None], mu_in, mu_out)
    ratio = (norm.logpdf(target_phi, mu_in, s_in) - norm.logpdf(target_phi, mu_out, s_out)).mean(axis=1)
    return np.where(has_in, ratio, offline)
