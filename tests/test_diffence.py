"""DIFFENCE invariants (reference spec seed-methods §6.1) on small, untrained or hand-built models."""

import numpy as np
import pytest
import torch
from torch import nn

from raymia.defenses.diffence import (
    Diffence,
    DiffenceConfig,
    ddim_denoise,
    noised,
    search_interval,
    select,
    top1_log_odds,
)
from raymia.diffusion.model import DiffusionSpec, build_unet, make_noise_schedule
from raymia.models.classifiers import ModelSpec, build_model

ABAR = make_noise_schedule(DiffusionSpec()).alphas_cumprod


@pytest.fixture(scope="module")
def system(digits):
    clf = build_model(ModelSpec(params={"hidden": [32]}), digits.input_shape, 10, seed=0)
    unet = build_unet(DiffusionSpec(), digits.input_shape, seed=0)
    return clf, unet


def _diffence(system, **cfg):
    clf, unet = system
    return Diffence(clf, unet, ABAR, DiffenceConfig(**{"n": 6, "scenario": 3, **cfg}))


def test_label_is_preserved_and_one_candidate_is_released(system, digits):
    x = digits.x[:64]
    for scenario in (1, 2, 3):
        d = _diffence(system, scenario=scenario)
        if scenario != 3:
            d.calibrate(digits.x[100:140], digits.x[200:240])
        released = d(x, seed=1)
        original = d._classify(torch.from_numpy(x)).numpy()
        assert (released.argmax(1) == original.argmax(1)).all()
        cand = d.candidates(torch.from_numpy(x), torch.Generator().manual_seed(1))
        matches = (np.abs(cand - released[:, None]).max(-1) == 0).sum(1)
        assert (matches >= 1).all()  # exactly equal to a candidate's logits, not an average


def test_n_zero_is_the_undefended_model(system, digits):
    d = _diffence(system, n=0, scenario=1)
    x = digits.x[:20]
    np.testing.assert_array_equal(d(x), d._classify(torch.from_numpy(x)).numpy())


class _BlackOut(nn.Module):
    """A 'UNet' whose single DDIM jump lands on an all-black image (x̂0 = -1)."""

    def forward(self, x, t):
        a = ABAR[t].view(-1, 1, 1, 1)
        return type("Out", (), {"sample": (x + a.sqrt()) / (1 - a).sqrt()})()


