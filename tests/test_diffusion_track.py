"""The diffusion-model privacy track (reference spec seed-methods §3, attacks.md §1.8): DualMD's split and
sampler, DistillMD's batches and targets, the white-box attacks' sanity, FID."""

import numpy as np
import pytest
import torch

from raymia.attacks.diffusion import DIFFUSION_ATTACKS, DiffusionAttackConfig, attack_scores
from raymia.config import DiffusionAuditConfig, parse_config
from raymia.diffusion.dual_model import DistillSchedule, parity_eps, split_halves
from raymia.diffusion.fid import frechet_distance, proxy_features
from raymia.diffusion.model import DiffusionSpec, build_unet, make_noise_schedule, to_model_range
from raymia.diffusion.sampling import sample, unet_eps
from raymia.diffusion.train import DiffusionRecipe, train_diffusion
from raymia.errors import UserError
from raymia.metrics import roc_auc
from raymia.pipeline.diffusion_track import plan_diffusion_audit

SPEC = DiffusionSpec()
SCHED = make_noise_schedule(SPEC)
ABAR = SCHED.alphas_cumprod


def test_plan_splits_members_into_disjoint_halves_and_trains_on_members_only(digits):
    cfg = parse_config({}, schema=DiffusionAuditConfig)
    plan = plan_diffusion_audit(cfg, digits)
    d1, d2 = plan.halves
    members = plan.roles["members"]
    assert len(np.intersect1d(d1, d2)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([d1, d2])), members)
    outsiders = np.concatenate([plan.roles["nonmembers"], plan.roles["heldout"]])
    assert len(np.intersect1d(members, outsiders)) == 0
    for job in plan.jobs.values():
        assert np.isin(job.rows, members).all() and not np.isin(job.rows, outsiders).any(), job.name
    np.testing.assert_array_equal(plan.jobs["teacher1"].rows, d1)
    np.testing.assert_array_equal(plan.jobs["teacher2"].rows, d2)
    assert plan.jobs["student"].teachers == ("teacher1", "teacher2")
    assert [j.name for j in plan.stages()[1]] == ["student"]


