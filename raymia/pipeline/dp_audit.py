"""Does the guarantee hold, and who is at risk? Empirical ε bounds and the most vulnerable samples, from the same
pool of outputs the attacks use (no Ray, no MLflow; reference: dp-auditing.md).

- :func:`eps_estimates` — for every attack, the two-rate ε bound at a threshold chosen on a reference model
  (leave-one-out pseudo-target: reference 0 attacked by the others; a valid choice because the reference models'
  training sets do not depend on the target's memberships), applied once to the target at α / #attacks (a
  union bound over the attacks, so the maximum is still a 1 − α statement). An *estimate*: the samples of one
  model are not independent trials.
- :func:`one_run_bound` — Steinke et al.'s certified bound from the canaries the target trained on by fair coins:
  the configured attack scores every canary (with reference models whose training never depended on the coins),
  the k highest are guessed IN and the k lowest OUT, and the correct guesses give ε ≥ ``dp.eps_lower_bound``.
- :func:`vulnerability` — per-sample vulnerability from the reference pool (leave-one-out LiRA), ranked on one
  half of the reference models and measured on the other half (ranking and measuring on the same models
  inflates the top-k TPR), against all samples measured the same way (Aerni et al., CCS 2024).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raymia.attacks.lira import LiRAConfig, lira_scores, scaled_logit
from raymia.attacks.suite import AttackKnobs, AttackResult, attack_inputs, leave_one_out_inputs, run_attacks
from raymia.config import AuditConfig, TargetConfig
from raymia.dp_bounds import (EpsEstimate, best_threshold_for_eps, eps_estimate, eps_one_run, one_run_guesses)
from raymia.metrics import AttackMetrics
from raymia.signals import PoolSignals


def eps_estimates(pool: PoolSignals, attacks: dict[str, AttackResult], names: list[str], knobs: AttackKnobs, *,
                  delta: float, alpha: float) -> dict[str, EpsEstimate]:
    """Each attack's ε estimate on the target, its threshold chosen on reference model 0 as a pseudo-target."""
    if len(pool.reference_rows) < 3:
        return {}
    pseudo = run_attacks(names, leave_one_out_inputs(pool, 0, knobs.rmia), knobs)
    a = alpha / max(len(names), 1)
    out = {}
    for name in names:
        p, t = pseudo[name], attacks[name]
        thr = best_threshold_for_eps(p.member_scores, p.nonmember_scores, delta=delta, alpha=a)
        out[name] = eps_estimate(t.member_scores, t.nonmember_scores, delta=delta, alpha=a, threshold=thr)
    return out


@dataclass(frozen=True)
class OneRunBound:
    """The one-run audit: m canaries, r = 2k guesses of which v were right, at (δ, β) with the fixed attack; the
    certified ε lower bound (``searched``: how many k were tried, β already divided by it); per canary its coin
    (+1 trained on), score and guess."""

    eps: float
    m: int
    r: int
    v: int
    delta: float
    beta: float
    attack: str
    rows: np.ndarray
    coins: np.ndarray
    scores: np.ndarray
    guesses: np.ndarray
    searched: int = 1


def one_run_bound(pool: PoolSignals, coins: np.ndarray, rows: np.ndarray, knobs: AttackKnobs, *, attack: str,
                  ks: list[int], delta: float, beta: float, seed: int) -> OneRunBound:
    """Score the canaries ``rows`` (dataset rows, with their ``coins`` in {+1, −1}) with ``attack`` and turn the
    top/bottom-k guesses into Steinke et al.'s bound, for each k in ``ks`` at β / len(ks) (Bonferroni: the best k
    is still a 1 − β statement); the best. The coins are only used to count correct guesses."""
    pos = np.searchsorted(pool.indices, rows)
    member = coins > 0
    inputs = attack_inputs(pool, pool.model("target"), pool.reference_rows, pos, member, knobs.rmia)
    result = run_attacks([attack], inputs, knobs)[attack]
    scores = np.empty(len(rows))
    scores[member], scores[~member] = result.member_scores, result.nonmember_scores
    b = beta / len(ks)
    best = None
    for k in ks:
        g = one_run_guesses(scores, k, k, np.random.default_rng([seed, 0x6E55]))
        v, r = int(((g * coins) > 0).sum()), int((g != 0).sum())
        found = OneRunBound(eps_one_run(len(rows), r, v, delta=delta, beta=b), len(rows), r, v, delta, b, attack,
                            rows, coins, scores, g, len(ks))
        if best is None or found.eps > best.eps:
            best = found
    return best


