"""Human-facing views of both tracks, from plain values: ROC figures, score histograms, sample grids, the frontier,
the summary table and the self-contained HTML reports."""

from __future__ import annotations

import base64
import html
import io
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


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def frontier_figure(points: list, front: list, leakage_name: str, champion: Any = None) -> Any:
    """Scatter of (leakage, test accuracy) per configuration, the Pareto front as a line, the champion starred."""
    fig, ax = plt.subplots(figsize=(7, 5))
    defenses = sorted({p.defense for p in points})
    colors = dict(zip(defenses, plt.cm.tab10.colors))
    for d in defenses:
        ps = [p for p in points if p.defense == d]
        ax.scatter([p.leakage for p in ps], [p.test_acc for p in ps], color=colors[d], label=d, s=36, alpha=0.8)
        with_ci = [p for p in ps if p.leakage_ci is not None]
        ax.errorbar([p.leakage for p in with_ci], [p.test_acc for p in with_ci], fmt="none", ecolor=colors[d],
                    alpha=0.5, capsize=2, xerr=np.array([[p.leakage - p.leakage_ci[0], p.leakage_ci[1] - p.leakage]
                                                         for p in with_ci]).T.reshape(2, -1))
    ordered = sorted(front, key=lambda p: p.leakage)
    ax.plot([p.leakage for p in ordered], [p.test_acc for p in ordered], "k-", lw=1.2, label="Pareto front")
    ax.scatter([p.leakage for p in front], [p.test_acc for p in front], facecolors="none", edgecolors="k", s=110)
    if champion is not None:
        ax.scatter([champion.leakage], [champion.test_acc], marker="*", s=320, color="gold", edgecolors="k",
                   zorder=5, label="champion")
    for p in points:
        ax.annotate(p.name, (p.leakage, p.test_acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=f"leakage: {leakage_name} (lower is better; bars: 95 % intervals)",
           ylabel="test accuracy (higher is better)", title="privacy-utility frontier")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def roc_png(report: Any) -> bytes:
    """A target report's log-log ROC figure as PNG (rendered once, for MLflow and for ``report.html``)."""
    fig = roc_figure(report.attacks, f"{report.target.name}: attacks on the target")
    try:
        return figure_png(fig)
    finally:
        close(fig)


def html_report(title: str, run_id: str, reports: list, rows: list[dict], leakage_name: str,
                figures: dict[str, Any], rocs: dict[str, bytes], champion: Any = None,
                vulnerable: dict[str, bytes] | None = None) -> str:
    """A self-contained HTML page (figures inlined as base64 PNG): configurations, frontier, champion, each
    configuration's ROC curves (``rocs``: PNG by configuration name, from :func:`roc_png`) and, with privacy
    findings, the ε bounds and the most vulnerable samples (``vulnerable``: PNG by configuration name)."""
    by_name = {r.target.name: r for r in reports}
    body = [f"<h1>raymia audit: {html.escape(title)}</h1>",
            f"<p>MLflow parent run <code>{run_id}</code>. Leakage = {html.escape(leakage_name)}. AUC and TPR are "
            "threshold-free / oracle sweeps over the audited members and non-members.</p>"]
    if champion is not None:
        body.append(f"<p><b>Champion: {html.escape(champion[0].name)}</b> — {html.escape(champion[1])}.</p>")
    head = ["configuration", "defense", "test acc", "gap", "best attack", "AUC [95% CI]", "TPR@0.1%FPR [95% CI]",
            "leakage [95% CI]", "front"]
    trs, notes = [], []
    for row in sorted(rows, key=lambda r: r["leakage"]):
        r = by_name[row["configuration"]]
        b = r.best_attack()
        tpr = b.metrics.at_fpr["0.1pct"]
        if not tpr.resolvable and not notes:
            notes.append(f"<p>{html.escape(unresolved_note(tpr))}</p>")
        cells = [row["configuration"] + (" ★" if row["champion"] else ""), row["defense"], f"{r.test_acc:.4f}",
                 f"{r.gap:+.4f}", b.name, with_ci(b.metrics.auc, b.metrics.auc_ci), tpr_cell(tpr),
                 with_ci(row["leakage"], row["leakage_ci95"]), "✓" if row["on_front"] else ""]
        trs.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    body.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(trs) + "</table>")
    body += notes
    body += [f"<h2>Privacy-utility frontier</h2>{_img(fig, keep=True)}" for fig in figures.values()]
    body.append("<h2>Attacks per configuration (log-log ROC)</h2>")
    body += [f'<img src="data:image/png;base64,{base64.b64encode(rocs[r.target.name]).decode()}">' for r in reports]
    if any(r.privacy is not None for r in reports):
        body.append("<h2>Does the guarantee hold? ε lower bounds and the most vulnerable samples</h2>")
        body.append(_table(PRIVACY_HEAD, [privacy_cells(r) for r in reports if r.privacy is not None]))
        body.append(f"<p>{html.escape(PRIVACY_NOTE)}</p>")
        body += [f"<p>{html.escape(w)}</p>" for r in reports if r.privacy is not None for w in r.privacy.warnings()]
        for name, png in (vulnerable or {}).items():
            body.append(f"<h3>{html.escape(name)}: the most vulnerable samples</h3>"
                        f'<img alt="most vulnerable samples of {html.escape(name)}" '
                        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    return _page(title, body, "max-width:720px;display:block;margin:1em 0")


def _table(head: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            + "</table>")


PRIVACY_HEAD = ["configuration", "claimed ε", "ε estimate (attack, counts)", "one-run ε lower bound (m, v/r, β)",
                "TPR@1%FPR: all [95% CI]", "most vulnerable [95% CI]", "canaries [95% CI]"]
PRIVACY_NOTE = ("The ε estimate treats the audited samples of one model as independent trials, which they are not: "
                "it is an estimate, not a certificate. The one-run bound is certified (Steinke et al. 2023) at "
                "confidence 1 − β. Vulnerability: leave-one-out LiRA, samples ranked on one half of the reference "
                "models and measured on the other half.")


def privacy_cells(report: Any) -> list[str]:
    """One configuration's row of the privacy table (see :data:`PRIVACY_HEAD`)."""
    p = report.privacy
    best = p.strongest_estimate()
    est = "–" if best is None else (f"{best[1].eps:.2f} ({best[0]}, {best[1].tp}/{best[1].tp + best[1].fn} TP, "
                                    f"{best[1].fp}/{best[1].fp + best[1].tn} FP)")
    o = p.one_run
    one = "–" if o is None else f"{o.eps:.2f} (m={o.m}, {o.v}/{o.r}, β={o.beta:g})"
    cells = [report.target.name, "–" if p.claimed_eps is None else f"{p.claimed_eps:.2f}", est, one]
    for subset in ("all", "top", "canary"):
        m = p.vulnerable.metrics(subset) if p.vulnerable is not None else None
        cells.append("–" if m is None else tpr_cell(m.at_fpr["1pct"]))
    return cells


def vulnerable_figure(images: np.ndarray, labels: np.ndarray, preds: np.ndarray, scores: np.ndarray,
                      title: str) -> Any:
    """Up to 24 images ``[n, C, H, W]`` in [0, 1] (most vulnerable first) captioned with label, the target's
    prediction and the vulnerability score."""
    n = min(len(images), 24)
    cols = min(n, 8)
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3 + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            _show(ax, images[i])
            ax.set_title(f"y={labels[i]} ŷ={preds[i]}\ns={scores[i]:.1f}", fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


#: The mark after a TPR that cannot be resolved at its FPR level with the non-members audited.
UNRESOLVED = "†"


def with_ci(value: float, ci: tuple[float, float], digits: int = 3) -> str:
    """``0.650 [0.614, 0.685]``."""
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def tpr_cell(r: Any, digits: int = 3) -> str:
    """A :class:`~raymia.metrics.TprAtFpr` with its interval, marked :data:`UNRESOLVED` when it is really the TPR
    at zero false positives."""
    text = with_ci(r.tpr, r.ci, digits)
    return text.replace(" [", f"{UNRESOLVED} [", 1) if not r.resolvable else text


def unresolved_note(r: Any) -> str:
    """The footnote for :data:`UNRESOLVED`, in words, with the counts."""
    return (f"{UNRESOLVED} {r.n_nonmembers:,} non-members are fewer than 1/{100 * r.level:g}% = {round(1 / r.level):,}: "
            f"the smallest non-zero FPR is {100 / r.n_nonmembers:.2f}%, so this is the TPR at {r.fp} false "
            f"positives ({r.tp} of {r.n_members:,} members), not at {100 * r.level:g}% FPR.")


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table with one row per target configuration (plus its frontier leakage when known): AUC and
    TPR@0.1%FPR of the strongest attack with 95 % intervals."""
    headers = ["target", "test acc", "gap", "best attack", "AUC [95% CI]", "TPR@0.1%FPR [95% CI]"]
    cells = [[r["target"], f"{r['test_acc']:.3f}", f"{r['gap']:+.3f}", r["best_attack"], with_ci(r["auc"], r["auc_ci"]),
              tpr_cell(r["tpr"])] for r in rows]
    if all("seeds" in r for r in rows):
        headers.append("best AUC over seeds")
        for cell, r in zip(cells, rows):
            mean, sd, n = r["seeds"]
            cell.append(f"{mean:.3f} ± {sd:.3f} (n={n})")
    if all("leakage" in r for r in rows):
        headers.append("leakage")
        for cell, r in zip(cells, rows):
            cell.append(f"{r['leakage']:.3f}" + ("*" if r.get("on_front") else ""))
    notes = [unresolved_note(r["tpr"]) for r in rows[:1] if not r["tpr"].resolvable]
    return "\n".join([fixed_width(headers, cells), *notes])


def fixed_width(headers: list[str], cells: list[list[str]]) -> str:
    """A plain-text table: the header, a rule, one line per row, columns padded to their widest cell."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def privacy_summary(reports: list) -> str:
    """The privacy table for the terminal, then a WARNING line for every bound above the accountant's ε."""
    found = [r for r in reports if r.privacy is not None]
    if not found:
        return ""
    warnings = [f"WARNING: {r.target.name}: {w}" for r in found for w in r.privacy.warnings()]
    return "\n".join([fixed_width(PRIVACY_HEAD, [privacy_cells(r) for r in found]), *warnings])


def sample_grid(images: Any, title: str) -> Any:
    """Up to 64 images ``[n, C, H, W]`` (a tensor or array in [0, 1]) as one figure."""
    images = np.asarray(images)
    n = min(len(images), 64)
    side = math.ceil(math.sqrt(n))
    fig, axes = plt.subplots(side, side, figsize=(side * 0.6, side * 0.6 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            _show(ax, images[i])
    fig.suptitle(title, fontsize=8)
    return fig


def _show(ax: Any, image: np.ndarray) -> None:
    """One image ``[C, H, W]`` in [0, 1] on ``ax`` (grey when single-channel)."""
    img = image.transpose(1, 2, 0)
    grey = img.shape[-1] == 1
    ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, vmin=0, vmax=1)


def _img(fig: Any, *, keep: bool = False) -> str:
    """A figure as an inline ``<img>`` (base64 PNG); the figure is closed unless ``keep``."""
    data = base64.b64encode(figure_png(fig)).decode()
    if not keep:
        close(fig)
    return f'<img src="data:image/png;base64,{data}">'


def _page(title: str, body: list[str], img_css: str) -> str:
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             f"padding:4px 8px;font-size:13px}}img{{{img_css}}}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>raymia: {html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def diffusion_html(title: str, run_id: str, reports: list, real_fid: float) -> str:
    """The diffusion track's self-contained page: a table per system, ROC curves and sample grids."""
    attacks = list(reports[0].attacks)
    head = ["system", *[f"{a} AUC (best-of-grid)" for a in attacks], "TPR@1%FPR (strongest)", reports[0].fid_name]
    rows = []
    for r in reports:
        grid = r.best_of_grid()
        cells = [r.name, *[f"{r.attacks[a].metrics.auc:.3f} ({grid[a][1]:.3f} at t={grid[a][0]})" if a in grid
                           else f"{r.attacks[a].metrics.auc:.3f}" for a in attacks],
                 f"{r.strongest().metrics.tpr_at_fpr['1pct']:.3f}", f"{r.fid:.3f}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    body = [f"<h1>raymia diffusion audit: {html.escape(title)}</h1>",
            f"<p>MLflow parent run <code>{run_id}</code>. White-box attacks on members vs non-members; AUC at each "
            "attack's configured timestep, in brackets the best over the t-grid (an oracle). "
            f"{html.escape(reports[0].fid_name)} against held-out real images; real unseen images score "
            f"{real_fid:.3f}.</p>",
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"]
    for r in reports:
        body.append(f"<h2>{html.escape(r.name)}</h2>")
        body.append(_img(roc_figure(r.attacks, f"{r.name}: white-box attacks")))
        body.append(_img(sample_grid(r.samples, f"{r.name}: samples")))
    return _page(title, body, "max-width:560px;display:inline-block;margin:0.5em")
