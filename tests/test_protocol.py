"""The protocol around the attacks (honest-numbers issue): training-set sizes, who may use which rows, RMIA's
population and its tuned ``a`` — each test fails on the defect it names."""

import numpy as np
import pytest

from raymia.attacks.rmia import RMIAConfig, reference_prob
from raymia.attacks.suite import AttackKnobs, leave_one_out_inputs, run_attacks, separate_target_inputs, tune_rmia_a
from raymia.cache import ModelCache
from raymia.config import parse_config
from raymia.defenses import DefenseContext
from raymia.pipeline.evaluate import assemble_pool
from raymia.pipeline.factory import load_signals, produce_signals
from raymia.pipeline.plan import jobs_for_target, plan_audit
from raymia.signals import PoolSignals
from tests.synthetic import synthetic_inputs

LAYOUTS = [
    {},                                                                      # LiRA's layout, no known members
    {"split": {"calibration_members": 0.08, "population": 0.27}},            # DIFFENCE's known members
    {"reference": {"pool": "audited_and_population"}},
    {"reference": {"pool": "audited_and_population"}, "split": {"calibration_members": 0.05, "population": 0.3}},
    {"split": {"target_members": 0.2, "target_nonmembers": 0.3}},          # unequal members / non-members
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=range(len(LAYOUTS)))
def test_every_reference_model_trains_on_as_many_samples_as_the_target(digits, layout):
    raw = {"targets": [{"name": "t"}], "reference": {"count": 6, **layout.get("reference", {})},
           "split": {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.35, "calibration": 0.05,
                     "test": 0.1, **layout.get("split", {})}}
    plan = plan_audit(parse_config(raw), digits)
    target, *refs = jobs_for_target(plan, plan.config.targets[0])
    sizes = [len(j.train_indices) for j in refs]
    assert max(abs(s - len(target.train_indices)) for s in sizes) <= 1, (len(target.train_indices), sizes)
    known = plan.split["calibration_members"]
    assert all(np.isin(known, j.train_indices).all() for j in [target, *refs])  # IN for every model
    assert plan.size_mismatch() is None


def test_an_explicit_pkeep_that_breaks_the_sizes_is_reported(digits):
    plan = plan_audit(parse_config({"targets": [{"name": "t"}], "reference": {"count": 4, "pkeep": 0.3}}), digits)
    assert "use reference.pkeep: auto" in plan.size_mismatch()


def _pool_with_population_in_the_reference_pool(digits, tmp_path, defense=None):
    raw = {"targets": [{"name": "t", "model": {"params": {"hidden": [16]}}, "train": {"epochs": 2},
                        **({"defense": defense} if defense else {})}],
           "split": {"target_members": 0.2, "target_nonmembers": 0.2, "population": 0.3, "calibration": 0.05,
                     "test": 0.1, "defender_reference": 0.1},
           "reference": {"count": 4, "pool": "audited_and_population"}, "attacks": {"loo_targets": 2}}
    plan = plan_audit(parse_config(raw), digits)
    cache = ModelCache(tmp_path / "cache")
    jobs = jobs_for_target(plan, plan.config.targets[0])
    produce_signals(jobs, plan, cache)
    signals, _ = load_signals(jobs, plan, cache)
    return plan, assemble_pool(plan, jobs, signals)


def test_rmia_population_never_holds_what_the_target_trained_on(digits, tmp_path):
    """With population rows in the reference pool, a leave-one-out target trained on some of them: they must not
    be its z; and no defender data (DMP's reference set) is ever the attacker's population."""
    plan, pool = _pool_with_population_in_the_reference_pool(digits, tmp_path, defense={"name": "dmp", "k": 50})
    population = set(plan.split["population"])
    assert not population & set(plan.split["defender_reference"])  # DMP's student data is the defender's own
    for k in range(2):
        loo = leave_one_out_inputs(pool, k, RMIAConfig())
        ref_row = pool.reference_rows[k]
        trained = set(pool.indices[pool.keep[ref_row]])
        z_rows = {int(i) for i in pool.indices[np.isin(pool.indices, list(population))]
                  if not pool.keep[ref_row, np.searchsorted(pool.indices, i)]}
        assert len(loo.z_labels) == len(z_rows) and not trained & z_rows
    target = separate_target_inputs(pool, RMIAConfig())
    assert len(target.z_labels) == len(population)  # the separately trained target never saw the population


def test_defenses_get_the_defenders_reference_data_not_the_attackers_population(digits):
    raw = {"targets": [{"name": "t", "defense": {"name": "dmp"}}],
           "split": {"target_members": 0.2, "target_nonmembers": 0.2, "population": 0.3, "calibration": 0.05,
                     "test": 0.1, "defender_reference": 0.1}}
    plan = plan_audit(parse_config(raw), digits)
    for job in jobs_for_target(plan, plan.config.targets[0]):
        np.testing.assert_array_equal(job.defense_rows.reference, plan.split["defender_reference"])
        assert not np.intersect1d(job.defense_rows.reference, plan.split["population"]).size
    empty = plan_audit(parse_config({**raw, "split": {**raw["split"], "defender_reference": 0.0}}), digits)
    ctx = DefenseContext(digits, empty.split["calibration"], jobs_for_target(empty, empty.config.targets[0])[0]
                         .defense_rows.reference)
    with pytest.raises(Exception, match="split.defender_reference"):
        ctx.required("reference", "DMP")