@dataclass(frozen=True)
class Vulnerability:
    """Per-sample vulnerability (``score [n]`` over the audited dataset ``rows``; higher = more at risk), the
    ``top`` positions ranked on one half of the reference models, and leave-one-out LiRA scores pooled over the
    other half: ``pooled`` holds ``top_in`` / ``top_out`` (the top-k samples), ``all_in`` / ``all_out`` (all
    audited samples — the average case) and, with canaries, ``canary_in`` / ``canary_out``."""

    rows: np.ndarray
    score: np.ndarray
    top: np.ndarray
    models_ranked: int
    models_measured: int
    pooled: dict[str, np.ndarray] = field(default_factory=dict)

    def metrics(self, subset: str) -> AttackMetrics | None:
        """The attack's metrics on ``subset`` (``top``, ``all`` or ``canary``), ``None`` where it has no scores."""
        s_in, s_out = self.pooled.get(f"{subset}_in"), self.pooled.get(f"{subset}_out")
        if s_in is None or not len(s_in) or not len(s_out):
            return None
        return AttackMetrics.from_scores(s_in, s_out)


def _loo_lira(phi: np.ndarray, keep: np.ndarray, group: np.ndarray, cfg: LiRAConfig) -> np.ndarray:
    """LiRA-online scores ``[len(group), n]`` of each model in ``group`` against the others in ``group``."""
    out = []
    for k in group:
        others = group[group != k]
        out.append(lira_scores(phi[k], phi[others], keep[others], online=True, fixed_variance=True, config=cfg))
    return np.stack(out)


def vulnerability(pool: PoolSignals, *, top_k: int, lira: LiRAConfig) -> Vulnerability | None:
    """See the module docstring; ``None`` with fewer than 8 reference models (4 per half)."""
    refs = pool.reference_rows
    if len(refs) < 8:
        return None
    rows = np.flatnonzero(pool.role_mask("target_members", "target_nonmembers"))
    canaries = np.flatnonzero(pool.role_mask("canaries"))
    cols = np.concatenate([rows, canaries])
    phi = scaled_logit(pool.logits[np.ix_(refs, cols)], pool.labels[cols])  # [K, n + m, A]
    keep = pool.keep[np.ix_(refs, cols)]
    half = len(refs) // 2
    rank_on, measure_on = np.arange(half), np.arange(half, len(refs))
    s_rank, k_rank = _loo_lira(phi, keep, rank_on, lira)[:, :len(rows)], keep[rank_on, :len(rows)]
    with np.errstate(invalid="ignore"):
        mean_in = np.where(k_rank, s_rank, 0).sum(0) / k_rank.sum(0)
        mean_out = np.where(~k_rank, s_rank, 0).sum(0) / (~k_rank).sum(0)
    score = np.nan_to_num(mean_in - mean_out, nan=-np.inf)
    top = np.argsort(-score, kind="stable")[:min(top_k, len(rows))]
    s_all, k_all = _loo_lira(phi, keep, measure_on, lira), keep[measure_on]
    s_measure, k_measure = s_all[:, :len(rows)], k_all[:, :len(rows)]
    s_top, k_top = s_measure[:, top], k_measure[:, top]
    s_can, k_can = s_all[:, len(rows):], k_all[:, len(rows):]
    pooled = {"top_in": s_top[k_top], "top_out": s_top[~k_top], "all_in": s_measure[k_measure],
              "all_out": s_measure[~k_measure], "canary_in": s_can[k_can], "canary_out": s_can[~k_can]}
    return Vulnerability(pool.indices[rows], score, top, half, len(refs) - half, pooled)


def overlap_at_k(tops: list[np.ndarray]) -> float:
    """Mean pairwise |A ∩ B| / k of top-k sets (dataset rows) found under different seeds."""
    pairs = [(a, b) for i, a in enumerate(tops) for b in tops[i + 1:]]
    if not pairs:
        return float("nan")
    return float(np.mean([len(np.intersect1d(a, b)) / max(len(a), 1) for a, b in pairs]))


