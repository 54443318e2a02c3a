"""Privacy auditing on real audits of digits: ε estimates, one-run bounds, the most vulnerable samples, and the
warning when a "DP" model is not private. The arithmetic itself is checked against the reference's vectors in
test_dp_bounds.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from raymia.audit import run_audit
from raymia.cache import ModelCache
from raymia.config import parse_config
from raymia.data.datasets import load_dataset
from raymia.errors import UserError
from raymia.pipeline.plan import jobs_for_target, plan_audit
from raymia.pipeline.recipe import audit_configuration
from raymia.tracking import PRIVACY_FILE, VULNERABLE_FILE, VULNERABLE_PLOT
from tests.conftest import tiny_config

SPLIT = {"target_members": 0.2, "target_nonmembers": 0.2, "population": 0.2, "calibration": 0.05, "test": 0.1}
AUDIT = {"mode": "one_run", "canaries": 300, "guesses": 30, "vulnerable": 50}


def _raw(tmp: Path, *, defense: dict, train: dict, refs: int) -> dict:
    raw = tiny_config(tmp)
    raw["targets"] = [{"name": "t", "model": {"arch": "mlp", "params": {"hidden": [256]}}, "train": train,
                       "defense": defense}]
    raw.update(reference={"count": refs}, split=SPLIT, audit=AUDIT,
               attacks={"enabled": ["loss", "lira_online", "rmia_online"]})
    return raw


OVERFIT = {"epochs": 30, "batch_size": 32}


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A non-private overfit MLP audited locally (MLflow store, report) with 300 mislabelled canaries."""
    tmp = tmp_path_factory.mktemp("overfit")
    cfg = parse_config(_raw(tmp, defense={"name": "none"}, train=OVERFIT, refs=16))
    return cfg, run_audit(cfg, local=True)


def _privacy(tmp: Path, defense: dict, train: dict):
    cfg = parse_config(_raw(tmp, defense=defense, train=train, refs=8))
    plan = plan_audit(cfg, load_dataset("digits"))
    return audit_configuration(plan, cfg.targets[0], ModelCache(tmp / "cache")).reports[0]


def test_canaries_are_trained_on_by_their_coins_and_mislabelled_for_every_model(tmp_path):
    cfg = parse_config(_raw(tmp_path, defense={"name": "none"}, train=OVERFIT, refs=4))
    digits = load_dataset("digits")
    plan = plan_audit(cfg, digits)
    canaries = plan.split["canaries"]
    assert len(canaries) == 300 and 100 < len(plan.canary_in) < 200  # fair coins
    jobs = jobs_for_target(plan, cfg.targets[0])
    target_rows = set(jobs[0].train_indices)
    assert set(plan.canary_in) <= target_rows and not (set(canaries) - set(plan.canary_in)) & target_rows
    assert (plan.dataset.y[canaries] != digits.y[canaries]).all()  # every canary relabelled to another class
    others = np.setdiff1d(np.arange(len(digits)), canaries)
    assert (plan.dataset.y[others] == digits.y[others]).all()
    assert plan.dataset.fingerprint() != digits.fingerprint() and jobs[0].data_fingerprint == plan.dataset.fingerprint()
    assert plan.size_mismatch() is None
    # reference models' canaries do not follow the target's coins: about half of the IN canaries are OUT for each
    pos = np.searchsorted(plan.pool, plan.canary_in)
    assert all(0.3 < plan.keep[k, pos].mean() < 0.7 for k in range(4))


def test_a_non_private_overfit_target_leaks_a_clearly_positive_epsilon(overfit):
    cfg, outcome = overfit
    p = outcome.reports[0].privacy
    assert p.claimed_eps is None and p.warnings() == []
    o = p.one_run
    assert (o.m, o.r) == (300, 60) and o.v >= 50 and o.eps > 1.0  # certified, from one training run
    assert p.strongest_estimate()[1].eps > 0.5
    v = p.vulnerable
    assert v.models_ranked == v.models_measured == 8 and len(v.top) == 50
    # the most vulnerable subset (ranked on other models) and the mislabelled canaries leak more than average
    assert v.metrics("top").auc > v.metrics("all").auc + 0.03
    canary, average = v.metrics("canary").at_fpr["1pct"], v.metrics("all").at_fpr["1pct"]
    assert canary.ci[0] > average.ci[1]