class _Brightness(nn.Module):
    """Class 1 for bright images, class 0 for dark ones."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([0.5 - m, m - 0.5], dim=1) * 10


def test_wrong_label_reconstructions_fall_back_to_the_original():
    x = np.full((5, 1, 8, 8), 0.9, dtype=np.float32)
    d = Diffence(_Brightness(), _BlackOut(), ABAR, DiffenceConfig(n=4, scenario=3))
    cand = d.candidates(torch.from_numpy(x))
    assert (cand[:, :-1].argmax(-1) == 0).all() and (cand[:, -1].argmax(-1) == 1).all()
    np.testing.assert_array_equal(d(x), cand[:, -1])
    d1 = Diffence(_Brightness(), _BlackOut(), ABAR, DiffenceConfig(n=4, scenario=1), interval=(-100.0, 100.0))
    np.testing.assert_array_equal(d1(x), cand[:, -1])


def test_interval_rule_first_inside_else_closest_to_midpoint():
    def cand_with(phis, labels):  # two classes: logits (0, phi) give top-1 log-odds phi for class 1
        rows = []
        for p, lab in zip(phis, labels):
            rows.append([0.0, p] if lab == 1 else [abs(p), 0.0])
        return np.array([rows], dtype=np.float64)
    cand = cand_with([5.0, 1.5, 2.5, 0.2], [1, 1, 1, 1])  # last = original
    assert select(cand, (1.0, 3.0))[0] == 1  # the first kept candidate inside [a, b]
    assert select(cand, (3.2, 4.0))[0] == 2  # none inside: closest to the midpoint 3.6 among kept (5.0 vs 2.5)
    wrong = cand_with([1.5, 2.0, 0.2], [0, 1, 1])
    assert select(wrong, (1.0, 2.5))[0] == 1  # the wrong-label candidate is never chosen
    phi = top1_log_odds(cand)[0]
    assert phi[select(cand, (1.0, 3.0))[0]] == pytest.approx(1.5)


def test_paper_noise_has_the_textbook_mean_and_variance():
    torch.manual_seed(0)
    x0 = torch.full((20000,), 0.6)
    noise = torch.randn(20000)
    t = 160
    paper = noised(x0, t, ABAR, noise, "paper")
    a = ABAR[t]
    assert float(paper.mean()) == pytest.approx(float(a.sqrt() * 0.6), abs=0.01)
    assert float(paper.std()) == pytest.approx(float((1 - a).sqrt()), rel=0.02)
    ref = noised(x0, t, ABAR, noise, "reference")
    a1 = ABAR[t - 1]
    assert float(ref.mean()) == pytest.approx(float(0.6 / a1.sqrt()), abs=0.01)
    assert float(ref.std()) == pytest.approx(float((1 / a1 - 1).sqrt()), rel=0.02)


def test_single_jump_ddim_is_one_unet_call_with_the_closed_form(system):
    calls = []

    class Counting(nn.Module):
        def forward(self, x, t):
            calls.append(t)
            return type("Out", (), {"sample": torch.zeros_like(x)})()  # ε̂ = 0

    x_t = torch.randn(3, 1, 8, 8)
    out = ddim_denoise(Counting(), x_t, 160, ABAR, steps=1)
    assert len(calls) == 1 and int(calls[0][0]) == 160
    torch.testing.assert_close(out, ABAR[0].sqrt() * x_t / ABAR[160].sqrt())
    ddim_denoise(Counting(), x_t, 160, ABAR, steps=4)
    assert len(calls) == 1 + 4


def test_fixed_seed_gives_identical_output_and_seeds_differ(system, digits):
    x = digits.x[:32]
    a, b = _diffence(system)(x, seed=3), _diffence(system)(x, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _diffence(system)(x, seed=4))


def test_chunking_does_not_change_the_output(system, digits):
    """The noise is drawn for the whole batch before chunking, so the chunk size only bounds memory."""
    x = digits.x[:20]
    whole = _diffence(system, n=8)(x, seed=5)  # chunk auto (512 on a CPU): one UNet call of 160 images
    np.testing.assert_allclose(_diffence(system, n=8, chunk=7)(x, seed=5), whole, rtol=1e-4, atol=1e-4)


def test_scenario_interval_search(system, digits):
    d = _diffence(system, scenario=1, grid_points=6)
    cm, cn = d.candidates(torch.from_numpy(digits.x[:30])), d.candidates(torch.from_numpy(digits.x[30:60]))
    a, b = search_interval(cm, cn, d.config)
    assert a < b
    a2, b2 = search_interval(cm, cn, d.config.model_copy(update={"scenario": 2}))
    kept = (cm.argmax(-1) == cm[:, -1:].argmax(-1))[:, :-1]
    phi = top1_log_odds(cm[:, :-1])[kept]
    assert (a2, b2) == (pytest.approx(phi.min()), pytest.approx(phi.mean()))


def test_per_query_seeds_make_outputs_independent_of_the_batch(system, digits):
    d = _diffence(system, scenario=3)
    x = digits.x[:6]
    together = d(x, seeds=[10, 11, 12, 13, 14, 15])
    alone = np.concatenate([d(x[i:i + 1], seeds=[10 + i]) for i in range(6)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def _js_distance_by_hand(phi_mem, phi_non, bins):
    """Jensen-Shannon distance written out: histograms over the non-members' range (members clipped into it),
    empty bins floored at 1e-19, natural log, the square root of the divergence."""
    lo, hi = min(phi_non), max(phi_non)
    hi = hi if hi > lo else lo + 1e-6
    width = (hi - lo) / bins

    def hist(values):
        h = [0.0] * bins
        for v in values:
            v = min(max(v, lo), hi)
            h[min(int((v - lo) / width), bins - 1)] += 1
        h = [max(c, 1e-19) for c in h]
        total = sum(h)
        return [c / total for c in h]

    p, q = hist(phi_mem), hist(phi_non)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    div = 0.5 * sum(a * np.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * np.log(b / c) for b, c in zip(q, m))
    return float(np.sqrt(div))


def test_scenario_one_interval_is_the_js_optimum_recomputed_independently(system, digits):
    d = _diffence(system, scenario=1, grid_points=5, js_bins=12)
    cm, cn = d.candidates(torch.from_numpy(digits.x[:25])), d.candidates(torch.from_numpy(digits.x[40:65]))

    def phis(cand):
        kept = cand.argmax(-1) == cand[:, -1:].argmax(-1)
        return top1_log_odds(cand), kept

    (phi_m, kept_m), (phi_n, kept_n) = phis(cm), phis(cn)
    lo = float(phi_m[:, :-1][kept_m[:, :-1]].min()) if kept_m[:, :-1].any() else float(phi_m[:, -1].min())
    hi = float(phi_n[:, :-1][kept_n[:, :-1]].max()) if kept_n[:, :-1].any() else float(phi_n[:, -1].max())
    grid = np.linspace(lo, hi, 6)

    def selected(phi, kept, a, b):  # the rule: first kept candidate inside [a, b], else the kept one nearest the middle
        out = []
        for row_phi, row_kept in zip(phi, kept):
            inside = [v for v, k in zip(row_phi, row_kept) if k and a <= v <= b]
            out.append(inside[0] if inside else min((v for v, k in zip(row_phi, row_kept) if k),
                                                    key=lambda v: abs(v - (a + b) / 2)))
        return out

    scores = {(a, b): _js_distance_by_hand(selected(phi_m, kept_m, a, b), selected(phi_n, kept_n, a, b), 12)
              for i, a in enumerate(grid) for b in grid[i + 1:]}
    best = min(scores, key=scores.get)
    assert search_interval(cm, cn, d.config) == (pytest.approx(best[0]), pytest.approx(best[1]))


def test_released_logits_are_the_fp32_classifiers_whatever_the_unet_precision(system, digits):
    """bf16 applies to the UNet only: the released vector is exactly what the fp32 classifier says about the chosen
    image, and the original candidate equals the undefended output bit for bit."""
    clf, unet = system
    x = torch.from_numpy(digits.x[:16])
    d = Diffence(clf, unet, ABAR, DiffenceConfig(n=4, scenario=3, precision="bf16"))
    cand = d.candidates(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = clf(x).numpy()
    assert cand.dtype == np.float32
    np.testing.assert_array_equal(cand[:, -1], plain)
    released = d(x.numpy(), seed=0)
    assert ((np.abs(cand - released[:, None]).max(-1) == 0).sum(1) >= 1).all()