def test_rmia_a_is_tuned_on_reference_models_only():
    rng = np.random.default_rng(0)
    inputs = synthetic_inputs(rng, n=600, k=8, m=300, margin=1.0)
    a = tune_rmia_a(inputs, RMIAConfig())
    # nothing about the target enters the choice: not its memberships, not its outputs
    shuffled = type(inputs)(**{**inputs.__dict__, "is_member": rng.permutation(inputs.is_member),
                               "target": rng.normal(size=inputs.target.shape).astype(np.float32)})
    assert tune_rmia_a(shuffled, RMIAConfig()) == a
    results = run_attacks(["rmia_offline", "rmia_online"], inputs, AttackKnobs())
    assert results["rmia_offline"].chosen == {"a": a} == results["rmia_online"].chosen
    fixed = run_attacks(["rmia_offline"], inputs, AttackKnobs(rmia=RMIAConfig(a=0.3)))["rmia_offline"]
    assert fixed.chosen == {"a": 0.3}
    assert RMIAConfig().a == "auto"


def test_online_rmia_judges_x_and_z_with_the_same_estimator():
    """A sample no reference model trained on (every z in the default layout) gets P_IN from the offline
    approximation a * P_OUT + (1 - a), not P_OUT alone."""
    ref_p = np.array([[[0.8]], [[0.6]], [[0.4]], [[0.2]]])  # [K=4, n=1, A=1]
    none_in = np.zeros((4, 1), bool)
    half_in = np.array([[True], [True], [False], [False]])
    a = 0.4
    p_out = ref_p.mean()
    assert reference_prob(ref_p, none_in, online=True, a=a)[0, 0] == pytest.approx(
        0.5 * ((a * p_out + 1 - a) + p_out))
    assert reference_prob(ref_p, none_in, online=True, a=a) == pytest.approx(
        reference_prob(ref_p, none_in, online=False, a=a))
    assert reference_prob(ref_p, half_in, online=True, a=a)[0, 0] == pytest.approx(0.5 * (0.7 + 0.3))


def test_diffence_rows_hold_exactly_the_plain_reports_rmia_population(digits):
    from raymia.attacks.suite import population_sample
    from raymia.pipeline.diffence_audit import diffence_rows

    raw = {"targets": [{"name": "t"}], "attacks": {"rmia": {"num_z": 100}},
           "split": {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.27, "calibration": 0.05,
                     "calibration_members": 0.08, "test": 0.1}, "diffence": {"n": 2}}
    plan = plan_audit(parse_config(raw), digits)
    pop = plan.split["population"]
    plain_z = set(pop[population_sample(len(pop), plan.config.attacks.rmia)])
    rows = diffence_rows(plan)
    assert set(rows) & set(pop) == plain_z and len(plain_z) == 100


def test_restricting_the_plain_pool_to_diffences_rows_keeps_rmia_exactly(digits, tmp_path):
    """The same z in both reports: RMIA's numbers on the plain outputs restricted to the rows DIFFENCE is queried
    on equal the plain report's (with 200 population samples instead, low-FPR TPR collapsed by construction)."""
    from raymia.pipeline.diffence_audit import diffence_rows

    raw = {"targets": [{"name": "t", "model": {"params": {"hidden": [32]}}, "train": {"epochs": 15}}],
           "reference": {"count": 4}, "attacks": {"enabled": ["rmia_online", "rmia_offline"]},
           "split": {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.27, "calibration": 0.05,
                     "calibration_members": 0.08, "test": 0.1}, "diffence": {"n": 2}}
    plan = plan_audit(parse_config(raw), digits)
    cache = ModelCache(tmp_path / "cache")
    jobs = jobs_for_target(plan, plan.config.targets[0])
    produce_signals(jobs, plan, cache)
    signals, _ = load_signals(jobs, plan, cache)
    full = assemble_pool(plan, jobs, signals)
    keep = np.isin(full.indices, diffence_rows(plan))
    restricted = PoolSignals(full.indices[keep], full.labels[keep], full.roles[keep], full.model_ids,
                             full.logits[:, keep], full.keep[:, keep], full.label_only[:, keep], full.query_views)
    knobs = plan.config.attacks.knobs()
    a = run_attacks(["rmia_online", "rmia_offline"], separate_target_inputs(full, knobs.rmia), knobs)
    b = run_attacks(["rmia_online", "rmia_offline"], separate_target_inputs(restricted, knobs.rmia), knobs)
    for name in a:
        assert a[name].metrics.auc == b[name].metrics.auc and a[name].metrics.tpr_at_fpr == b[name].metrics.tpr_at_fpr