def test_findings_reach_mlflow_the_report_and_the_terminal(overfit):
    cfg, outcome = overfit
    client = MlflowClient(outcome.tracking_uri)
    exp = client.get_run(outcome.run_id).info.experiment_id
    child = client.search_runs([exp], f"tags.mlflow.parentRunId = '{outcome.run_id}'")[0]
    m = child.data.metrics
    p = outcome.reports[0].privacy
    assert m["dp.eps_lower_bound"] == pytest.approx(p.one_run.eps)
    assert m["dp.one_run.correct"] == p.one_run.v and m["dp.claim_violated"] == 0
    assert m["dp.lira_online.eps_estimate.tp"] + m["dp.lira_online.eps_estimate.fn"] == 359
    assert m["vuln.top.tpr_at_1pct_fpr.ci_low"] <= m["vuln.top.tpr_at_1pct_fpr"] <= m["vuln.top.tpr_at_1pct_fpr.ci_high"]
    d = Path(client.download_artifacts(child.info.run_id, "privacy"))
    findings = json.loads((d / Path(PRIVACY_FILE).name).read_text())
    assert findings["one_run"]["canaries"] == 300 and findings["one_run"]["kind"].startswith("certified")
    table = pd.read_parquet(d / Path(VULNERABLE_FILE).name)
    assert len(table) == 718 and table["most_vulnerable"].sum() == 50 and set(table["rank"]) == set(range(718))
    assert VULNERABLE_PLOT in {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
    html = outcome.report_path.read_text()
    assert "most vulnerable samples of t" in html and "one-run ε lower bound" in html
    text = outcome.summary()
    assert "one-run ε lower bound" in text and f"{p.one_run.eps:.2f} (m=300, {p.one_run.v}/60" in text


def test_dp_sgd_at_epsilon_one_stays_below_its_claim(tmp_path):
    r = _privacy(tmp_path, {"name": "dp_sgd", "target_epsilon": 1.0},
                 {"epochs": 15, "batch_size": 128, "lr": 0.01})
    p = r.privacy
    assert p.claimed_eps == pytest.approx(1.0, abs=0.02)
    assert p.one_run.eps <= p.claimed_eps and p.strongest_estimate()[1].eps <= p.claimed_eps
    assert p.warnings() == []


def test_a_broken_dp_training_is_flagged(tmp_path):
    # the accountant is told sigma = 20 (epsilon about 0.25); the noise actually added is 20 x 0.0005 = 0.01 sigma
    r = _privacy(tmp_path, {"name": "dp_sgd", "noise_multiplier": 20.0, "noise_scale": 0.0005, "max_grad_norm": 5.0},
                 OVERFIT)
    p = r.privacy
    assert p.claimed_eps < 0.5
    assert any("exceeds the accountant" in w for w in p.warnings())
    assert max(p.one_run.eps, p.strongest_estimate()[1].eps) > p.claimed_eps


@pytest.mark.parametrize("patch, needle", [
    ({"audit": {"mode": "one_run"}}, "needs canaries"),
    ({"audit": {"mode": "one_run", "canaries": 10, "guesses": 6}}, "exceed the 10 canaries"),
    ({"frontier": {"leakage": "eps_lower_bound"}}, "needs audit.mode: one_run"),
    ({"audit": {"mode": "one_run", "canaries": 5000}}, "do not fit"),
])
def test_bad_privacy_audit_settings_say_what_to_change(tmp_path, patch, needle):
    raw = {**tiny_config(tmp_path), **patch}
    with pytest.raises(UserError, match=needle):
        cfg = parse_config(raw)
        plan_audit(cfg, load_dataset("digits"))


def test_a_search_over_k_pays_for_itself(overfit):
    from raymia.dp_bounds import eps_one_run
    from raymia.pipeline.dp_audit import one_run_bound

    cfg, outcome = overfit
    r = outcome.reports[0]
    o = r.privacy.one_run
    ks = [10, 20, 30, 50]
    searched = one_run_bound(r.pool, o.coins, o.rows, cfg.attacks.knobs(), attack="lira_online", ks=ks,
                             delta=o.delta, beta=0.05, seed=cfg.seed)
    assert searched.searched == 4 and searched.beta == pytest.approx(0.0125)
    per_k = {}
    for k in ks:
        order = np.argsort(o.scores, kind="stable")
        right = int((o.coins[order[-k:]] > 0).sum() + (o.coins[order[:k]] < 0).sum())
        per_k[k] = (eps_one_run(300, 2 * k, right, delta=o.delta, beta=0.05 / 4),
                    eps_one_run(300, 2 * k, right, delta=o.delta, beta=0.05))
    assert searched.eps == pytest.approx(max(c for c, _ in per_k.values()), abs=1e-6)
    assert max(u for _, u in per_k.values()) > searched.eps  # the uncorrected maximum overstates the bound


def test_the_most_vulnerable_set_is_compared_across_seeds(tmp_path):
    raw = tiny_config(tmp_path)
    raw["targets"] = raw["targets"][:1]
    raw.update(reference={"count": 8}, seeds=[0, 1], audit={"vulnerable": 40}, attacks={"enabled": ["loss"]})
    outcome = run_audit(parse_config(raw), local=True)
    client = MlflowClient(outcome.tracking_uri)
    exp = client.get_run(outcome.run_id).info.experiment_id
    child = client.search_runs([exp], f"tags.mlflow.parentRunId = '{outcome.run_id}' and tags.`raymia.kind` = 'target'")[0]
    m = child.data.metrics
    assert 0 <= m["vuln.overlap_at_k"] <= 1 and m["seeds.n"] == 2
    assert "vuln.top.tpr_at_1pct_fpr.seeds_sd" in m and "dp.eps_estimate.seeds_mean" in m