@dataclass(frozen=True)
class PrivacyFindings:
    """What ``audit:`` found for one target: the δ of every bound, each attack's ε estimate, the accountant's
    claim (DP-SGD targets), the one-run bound and the most vulnerable samples (each ``None`` if not computed)."""

    delta: float
    estimates: dict[str, EpsEstimate]
    claimed_eps: float | None = None
    one_run: OneRunBound | None = None
    vulnerable: Vulnerability | None = None

    def strongest_estimate(self) -> tuple[str, EpsEstimate] | None:
        if not self.estimates:
            return None
        return max(self.estimates.items(), key=lambda kv: kv[1].eps)

    def warnings(self) -> list[str]:
        """Loud sentences where a measured bound exceeds the accountant's ε."""
        out = []
        if self.claimed_eps is None:
            return out
        best = self.strongest_estimate()
        if best is not None and best[1].eps > self.claimed_eps:
            out.append(f"the ε estimate {best[1].eps:.2f} ({best[0]}, threshold from a reference model, "
                       f"{best[1].tp}/{best[1].tp + best[1].fn} TP, {best[1].fp}/{best[1].fp + best[1].tn} FP) exceeds "
                       f"the accountant's ε = {self.claimed_eps:.2f} at δ = {self.delta:g}: the DP guarantee does not "
                       "hold as claimed, or the samples are far from independent")
        if self.one_run is not None and self.one_run.eps > self.claimed_eps:
            out.append(f"the certified one-run ε lower bound {self.one_run.eps:.2f} exceeds the accountant's "
                       f"ε = {self.claimed_eps:.2f} (β = {self.one_run.beta}): the training is not ε-DP as claimed")
        return out

    def save(self, folder: Path) -> None:
        """Write the findings as JSON + npz that :meth:`load` reads back."""
        folder.mkdir(parents=True, exist_ok=True)
        meta: dict = {"delta": self.delta, "claimed_eps": self.claimed_eps,
                      "estimates": {n: e.__dict__ for n, e in self.estimates.items()}}
        arrays = {}
        if (o := self.one_run) is not None:
            meta["one_run"] = {k: getattr(o, k) for k in ("eps", "m", "r", "v", "delta", "beta", "attack", "searched")}
            arrays.update({"or_rows": o.rows, "or_coins": o.coins, "or_scores": o.scores, "or_guesses": o.guesses})
        if (v := self.vulnerable) is not None:
            meta["vulnerable"] = {"models_ranked": v.models_ranked, "models_measured": v.models_measured}
            arrays.update({"v_rows": v.rows, "v_score": v.score, "v_top": v.top, **v.pooled})
        (folder / "findings.json").write_text(json.dumps(meta))
        np.savez(folder / "arrays.npz", **arrays)

    @classmethod
    def load(cls, folder: Path) -> "PrivacyFindings":
        meta = json.loads((folder / "findings.json").read_text())
        with np.load(folder / "arrays.npz") as z:
            a = {k: z[k] for k in z.files}
        one_run = vulnerable = None
        if "one_run" in meta:
            one_run = OneRunBound(**meta["one_run"], rows=a["or_rows"], coins=a["or_coins"], scores=a["or_scores"],
                                  guesses=a["or_guesses"])
        if "vulnerable" in meta:
            pooled = {k: a[k] for k in a if k.endswith(("_in", "_out"))}
            vulnerable = Vulnerability(a["v_rows"], a["v_score"], a["v_top"], **meta["vulnerable"], pooled=pooled)
        return cls(meta["delta"], {n: EpsEstimate(**e) for n, e in meta["estimates"].items()}, meta["claimed_eps"],
                   one_run, vulnerable)


def privacy_findings(cfg: AuditConfig, target: TargetConfig, pool: PoolSignals,
                     attacks: dict[str, AttackResult]) -> PrivacyFindings | None:
    """Everything ``cfg.audit`` asks for about the target in ``pool`` (the canaries' coins are read off the
    target's keep-mask row: it trained on a canary iff its coin came up heads)."""
    a = cfg.audit
    dp_delta = getattr(target.defense, "delta", None) if target.defense.name == "dp_sgd" else None
    delta = a.delta or dp_delta or 1e-5
    knobs = cfg.attacks.knobs()
    estimates = eps_estimates(pool, attacks, list(attacks), knobs, delta=delta, alpha=a.alpha) if a.eps else {}
    one_run = None
    canary = np.flatnonzero(pool.role_mask("canaries"))
    if a.mode == "one_run" and len(canary):
        coins = np.where(pool.keep[pool.model("target"), canary], 1, -1)
        one_run = one_run_bound(pool, coins, pool.indices[canary], knobs, attack=a.attack, ks=a.ks(),
                                delta=delta, beta=a.beta, seed=cfg.seed)
    vulnerable = vulnerability(pool, top_k=a.vulnerable, lira=knobs.lira) if a.vulnerable else None
    claimed = pool.target_extra.get("dp_epsilon")
    if not estimates and one_run is None and vulnerable is None:
        return None
    return PrivacyFindings(delta, estimates, None if claimed is None else float(claimed), one_run, vulnerable)
