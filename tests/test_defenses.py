"""Training-time defenses against their definitions (reference specs: seed-methods §5, §4, baselines)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raymia.defenses import DefenseContext, NoDefenseConfig, make_defense
from raymia.defenses.advreg import AdvRegConfig
from raymia.defenses.baselines import EarlyStoppingConfig, LabelSmoothingConfig, RegularizationConfig
from raymia.defenses.dmp import DMPConfig, entropy, select_reference
from raymia.defenses.dp_sgd import DPSGDConfig
from raymia.defenses.relaxloss import RelaxLossConfig, RelaxLossPolicy, flattened_target
from raymia.defenses.selena import SELENAConfig, split_ai_exclusions
from raymia.errors import UserError
from raymia.models.classifiers import ModelSpec, build_model
from raymia.training.loop import TrainRecipe, predict_logits, train_classifier

SPEC = ModelSpec(params={"hidden": [64]})


@pytest.fixture(scope="module")
def rows(digits):
    perm = np.random.default_rng(0).permutation(len(digits))
    return {"train": np.sort(perm[:300]), "calibration": np.sort(perm[300:400]), "reference": np.sort(perm[400:900]),
            "test": np.sort(perm[900:1300])}


@pytest.fixture(scope="module")
def ctx(digits, rows):
    return DefenseContext(digits, rows["calibration"], rows["reference"])


def _build(digits, spec=SPEC):
    return lambda seed: build_model(spec, digits.input_shape, digits.num_classes, seed=seed)


def _fit(defense_cfg, digits, rows, ctx, recipe=TrainRecipe(epochs=20, batch_size=32), seed=0):
    return make_defense(defense_cfg).fit(_build(digits, make_defense(defense_cfg).model_spec(SPEC)), rows["train"],
                                         recipe, seed, ctx)


def _acc(model, digits, idx):
    return float((predict_logits(model, digits.x[idx]).argmax(1) == digits.y[idx]).mean())


def _mean_ce(model, digits, idx):
    logits = torch.from_numpy(predict_logits(model, digits.x[idx]))
    return float(F.cross_entropy(logits, torch.from_numpy(digits.y[idx])))


# ------------------------------------------------------------------------------------------------- RelaxLoss

def test_relaxloss_alpha_zero_is_ordinary_training(digits, rows, ctx):
    plain = _fit(NoDefenseConfig(), digits, rows, ctx)
    relaxed = _fit(RelaxLossConfig(alpha=0.0), digits, rows, ctx)
    for a, b in zip(plain.model.state_dict().values(), relaxed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_relaxloss_keeps_the_training_loss_near_alpha(digits, rows, ctx):
    recipe = TrainRecipe(epochs=40, batch_size=32, lr=3e-3)
    plain = _fit(NoDefenseConfig(), digits, rows, ctx, recipe)
    relaxed = _fit(RelaxLossConfig(alpha=0.5), digits, rows, ctx, recipe)
    assert _mean_ce(plain.model, digits, rows["train"]) < 0.05
    assert 0.25 < _mean_ce(relaxed.model, digits, rows["train"]) < 0.9


def test_flattened_target_rows():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0]])
    y = torch.tensor([0, 2])
    t = flattened_target(logits, y, upper=0.6)
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    for i in range(2):
        assert t[i, y[i]] == pytest.approx(min(float(p[i, y[i]]), 0.6))
        others = t[i][torch.arange(4) != y[i]]
        torch.testing.assert_close(others, others[0].expand(3))


def test_relaxloss_ascends_below_alpha_and_variants_differ(digits, rows):
    model = build_model(SPEC, digits.input_shape, 10, seed=0)
    x, y = torch.from_numpy(digits.x[rows["train"][:64]]), torch.from_numpy(digits.y[rows["train"][:64]])
    train_classifier(model, x, y, TrainRecipe(epochs=60, lr=3e-3), seed=0)  # fit the batch: CE well below alpha
    model.train()
    before = float(F.cross_entropy(model(x), y).detach())
    policy = RelaxLossPolicy(RelaxLossConfig(alpha=1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = policy.loss(model(x), y, epoch=0)  # even epoch, L < alpha: |L - alpha| -> ascent on L
    opt.zero_grad(); loss.backward(); opt.step()  # noqa: E702
    assert float(F.cross_entropy(model(x), y)) > before

    grads = []
    for variant in ("image", "nonimage"):
        model.zero_grad()
        RelaxLossPolicy(RelaxLossConfig(alpha=5.0, variant=variant, upper=0.5)).loss(model(x), y, epoch=1).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------------ DMP

def test_dmp_student_never_sees_a_member_and_selection_keeps_the_k_lowest(digits, rows, ctx):
    result = _fit(DMPConfig(k=200, temperature=2.0), digits, rows, ctx)
    assert len(result.data_rows) == 200
    assert not np.intersect1d(result.data_rows, rows["train"]).size
    assert set(result.data_rows) <= set(rows["reference"])
    assert _acc(result.model, digits, rows["test"]) > 0.6  # the student learned from soft labels alone

    probs = np.random.default_rng(0).dirichlet(np.ones(5) * 0.3, size=100)
    low = select_reference(probs, 30, "low", 0)
    h = entropy(probs)
    assert len(low) == 30 and h[low].max() <= np.delete(h, low).min()
    high = select_reference(probs, 30, "high", 0)
    assert h[high].min() >= np.delete(h, high).max()
    assert len(select_reference(probs, 30, "random", 0)) == 30


def test_dmp_rejects_an_overlapping_reference_set(digits, rows):
    bad = DefenseContext(digits, rows["calibration"], rows["train"][:50])
    with pytest.raises(AssertionError, match="overlaps"):
        make_defense(DMPConfig()).fit(_build(digits), rows["train"], TrainRecipe(epochs=1), 0, bad)


# --------------------------------------------------------------------------------------------------- DP-SGD

def test_dp_sgd_reports_finite_epsilon_that_shrinks_with_more_noise(digits, rows, ctx):
    eps = []
    for sigma in (0.8, 2.0):
        result = _fit(DPSGDConfig(noise_multiplier=sigma, max_grad_norm=1.0), digits, rows, ctx,
                      TrainRecipe(epochs=3, batch_size=50, optimizer="sgd", lr=0.5))
        assert np.isfinite(result.extra["dp_epsilon"]) and result.extra["dp_noise_multiplier"] == sigma
        eps.append(result.extra["dp_epsilon"])
    assert eps[1] < eps[0]
    target = _fit(DPSGDConfig(target_epsilon=4.0), digits, rows, ctx, TrainRecipe(epochs=3, batch_size=50))
    assert target.extra["dp_epsilon"] == pytest.approx(4.0, rel=0.1)
    assert not target.model._forward_hooks and not any(m._forward_hooks for m in target.model.modules())


def test_dp_sgd_rejects_batchnorm():
    model = build_model(ModelSpec(arch="resnet18", params={"width": 4}), (3, 8, 8), 10)
    with pytest.raises(UserError, match="targets.0.defense: DP-SGD cannot train this architecture"):
        make_defense(DPSGDConfig(noise_multiplier=1.0)).check(model, field="targets.0.defense")


# ------------------------------------------------------------------------------------------------ baselines

def test_label_smoothing_early_stopping_and_regularization(digits, rows, ctx):
    smooth = _fit(LabelSmoothingConfig(epsilon=0.3), digits, rows, ctx)
    p = torch.softmax(torch.from_numpy(predict_logits(smooth.model, digits.x[rows["train"]])), 1)
    assert float(p.max(1).values.mean()) < 0.9  # smoothed targets cap the confidence

    stopped = _fit(EarlyStoppingConfig(patience=2), digits, rows, ctx, TrainRecipe(epochs=200, batch_size=32))
    assert 1 <= stopped.extra["best_epoch"] < 200 and 0 < stopped.extra["val_acc"] <= 1

    reg = make_defense(RegularizationConfig(weight_decay=0.01, dropout=0.3))
    assert reg.recipe(TrainRecipe()).weight_decay == 0.01 and reg.model_spec(SPEC).params["dropout"] == 0.3


def test_advreg_trains_against_an_inference_model(digits, rows, ctx):
    result = _fit(AdvRegConfig(lam=1.0, warmup_epochs=1), digits, rows, ctx, TrainRecipe(epochs=4, batch_size=32))
    assert 0 < result.extra["adversary_member_prob"] < 1
    assert _acc(result.model, digits, rows["test"]) > 0.5


# --------------------------------------------------------------------------------------------------- SELENA

def test_selena_leaves_each_sample_out_of_exactly_l_submodels(digits, rows, ctx):
    excl = split_ai_exclusions(103, 7, 3, seed=0)
    assert (excl.sum(axis=0) == 3).all() and excl.sum(axis=1).max() - excl.sum(axis=1).min() <= 3
    result = _fit(SELENAConfig(submodels=5, excluded=2), digits, rows, ctx, TrainRecipe(epochs=30, batch_size=32, lr=3e-3))
    assert np.array_equal(result.data_rows, rows["train"])
    assert _acc(result.model, digits, rows["test"]) > 0.7


# ----------------------------------------------------------------------------- end to end on digits (no Ray)

@pytest.mark.slow
def test_relaxloss_lowers_leakage_on_digits_at_small_accuracy_cost(digits, tmp_path):
    from raymia.cache import ModelCache
    from raymia.config import parse_config
    from raymia.pipeline.plan import plan_audit
    from raymia.pipeline.recipe import audit_configuration

    base = {"model": {"params": {"hidden": [256]}}, "train": {"epochs": 60, "batch_size": 32, "lr": 0.002}}
    cfg = parse_config({  # large audited sets and 16 reference models: AUC differences of 0.03 are signal, not noise
        "split": {"target_members": 0.4, "target_nonmembers": 0.4, "population": 0.04, "calibration": 0.04, "test": 0.12},
        "targets": [{"name": "none", **base}] + [{"name": f"relax-{a}", **base, "defense": {"name": "relaxloss",
                                                                                           "alpha": a}}
                                                 for a in (0.03, 0.05)],
        "reference": {"count": 16},
        "attacks": {"enabled": ["loss", "lira_online_fixed_var", "lira_offline_fixed_var", "rmia_online", "rmia_offline"]},
    })
    plan = plan_audit(cfg, digits)
    assert all(j.target.defense == t.defense for t in cfg.targets for j in plan.target_jobs(t.name))  # adaptive
    cache = ModelCache(tmp_path / "cache")
    reports = {t.name: audit_configuration(plan, t, cache).reports[0] for t in cfg.targets}
    base_auc, base_acc = reports["none"].best_attack().metrics.auc, reports["none"].test_acc
    gains = {name: (base_auc - r.best_attack().metrics.auc, base_acc - r.test_acc) for name, r in reports.items()}
    assert any(auc_drop >= 0.03 and acc_drop <= 0.02 for auc_drop, acc_drop in gains.values()), gains

    # the reference models were trained with RelaxLoss too: their loss on their own training rows stays high
    def ref_train_ce(name: str) -> float:
        pool = reports[name].pool
        refs = pool.reference_rows
        ce = -np.log(np.take_along_axis(torch.softmax(torch.from_numpy(pool.logits[refs, :, 0]).double(), -1).numpy(),
                                        pool.labels[None, :, None], -1)[..., 0] + 1e-12)
        return float(ce[pool.keep[refs]].mean())
    assert ref_train_ce("relax-0.05") > 5 * ref_train_ce("none")


def test_selena_soft_label_of_a_sample_comes_only_from_submodels_that_never_saw_it():
    from raymia.defenses.selena import split_ai_soft_labels

    k, n, c = 5, 40, 5
    excl = split_ai_exclusions(n, k, 2, seed=1)
    probs = np.zeros((k, n, c))
    probs[np.arange(k), :, np.arange(k)] = 1.0  # sub-model j always answers class j
    soft = split_ai_soft_labels(probs, excl)
    for i in range(n):
        np.testing.assert_allclose(soft[i], excl[:, i] / 2.0)  # half on each of the two that left i out


# -------------------------------------------------------------------------- what a defense actually trains on

def test_dmp_student_is_trained_on_reference_rows_only(digits, rows, ctx, monkeypatch):
    """Spy on the rows the student's training actually receives (not the defense's own report of them)."""
    import raymia.defenses.dmp as dmp

    seen = []
    real = dmp.train_classifier

    def spy(model, x, y, recipe, **kw):
        seen.append((x.numpy().copy(), kw.get("policy")))
        return real(model, x, y, recipe, **kw)

    monkeypatch.setattr(dmp, "train_classifier", spy)
    _fit(DMPConfig(k=150), digits, rows, ctx)
    (teacher_x, _), (student_x, student_policy) = seen
    assert student_policy is not None  # the second run is the student's distillation
    members = {row.tobytes() for row in digits.x[rows["train"]]}
    reference = {row.tobytes() for row in digits.x[rows["reference"]]}
    student_rows = [row.tobytes() for row in student_x]
    assert len(student_rows) == 150 and all(r in reference for r in student_rows)
    assert {row.tobytes() for row in teacher_x} == members


def test_early_stopping_validates_on_the_calibration_split_and_restores_the_best_weights(digits, rows, ctx):
    from raymia.defenses.baselines import EarlyStoppingConfig

    defense = make_defense(EarlyStoppingConfig(patience=2))
    recipe = TrainRecipe(epochs=200, batch_size=32)
    policy = defense.policy(ctx, recipe, len(rows["train"]), seed=0)
    np.testing.assert_array_equal(policy.x_val, digits.x[rows["calibration"]])  # never an audited sample
    model = build_model(SPEC, digits.input_shape, 10, seed=0)
    train_classifier(model, torch.from_numpy(digits.x[rows["train"]]), torch.from_numpy(digits.y[rows["train"]]),
                     recipe, seed=0, policy=policy)
    assert policy.best_epoch + 1 < 200  # it stopped
    for name, value in model.state_dict().items():  # the released weights are the best epoch's, not the last
        assert torch.equal(value, policy.best_state[name]), name
    assert _acc(model, digits, rows["calibration"]) == policy.best_acc


def test_advreg_keeps_its_members_loss_up_where_plain_training_drives_it_down(digits, rows, ctx):
    """The classifier minimises CE + λ·log h(member): it gives up fitting its members to fool the adversary. With
    the sign of λ flipped it helps the adversary instead and fits them as hard as plain training (measured: train
    CE 0.26 with λ = 3, 0.068 plain, 0.053 flipped)."""
    recipe = TrainRecipe(epochs=30, batch_size=32, lr=3e-3)
    plain = _fit(NoDefenseConfig(), digits, rows, ctx, recipe)
    adv = _fit(AdvRegConfig(lam=3.0, warmup_epochs=1), digits, rows, ctx, recipe)
    assert _mean_ce(adv.model, digits, rows["train"]) > 2 * _mean_ce(plain.model, digits, rows["train"])


def test_advreg_looks_at_the_reference_batch_in_eval_mode(digits, rows):
    """BatchNorm statistics of the released model must only ever see its training batches."""
    from raymia.defenses.advreg import AdvRegPolicy

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 10))
    policy = AdvRegPolicy(AdvRegConfig(lam=1.0, warmup_epochs=0), digits.x[rows["reference"]],
                          digits.y[rows["reference"]], 10, seed=0)
    policy.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.train()
    x, y = torch.from_numpy(digits.x[rows["train"][:32]]), torch.from_numpy(digits.y[rows["train"][:32]])
    logits = model(x)  # the training batch moves the statistics, as it should
    before = model[2].running_mean.clone()
    policy.loss(logits, y, epoch=1)  # the adversary's step runs the classifier on a reference batch
    assert torch.equal(model[2].running_mean, before) and model.training
