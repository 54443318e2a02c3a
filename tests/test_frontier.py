"""Pareto front and champion selection on hand-made points."""

import itertools

import numpy as np
import pytest

from raymia.config import ChampionConfig
from raymia.errors import UserError
from raymia.frontier import Point, choose_champion, dominates, pareto_front


def _brute(points):
    return {p for p in points if not any(dominates(q, p) for q in points)}


def test_front_matches_brute_force_on_random_points():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = rng.integers(1, 15)
        acc = np.round(rng.random(n), 1)  # coarse values: ties in both coordinates
        leak = np.round(rng.random(n), 1)
        points = [Point(f"p{i}", "x", float(a), float(b)) for i, (a, b) in enumerate(zip(acc, leak))]
        front = pareto_front(points)
        dedup = {(p.test_acc, p.leakage) for p in front}
        assert dedup == {(p.test_acc, p.leakage) for p in _brute(points)}, trial
        assert [p.leakage for p in front] == sorted(p.leakage for p in front)


def test_front_on_a_known_example():
    pts = [Point("none", "none", 0.96, 0.08), Point("a", "relaxloss", 0.95, 0.03), Point("b", "dmp", 0.94, 0.05),
           Point("c", "dp_sgd", 0.80, 0.01), Point("d", "ls", 0.97, 0.09)]
    assert [p.name for p in pareto_front(pts)] == ["c", "a", "none", "d"]


def test_champion_rules():
    pts = [Point("none", "none", 0.96, 0.08), Point("a", "relaxloss", 0.955, 0.03), Point("b", "dmp", 0.94, 0.02),
           Point("c", "dp_sgd", 0.80, 0.01)]
    win, why = choose_champion(pts, ChampionConfig(rule="max_accuracy", max_leakage=0.05), "auc")
    assert win.name == "a" and "highest test accuracy" in why
    win, why = choose_champion(pts, ChampionConfig(rule="min_leakage", max_accuracy_drop=0.01), "auc")
    assert win.name == "a" and "within 0.010 test accuracy of none" in why
    win, _ = choose_champion(pts, ChampionConfig(rule="min_leakage", max_accuracy_drop=0.05), "auc")
    assert win.name == "b"
    with pytest.raises(UserError, match="champion.max_leakage"):
        choose_champion(pts, ChampionConfig(rule="max_accuracy", max_leakage=0.001), "auc")


def test_every_front_point_is_undominated_and_every_other_point_is_dominated():
    pts = [Point(f"p{i}", "x", a, b) for i, (a, b) in enumerate(itertools.product([0.9, 0.95], [0.1, 0.2]))]
    front = pareto_front(pts)
    assert [(p.test_acc, p.leakage) for p in front] == [(0.95, 0.1)]
