"""Every attack against real digits models: at chance when the target saw neither set, strong when it overfits."""

import numpy as np
import pytest

from raymia.attacks import ATTACK_NAMES
from raymia.attacks.nn import NNAttackConfig
from raymia.attacks.suite import AttackKnobs, leave_one_out_inputs, run_attacks, separate_target_inputs
from raymia.config import TargetConfig
from raymia.data.queries import LabelOnlyConfig
from raymia.models.classifiers import ModelSpec
from raymia.pipeline.factory import train_models
from raymia.pipeline.plan import TrainJob
from raymia.signals import PoolSignals, compute_signals
from raymia.training.loop import TrainRecipe

TARGET = TargetConfig(name="t", model=ModelSpec(params={"hidden": [256]}), train=TrainRecipe(epochs=80, batch_size=32))
FAST = AttackKnobs(nn=NNAttackConfig(epochs=8))


def build_pool(digits, target_train, members, nonmembers, population, k: int, seed: int = 0) -> PoolSignals:
    """Train a target on ``target_train`` and ``k`` reference models on random halves of the audited set."""
    audited = np.sort(np.r_[members, nonmembers])
    rng = np.random.default_rng(seed)
    jobs = [TrainJob("target", TARGET, "target", 0, np.sort(target_train), 1000 + seed, "fp")]
    jobs += [TrainJob(f"ref{j}", TARGET, "reference", j, np.sort(rng.choice(audited, len(audited) // 2, replace=False)),
                      seed * 100 + j, "fp") for j in range(k)]
    models, _, _ = train_models(jobs, digits)
    scored = np.sort(np.r_[audited, population])
    signals = compute_signals([models[j.job_id] for j in jobs], digits.x[scored], ["identity"], LabelOnlyConfig())
    roles = np.where(np.isin(scored, members), "target_members",
                     np.where(np.isin(scored, nonmembers), "target_nonmembers", "population"))
    return PoolSignals(scored, digits.y[scored], roles, np.array(["target"] + [f"ref-{j:03d}" for j in range(k)]),
                       np.stack([s.logits for s in signals]), np.stack([np.isin(scored, j.train_indices) for j in jobs]),
                       np.stack([s.label_only for s in signals]), ("identity",))


@pytest.fixture(scope="module")
def perm(digits):
    return np.random.default_rng(0).permutation(len(digits))


def test_attacks_are_at_chance_when_the_target_saw_neither_set(digits, perm):
    pool = build_pool(digits, perm[:400], perm[400:1000], perm[1000:1600], perm[1600:], k=8)
    for name, r in run_attacks(ATTACK_NAMES, separate_target_inputs(pool), FAST).items():
        assert abs(r.metrics.auc - 0.5) < 0.05, (name, r.metrics.auc)


def test_overfit_target_lira_online_beats_offline_beats_loss(digits, perm):
    members, nonmembers = perm[:600], perm[600:1200]
    pool = build_pool(digits, members, members, nonmembers, perm[1200:], k=32)
    results = run_attacks(ATTACK_NAMES, separate_target_inputs(pool), FAST)
    for name, r in results.items():
        assert r.metrics.auc > 0.5, (name, r.metrics.auc)
    tpr = {name: r.metrics.tpr_at_fpr["1pct"] for name, r in results.items()}
    assert tpr["lira_online"] >= tpr["lira_offline"] >= tpr["loss"]
    assert tpr["lira_online_fixed_var"] >= tpr["lira_offline_fixed_var"] >= tpr["loss"]
    assert results["lira_online"].metrics.auc > results["loss"].metrics.auc + 0.05


def test_leave_one_out_layout_makes_a_reference_model_the_target(digits, perm):
    pool = build_pool(digits, perm[:300], perm[:300], perm[300:600], perm[600:700], k=4)
    loo = leave_one_out_inputs(pool, 2)
    audited = pool.role_mask("target_members", "target_nonmembers")
    ref = pool.model("ref-002")
    np.testing.assert_array_equal(loo.target, pool.logits[ref, audited])
    np.testing.assert_array_equal(loo.is_member, pool.keep[ref, audited])
    assert loo.refs.shape[0] == 3 and not any(np.array_equal(r, loo.target) for r in loo.refs)
    assert 0.4 < loo.is_member.mean() < 0.6
