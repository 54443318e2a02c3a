"""Human-facing views of an audit: the log-log ROC figure, score histograms and the summary table."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

from raymia.attacks.suite import AttackResult  # noqa: E402


def roc_figure(attacks: dict[str, AttackResult], title: str) -> Any:
    """Log-log ROC of every attack; the grey line marks the smallest resolvable FPR (1 / #non-members)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    n_non = next(iter(attacks.values())).metrics.n_nonmembers
    floor = 1.0 / n_non
    for name, a in attacks.items():
        fpr, tpr = a.metrics.fpr, a.metrics.tpr
        keep = fpr > 0
        ax.plot(fpr[keep], np.maximum(tpr[keep], floor / 2), label=f"{name} (AUC {a.metrics.auc:.3f}, "
                f"TPR@0.1% {a.metrics.tpr_at_fpr['0.1pct']:.3f})")
    grid = np.logspace(math.log10(floor / 2), 0, 50)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    ax.axvline(floor, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlim=(floor / 2, 1), ylim=(floor / 2, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def score_histograms(attacks: dict[str, AttackResult], title: str) -> Any:
    """One panel per attack: member vs non-member densities over the pooled score percentile.

    Raw scores pile up at the extremes for confident models (loss near 0, log-odds in the thousands), so each
    score is shown as its percentile among all audited samples: a monotone view in which any difference between
    the two densities is exactly what the attack exploits.
    """
    n = len(attacks)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    bins = np.linspace(0, 1, 26)
    for ax, (name, a) in zip(axes.flat, attacks.items()):
        pct = rankdata(np.concatenate([a.member_scores, a.nonmember_scores])) / (len(a.member_scores)
                                                                                 + len(a.nonmember_scores))
        ax.hist(pct[:len(a.member_scores)], bins=bins, alpha=0.6, density=True, label="members")
        ax.hist(pct[len(a.member_scores):], bins=bins, alpha=0.6, density=True, label="non-members")
        ax.set_title(f"{name} (AUC {a.metrics.auc:.3f})", fontsize=9)
        ax.set_xlabel("score percentile (all audited samples)", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig: Any) -> None:
    plt.close(fig)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table with one row per target configuration."""
    headers = ["target", "test acc", "gap", "best attack", "AUC", "TPR@0.1%FPR"]
    cells = [[r["target"], f"{r['test_acc']:.3f}", f"{r['gap']:+.3f}", r["best_attack"], f"{r['auc']:.3f}",
              f"{r['tpr_at_0.1pct_fpr']:.3f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])
