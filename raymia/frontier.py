"""Turn an audit into a decision: the privacy-utility Pareto front and the champion configuration.

A configuration is a point (test accuracy up, leakage down). It is on the front when no other point is at
least as accurate and at most as leaky, and strictly better in one of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymia.config import ChampionConfig, FrontierConfig
from raymia.errors import UserError


@dataclass(frozen=True)
class Point:
    """One audited configuration: its name, defense, test accuracy and leakage (and MLflow child run)."""

    name: str
    defense: str
    test_acc: float
    leakage: float
    run_id: str | None = None
    leakage_ci: tuple[float, float] | None = None  # 95 % interval of the leakage


def leakage_of(report: object, cfg: FrontierConfig) -> tuple[float, tuple[float, float]]:
    """The configured leakage metric of the configured attack (``best``: the maximum over attacks) and its 95 %
    interval (DeLong for AUC, Clopper–Pearson for a TPR)."""
    if cfg.leakage.startswith(("eps_", "vulnerable_")):
        return _privacy_leakage(report, cfg.leakage)

    def metric(a: object) -> tuple[float, tuple[float, float]]:
        m = a.metrics
        if cfg.leakage == "auc":
            return m.auc, m.auc_ci
        r = m.at_fpr[cfg.leakage.removeprefix("tpr_at_").removesuffix("_fpr")]
        return r.tpr, r.ci
    if cfg.attack == "best":
        return max((metric(a) for a in report.attacks.values()), key=lambda v: v[0])
    if cfg.attack not in report.attacks:
        raise UserError(f"frontier attack '{cfg.attack}' was not run; add it to attacks.enabled", field="frontier.attack")
    return metric(report.attacks[cfg.attack])


def _privacy_leakage(report: object, leakage: str) -> tuple[float, tuple[float, float]]:
    """The worst-case leakages: an ε bound (no interval: it is itself a one-sided bound) or the TPR of the
    attack on the most vulnerable samples with its Clopper–Pearson interval."""
    p = report.privacy
    if leakage == "eps_lower_bound":
        eps = p.one_run.eps if p is not None and p.one_run is not None else float("nan")
        return eps, (eps, eps)
    if leakage == "eps_estimate":
        best = p.strongest_estimate() if p is not None else None
        eps = best[1].eps if best is not None else float("nan")
        return eps, (eps, eps)
    m = p.vulnerable.metrics("top") if p is not None and p.vulnerable is not None else None
    if m is None:
        return float("nan"), (float("nan"), float("nan"))
    r = m.at_fpr[leakage.removeprefix("vulnerable_tpr_at_").removesuffix("_fpr")]
    return r.tpr, r.ci


def dominates(a: Point, b: Point) -> bool:
    return a.test_acc >= b.test_acc and a.leakage <= b.leakage and (a.test_acc > b.test_acc or a.leakage < b.leakage)


def pareto_front(points: list[Point]) -> list[Point]:
    """Non-dominated points, by increasing leakage: sort by (leakage, -accuracy) and keep each point more
    accurate than every less leaky one. O(n log n)."""
    front: list[Point] = []
    best_acc = float("-inf")
    for p in sorted(points, key=lambda p: (p.leakage, -p.test_acc)):
        if p.test_acc > best_acc:
            front.append(p)
            best_acc = p.test_acc
    return front


def choose_champion(points: list[Point], rule: ChampionConfig, leakage_name: str) -> tuple[Point, str]:
    """The configuration ``rule`` selects and a sentence saying why. Raises :class:`UserError` if none qualifies."""
    if rule.rule == "max_accuracy":
        ok = [p for p in points if p.leakage <= rule.max_leakage]
        if not ok:
            lowest = min(points, key=lambda p: p.leakage)
            raise UserError(f"no configuration has {leakage_name} <= {rule.max_leakage} (lowest: {lowest.name} at "
                            f"{lowest.leakage:.4f}); raise champion.max_leakage or add stronger defenses",
                            field="champion.max_leakage")
        win = max(ok, key=lambda p: (p.test_acc, -p.leakage))
        return win, (f"highest test accuracy ({win.test_acc:.4f}) among the {len(ok)} of {len(points)} configurations "
                     f"with {leakage_name} <= {rule.max_leakage} (its {leakage_name}: {win.leakage:.4f})")
    undefended = [p for p in points if p.defense == "none"]
    base = max(undefended or points, key=lambda p: p.test_acc)
    floor = base.test_acc - rule.max_accuracy_drop
    ok = [p for p in points if p.test_acc >= floor - 1e-12]
    win = min(ok, key=lambda p: (p.leakage, -p.test_acc))
    return win, (f"lowest {leakage_name} ({win.leakage:.4f}) among the {len(ok)} of {len(points)} configurations "
                 f"within {rule.max_accuracy_drop:.3f} test accuracy of {base.name} ({base.test_acc:.4f}); "
                 f"its test accuracy: {win.test_acc:.4f}")