class _Const(torch.nn.Module):
    """An ε-network that answers a constant and counts its calls."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.calls = value, 0

    def forward(self, x, t):
        self.calls += 1
        return torch.full_like(x, self.value)


def test_distillmd_batches_come_from_one_half_and_targets_from_the_other_teacher(digits):
    x = torch.from_numpy(digits.x[:40])
    halves = split_halves(np.arange(40), seed=3)
    teachers = (_Const(1.0), _Const(2.0))
    log: list = []
    schedule = DistillSchedule(halves, batch_size=8, teachers=teachers, record=True, log=log)
    seen_targets = []

    def target(x_t, t, noise, rows):
        out = schedule.target(x_t, t, noise, rows)
        seen_targets.append(float(out.mean()))
        return out

    unet = build_unet(SPEC, digits.input_shape, seed=0)
    train_diffusion(unet, SCHED, x, DiffusionRecipe(steps=10, batch_size=8, warmup_steps=1), seed=0,
                    target_fn=target, batch_rows=schedule.batch_rows)
    assert [entry[0] for entry in log] == list(range(10))
    for (step, rows, half, teacher), value in zip(log, seen_targets):
        assert half == step % 2 and np.isin(rows, halves[half]).all()
        assert teacher == 1 - half and value == (2.0 if half == 0 else 1.0)  # D1 -> θ2, D2 -> θ1
    assert teachers[0].calls == 5 and teachers[1].calls == 5


def test_student_loss_does_not_depend_on_the_ground_truth_noise(digits):
    halves = split_halves(np.arange(20), seed=0)
    teacher = build_unet(SPEC, digits.input_shape, seed=1).eval()
    schedule = DistillSchedule(halves, 4, (unet_eps(teacher), unet_eps(teacher)))
    student = build_unet(SPEC, digits.input_shape, seed=2).eval()
    rows = torch.from_numpy(halves[0][:4])
    x_t, t = torch.randn(4, *digits.input_shape), torch.full((4,), 300)
    losses = [torch.nn.functional.mse_loss(student(x_t, t).sample, schedule.target(x_t, t, torch.randn_like(x_t), rows))
              for _ in range(2)]
    assert losses[0].item() == losses[1].item()
    with pytest.raises(ValueError, match="one half"):
        schedule.half_of(torch.tensor([int(halves[0][0]), int(halves[1][0])]))


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 11)])
def test_dual_sampler_alternates_with_one_call_per_step(sampler, steps):
    a, b = _Const(0.0), _Const(0.0)
    used: list[int] = []
    sample([lambda x, t: a(x, t), lambda x, t: b(x, t)], SCHED.betas, 4, (1, 8, 8), sampler=sampler, steps=steps,
           on_step=lambda k, which: used.append(which))
    assert a.calls + b.calls == steps  # exactly one network call per reverse step
    assert used == [k % 2 for k in range(steps)]
    assert a.calls == (steps + 1) // 2 and b.calls == steps // 2


def test_parity_eps_uses_theta2_at_even_t_and_theta1_at_odd_t():
    eps = parity_eps(lambda x, t: torch.ones_like(x), lambda x, t: torch.full_like(x, 2.0))
    out = eps(torch.zeros(4, 1, 2, 2), torch.tensor([10, 11, 200, 999]))
    assert out[:, 0, 0, 0].tolist() == [2.0, 1.0, 2.0, 1.0]


@pytest.fixture(scope="module")
def teachers(digits):
    """Two tiny DDPMs on disjoint 32-image halves, trained for 500 epochs (they memorise), and 1,200 digits
    neither saw, in two sets of 600."""
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(digits))
    d1, d2, unseen = perm[:32], perm[32:64], perm[64:1264]
    models = []
    for i, rows in enumerate((d1, d2)):
        unet = build_unet(SPEC, digits.input_shape, seed=i)
        models.append(unet_eps(train_diffusion(unet, SCHED, torch.from_numpy(digits.x[rows]),
                                               DiffusionRecipe(steps=500, batch_size=32, warmup_steps=50), seed=i)))
    x = {name: to_model_range(torch.from_numpy(digits.x[rows]))
         for name, rows in (("d1", d1), ("d2", d2), ("unseen_a", unseen[:600]), ("unseen_b", unseen[600:]))}
    return models, x


@pytest.mark.parametrize("attack", DIFFUSION_ATTACKS)
def test_attacks_are_at_chance_on_a_model_that_saw_neither_set(teachers, attack):
    (theta1, _), x = teachers
    cfg = DiffusionAttackConfig()
    auc = roc_auc(attack_scores(attack, theta1, x["unseen_a"], ABAR, cfg).numpy(),
                  attack_scores(attack, theta1, x["unseen_b"], ABAR, cfg).numpy())
    assert abs(auc - 0.5) < 0.05, auc


@pytest.mark.parametrize("attack", DIFFUSION_ATTACKS)
def test_a_teacher_leaks_its_own_half_but_not_the_other(teachers, attack):
    """SecMI at t_sec = 20: a briefly trained tiny model's membership signal sits at small t (at t_sec = 100 it
    varies from 0.46 to 0.78 with the training length). PIAN separates its own half too, but below 0.5 on these
    tiny DDPMs: its rescaled ε0 inverts the signal, which the test records rather than hides."""
    (theta1, theta2), x = teachers
    cfg = DiffusionAttackConfig(secmi_t=20)
    non = attack_scores(attack, theta1, x["unseen_a"], ABAR, cfg).numpy()
    own = roc_auc(attack_scores(attack, theta1, x["d1"], ABAR, cfg).numpy(), non)
    other = roc_auc(attack_scores(attack, theta1, x["d2"], ABAR, cfg).numpy(), non)
    if attack == "pian":
        assert abs(own - 0.5) > 0.15 and abs(other - 0.5) < 0.12, (own, other)
    else:
        assert own > 0.65 and abs(other - 0.5) < 0.12, (own, other)


def test_secmi_inversion_is_exact_for_a_constant_noise_predictor_and_visits_its_schedule():
    """With ε̂ constant, DDIM steps are exactly invertible, so every t-error is 0 (round-off aside) — for any
    schedule; so the timesteps the network is asked about are recorded and checked too."""
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    asked: list[int] = []

    def eps(x, t):
        asked.append(int(t[0]))
        return torch.full_like(x, 0.3)

    scores = attack_scores("secmi", eps, x0, ABAR, DiffusionAttackConfig(secmi_t=100, secmi_k=10))
    assert scores.abs().max() < 1e-8
    assert asked == [*range(0, 90, 10), 90, 100]  # invert 0 -> 90 in steps of k, one step up (φ), one down (ψ)


def test_frechet_distance_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 4))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    shifted = rng.normal(size=(20000, 4)) + np.array([1.0, 2.0, 0.0, 0.0])  # ||μ||² = 5
    assert frechet_distance(a, shifted) == pytest.approx(5.0, abs=0.15)
    wide = rng.normal(size=(20000, 4)) * 2.0  # tr(I + 4I - 2·2I) = d = 4
    assert frechet_distance(a, wide) == pytest.approx(4.0, abs=0.2)


def test_proxy_fid_ranks_real_images_far_ahead_of_noise(digits):
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(digits))
    held, real = perm[:600], perm[600:1000]
    features, acc = proxy_features(torch.from_numpy(digits.x[held]), digits.y[held], epochs=30)
    assert acc > 0.9
    ref = features(torch.from_numpy(digits.x[held]))
    fid_real = frechet_distance(features(torch.from_numpy(digits.x[real])), ref)
    fid_noise = frechet_distance(features(torch.rand(400, *digits.input_shape)), ref)
    assert fid_noise > 10 * fid_real


def test_diffusion_config_errors_name_the_field():
    with pytest.raises(UserError, match=r"attacks\.secmi_tt: unknown key; did you mean 'secmi_t'"):
        parse_config({"attacks": {"secmi_tt": 100}}, schema=DiffusionAuditConfig)
    with pytest.raises(UserError, match=r"defenses\.enabled"):
        parse_config({"defenses": {"enabled": ["dualmd", "distilmd"]}}, schema=DiffusionAuditConfig)
    with pytest.raises(UserError, match="sum to"):
        parse_config({"split": {"members": 0.5, "nonmembers": 0.4, "heldout": 0.3}}, schema=DiffusionAuditConfig)


def test_inception_weights_load_as_tensors_from_a_local_file(tmp_path, digits):
    from torchvision.models import inception_v3

    from raymia.diffusion.fid import inception_features

    weights = tmp_path / "inception.pt"
    plain = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False).eval()
    torch.save(plain.state_dict(), weights)
    images = torch.from_numpy(digits.x[:3])
    feats = inception_features(weights)(images)  # grey 8x8 -> RGB 299x299
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    # torchvision's ImageNet Inception weights expect inputs in [-1, 1] (they were ported from TensorFlow)
    plain.fc = torch.nn.Identity()
    x = torch.nn.functional.interpolate(images.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear",
                                        align_corners=False)
    with torch.no_grad():
        np.testing.assert_allclose(feats, plain(x * 2 - 1).numpy(), rtol=1e-4, atol=1e-4)
    (tmp_path / "bad.pt").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="fid.inception_weights"):
        inception_features(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="not found"):
        inception_features(tmp_path / "missing.pt")


def test_bf16_training_autocasts_the_forward_pass_and_keeps_fp32_weights(digits):
    x = torch.from_numpy(digits.x[:64])
    weights = []
    for precision in ("fp32", "bf16"):
        unet = build_unet(SPEC, digits.input_shape, seed=0)
        train_diffusion(unet, SCHED, x, DiffusionRecipe(steps=20, batch_size=16, warmup_steps=1, precision=precision),
                        seed=0)
        assert all(p.dtype == torch.float32 for p in unet.parameters())
        weights.append(torch.cat([p.detach().flatten() for p in unet.parameters()]))
    assert torch.isfinite(weights[1]).all() and not torch.equal(weights[0], weights[1])  # bf16 arithmetic was used


class _Counting:
    """An ε-function that counts the images it is asked about."""

    def __init__(self, eps):
        self.eps, self.images = eps, 0

    def __call__(self, x, t):
        self.images += len(x)
        return self.eps(x, t)


def test_dualmd_is_judged_by_an_attacker_holding_both_teachers(teachers, digits):
    """Every default timestep is even, where DualMD's sampler uses θ2 alone; the headline must still query θ1, and
    be the per-sample better of the two teachers' scores; both sampler parities and each teacher's halves are
    reported too."""
    from raymia.pipeline.diffusion_track import DiffusionSystem, evaluate_system

    (theta1, theta2), _ = teachers
    cfg = parse_config({"attacks": {"enabled": ["loss", "pia"], "t_grid": [], "loss_noises": 1},
                        "sampling": {"n_samples": 10, "steps": 2, "batch_size": 10},
                        "split": {"members": 0.05, "nonmembers": 0.05, "heldout": 0.05}}, schema=DiffusionAuditConfig)
    plan = plan_diffusion_audit(cfg, digits)
    c1, c2 = _Counting(theta1), _Counting(theta2)
    system = DiffusionSystem("dualmd", parity_eps(c1, c2), [c1, c2], {"theta1": c1, "theta2": c2})
    report = evaluate_system(plan, system, lambda images: images.flatten(1).numpy(), "fid_proxy")
    assert c1.images > 0 and c2.images > 0
    x = {r: to_model_range(torch.from_numpy(digits.x[plan.roles[r]])) for r in ("members", "nonmembers")}
    for attack in ("loss", "pia"):
        s1 = [attack_scores(attack, theta1, x[r], ABAR, cfg.attacks).numpy() for r in ("members", "nonmembers")]
        s2 = [attack_scores(attack, theta2, x[r], ABAR, cfg.attacks).numpy() for r in ("members", "nonmembers")]
        both = roc_auc(np.maximum(s1[0], s2[0]), np.maximum(s1[1], s2[1]))
        assert report.attacks[attack].metrics.auc == pytest.approx(both)
        h1, h2 = plan.half_positions()
        assert report.parts["theta1_own"][attack].metrics.auc == pytest.approx(roc_auc(s1[0][h1], s1[1]))
        assert report.parts["theta2_other"][attack].metrics.auc == pytest.approx(roc_auc(s2[0][h1], s2[1]))
        for part in ("sampler_even", "sampler_odd", "theta1_other", "theta2_own", "cross"):
            assert attack in report.parts[part]


def test_teacher_weights_are_a_logged_choice_between_ema_and_raw(digits, tmp_path):
    from raymia.cache import ModelCache
    from raymia.pipeline.diffusion_track import load_unet, train_job

    cfg = parse_config({"defenses": {"enabled": ["dualmd"], "teacher_weights": "raw"},
                        "train": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
                        "split": {"members": 0.02, "nonmembers": 0.02, "heldout": 0.02}}, schema=DiffusionAuditConfig)
    plan = plan_diffusion_audit(cfg, digits)
    cache = ModelCache(tmp_path)
    train_job(plan, "teacher1", cache)
    ema, raw = load_unet(plan, "teacher1", cache), load_unet(plan, "teacher1", cache, weights="raw")
    assert not all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), raw.state_dict().values()))
    assert cfg.defenses.teacher_weights == "raw" and parse_config({}, schema=DiffusionAuditConfig).defenses.teacher_weights == "ema"
