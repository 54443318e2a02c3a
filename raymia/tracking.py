"""Everything raymia writes to MLflow: where results go, the run hierarchy, metric names and artifact paths.

One parent run per audit; one child run per target configuration (tag ``mlflow.parentRunId``), so the MLflow
UI compares target configurations side by side. The artifact paths below are the contract every reader
(``raymia rescore``, :mod:`raymia.registry`, the tests) relies on. Metric names are documented in
``docs/audit-and-metrics.md``:

- utility: ``train_acc``, ``test_acc``, ``gap`` (train - test), ``reference_test_acc``, ``ece``;
- per attack A: ``mia.A.auc``, ``mia.A.bal_acc_oracle``, ``mia.A.bal_acc_shadow`` (attacks with a shadow
  threshold), ``mia.A.tpr_at_1pct_fpr``, ``mia.A.tpr_at_0.1pct_fpr``, ``mia.A.tpr_at_0.01pct_fpr``,
  ``mia.A.tpr_at_0pct_fpr``;
- ``mia.best.auc`` / ``mia.best.tpr_at_0.1pct_fpr`` (attack with the highest AUC, named in tag ``mia.best_attack``);
- ``mia.n_members``, ``mia.n_nonmembers``; ``loo.A.*`` with leave-one-out targets; ``defense.*``;
  ``diffence.interval_low|high`` on ``+diffence`` runs;
- parent: ``time.<phase>_s``, ``models.trained``, ``models.reused``, ``cluster.nodes_used``.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

import raymia
from raymia.config import RunConfig, TrackingConfig
from raymia.errors import UserError
from raymia.models.checkpoints import file_digest
from raymia.pipeline.dp_audit import overlap_at_k
from raymia.report import close, roc_figure, roc_png, sample_grid, score_histograms

# ------------------------------------------------------------------------------------------ artifact paths
CONFIG_FILE = "config.yaml"                    # parent: the validated config
SPLIT_FILE = "split/split.parquet"             # parent: the split plan (index, role)
REPORT_FILE = "report.html"                    # parent: the self-contained report
FRONTIER_FILE = "frontier.json"                # parent: one row per configuration
FRONTIER_PLOT = "plots/frontier.png"           # parent
DIFFUSION_MODEL_DIR = "diffusion_model"        # parent: DIFFENCE's UNet (save_pretrained, safetensors)
ROC_PLOT = "plots/roc_loglog.png"              # child
HISTOGRAM_PLOT = "plots/score_histograms.png"  # child
SCORES_FILE = "scores/per_sample.parquet"      # child: one row per audited sample, one column per attack
SIGNALS_FILE = "signals/pool.parquet"          # child: every model's outputs and the keep-mask
PROTOCOL_FILE = "protocol.json"                # child: where each number's threshold comes from
TARGET_FILE = "target.json"                    # child: the target configuration
MODEL_DIR = "model"                            # child: its MLflow model's name (format: raymia.registry)
PRIVACY_FILE = "privacy/findings.json"         # child: ε bounds with their counts, thresholds and δ
VULNERABLE_FILE = "privacy/per_sample.parquet"  # child: per-sample vulnerability, rank, canary coins and guesses
VULNERABLE_PLOT = "plots/vulnerable.png"       # child: the most vulnerable images
SYSTEM_ROC_PLOT = "plots/roc.png"              # diffusion-track child
SAMPLES_PLOT = "plots/samples.png"             # diffusion-track child
GRID_FILE = "grid.json"                        # diffusion-track child: AUC per timestep

#: The file MLflow runs to load a raymia model (models from code), and the MLmodel metadata key naming the format.
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_FORMAT_KEY = "raymia_format"

#: Tells the MLflow UI that an experiment is model training (it opens on the runs table, not GenAI traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

#: A saved view written to every experiment (MLflow's shared view state: an experiment tag that the UI opens with
#: ``…/runs?viewStateShareKey=raymia``). Table: the model and the headline metrics as columns, children grouped
#: under their audit (sorting by a metric would flatten the groups). Charts: a "Privacy vs utility" section first
#: (the frontier scatter and one bar chart per headline metric); MLflow's one chart per other metric goes to the
#: "Model metrics" section below it, collapsed.
RUNS_VIEW_KEY = "raymia"
HEADLINE_METRICS = ("test_acc", "mia.best.auc", "mia.best.tpr_at_0.1pct_fpr")
HEADLINE_SECTION = "Privacy vs utility"


def _chart(kind: str, key: str, **fields: object) -> dict[str, object]:
    """One card of MLflow's chart view (its ``compareRunCharts`` entries), in the headline section."""
    return {"type": kind, "uuid": f"raymia-{key}", "metricSectionId": "raymia-headline", "isGenerated": False,
            "deleted": False, "runsCountToCompare": 100, **fields}


def _section(uuid: str, name: str, expanded: bool) -> dict[str, object]:
    return {"uuid": uuid, "name": name, "display": expanded, "isReordered": False, "deleted": False,
            "isGenerated": False}


RUNS_VIEW = {f"mlflow.sharedViewState.{RUNS_VIEW_KEY}": json.dumps({
    "selectedColumns": ["attributes.`Models`", *(f"metrics.`{m}`" for m in HEADLINE_METRICS)],
    "runsHiddenMode": "SHOW_ALL",  # charts plot every run (MLflow's default: the first 10)
    "compareRunCharts": [
        _chart("SCATTER", "frontier", xaxis={"key": "test_acc", "type": "METRIC"},  # the privacy-utility plane
               yaxis={"key": "mia.best.auc", "type": "METRIC"}),
        *(_chart("BAR", m, metricKey=m, displayName=m) for m in HEADLINE_METRICS)],
    # the two sections MLflow files generated charts under must be listed, or their charts are dropped
    "compareRunSections": [_section("raymia-headline", HEADLINE_SECTION, True),
                           _section("raymia-model-metrics", "Model metrics", False),
                           _section("raymia-system-metrics", "System metrics", False)]})}
EXPERIMENT_TAGS = {**EXPERIMENT_KIND, **RUNS_VIEW}  # written on creation, and added to older experiments

#: Split roles logged as each target run's MLflow dataset inputs, with their ``mlflow.data.context``.
DATASET_CONTEXTS = {"target_members": "members", "target_nonmembers": "non-members", "population": "population"}
DIGEST_CHARS = 32  # MLflow stores dataset digests of at most 36 characters: the split hash's first 128 bits

#: Metric names of the DIFFENCE interval a ``+diffence`` child run records (read back by the registry).
INTERVAL_METRICS = ("diffence.interval_low", "diffence.interval_high")

#: Where each reported number's decision threshold comes from (logged as tags and ``protocol.json``).
THRESHOLD_SOURCES = {
    "auc": "threshold-free (ROC over the audited members and non-members)",
    "tpr_at_fpr": "oracle: threshold swept over the audited scores (standard LiRA-style reporting)",
    "bal_acc_oracle": "oracle: best threshold chosen on the audited scores",
    "bal_acc_shadow": "shadow: thresholds fitted on reference models only (class-dependent for metric and "
                      "label-only attacks, the attack network's own decision for nn; none for LiRA/RMIA)",
}

#: The diffusion track's protocol: how each reported number's timestep and threshold were chosen.
DIFFUSION_PROTOCOL = {
    "mia.<attack>.*": "each attack at its configured timestep (attacks.loss_t / secmi_t / pia_t), fixed before "
                      "seeing any score: the number to report; for dualmd the white-box attacker holding both "
                      "teachers (per sample, the better of their two scores)",
    "sampler_even.* / sampler_odd.*": "dualmd: the deployed sampler's epsilon-function (theta2 at even t, theta1 "
                                      "at odd t) at the even / odd one of t and t + 1",
    "theta<i>_own.* / theta<i>_other.*": "dualmd: one teacher on its own half / the other half of the members, "
                                         "against all non-members",
    "mia.<attack>.best_of_grid.*": "the best AUC over attacks.t_grid, chosen on the audited scores: an oracle, "
                                   "an upper bound (as PIA's published numbers)",
    "asr": "best balanced accuracy over thresholds swept on the audited scores (oracle)",
    "tpr_at_fpr": "threshold swept over the audited scores",
}


def resolve_tracking_uri(cfg: TrackingConfig, *, cwd: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the config's ``uri``, else ``sqlite:///<cwd>/mlflow.db``.

    A relative SQLite path is made absolute (Ray trials and jobs change the working directory), and the
    file store MLflow 3 refuses (``./mlruns``, ``file:``) is rejected with the fix.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    cwd = cwd or Path.cwd()
    if not uri:
        return f"sqlite:///{(cwd / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(cwd / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri or uri.startswith("file:"):
        raise UserError(f"'{uri}' is a file store, which MLflow 3 refuses; use sqlite:////abs/path/mlflow.db "
                        "or an http:// tracking server", field="tracking.uri")
    return uri


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For SQLite stores keep artifacts next to the database, whatever the working directory."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).as_uri()
    return None


def flat_params(prefix: str, value: Any) -> dict[str, str]:
    """``("p", {"a": {"b": 1}})`` -> ``{"p.a.b": "1"}``: nested config sections as MLflow params."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flat_params(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: json.dumps(value) if isinstance(value, (list, tuple)) else str(value)}


def target_params(cfg: Any, report: Any, plan_params: dict[str, Any]) -> dict[str, Any]:
    """A target child run's params: the plan's facts, the architecture, recipe, defenses and attack knobs."""
    t = report.target
    source = ({"source": "endpoint", "source.endpoint": t.endpoint.url} if t.endpoint is not None else
              {"source": "model_uri", "source.model_uri": t.model_uri} if t.model_uri is not None else
              {"source": "weights", "source.weights": str(t.weights)} if t.weights is not None else
              {"source": "trained by raymia"})
    if t.weights is not None:
        source["source.weights_sha256"] = file_digest(t.weights)
    if cfg.split.members is not None:
        source["split.members"] = str(cfg.split.members)
    return {
        **plan_params, **source, "arch": t.model.arch, "defense": t.defense.name,
        "inference_defense": (report.inference or {}).get("name", "none"),
        **flat_params("inference", {k: v for k, v in (report.inference or {}).items() if k != "name"}),
        **flat_params("defense", t.defense.model_dump(exclude={"name"})),
        "reference.count": cfg.reference.count, "reference.pkeep": cfg.reference.pkeep,
        "attacks.enabled": ",".join(cfg.attacks.enabled), "attacks.queries": ",".join(cfg.attacks.queries),
        "attacks.loo_targets": cfg.attacks.loo_targets,
        "attacker": "adaptive: reference models trained with the target's exact recipe",
        **flat_params("model.params", t.model.params), **flat_params("train", t.train.model_dump()),
        **flat_params("attacks", cfg.attacks.knobs().model_dump()),
    }


def attack_metric_values(prefix: str, metrics: Any, levels: tuple[str, ...] | None = None) -> dict[str, float]:
    """One attack's documented metrics under ``prefix`` (e.g. ``mia.loss.``): ``auc`` with ``auc.ci_low`` /
    ``auc.ci_high`` (DeLong, 95 %), and per FPR level L ``tpr_at_L_fpr`` with ``.ci_low`` / ``.ci_high``
    (Clopper–Pearson, 95 %), ``.threshold`` (when finite), ``.fpr`` (realised), ``.tp``, ``.fp`` and
    ``.resolvable`` (1 when there are at least 1/L non-members, else the number is the TPR at zero FP)."""
    m = {f"{prefix}auc": metrics.auc, f"{prefix}auc.ci_low": metrics.auc_ci[0],
         f"{prefix}auc.ci_high": metrics.auc_ci[1]}
    for level, r in metrics.at_fpr.items():
        if levels is not None and level not in levels:
            continue
        k = f"{prefix}tpr_at_{level}_fpr"
        m.update({k: r.tpr, f"{k}.ci_low": r.ci[0], f"{k}.ci_high": r.ci[1], f"{k}.fpr": r.fpr, f"{k}.tp": r.tp,
                  f"{k}.fp": r.fp, f"{k}.resolvable": float(r.resolvable)})
        if math.isfinite(r.threshold):
            m[f"{k}.threshold"] = r.threshold
    return m


def attack_protocol(metrics: Any) -> dict[str, Any]:
    """One attack's numbers with what they rest on, for ``protocol.json``."""
    return {
        "auc": {"value": metrics.auc, "ci95": list(metrics.auc_ci), "interval": "DeLong",
                "n_members": metrics.n_members, "n_nonmembers": metrics.n_nonmembers},
        "tpr_at_fpr": {level: {"level": r.level, "tpr": r.tpr, "ci95": list(r.ci), "interval": "Clopper-Pearson",
                               "threshold": r.threshold if math.isfinite(r.threshold) else None,
                               "decision": "member iff score >= threshold", "realised_fpr": r.fpr, "tp": r.tp,
                               "n_members": r.n_members, "fp": r.fp, "n_nonmembers": r.n_nonmembers,
                               "resolvable": r.resolvable, "threshold_source": THRESHOLD_SOURCES["tpr_at_fpr"]}
                       for level, r in metrics.at_fpr.items()},
    }


def target_protocol(report: Any) -> dict[str, Any]:
    """``protocol.json`` of a target child run: threshold sources, and every attack's numbers with their counts,
    thresholds and intervals."""
    return {"threshold_sources": THRESHOLD_SOURCES, "confidence": 0.95,
            "attacks": {name: {**attack_protocol(a.metrics), "tuned_on_reference_models": a.chosen}
                        for name, a in report.attacks.items()}}


def target_metrics(report: Any) -> dict[str, float]:
    """The documented metric names for one :class:`~raymia.pipeline.evaluate.TargetReport`."""
    m = {"train_acc": report.train_acc, "test_acc": report.test_acc, "gap": report.gap,
         "reference_test_acc": report.reference_test_acc}
    for name, a in report.attacks.items():
        p = f"mia.{name}."
        m.update(attack_metric_values(p, a.metrics))
        m[p + "bal_acc_oracle"] = a.metrics.best_bal_acc
        if a.bal_acc_shadow is not None:
            m[p + "bal_acc_shadow"] = a.bal_acc_shadow
        m.update({p + knob: v for knob, v in a.chosen.items()})  # knobs tuned on reference models, e.g. RMIA's a
    best = report.best_attack()
    m.update(attack_metric_values("mia.best.", best.metrics, ("0.1pct",)))
    m["mia.n_members"] = float(best.metrics.n_members)
    m["mia.n_nonmembers"] = float(best.metrics.n_nonmembers)
    m.update(report.extra)
    if report.privacy is not None:
        m.update(privacy_metrics(report.privacy))
    if report.interval is not None:
        m.update(dict(zip(INTERVAL_METRICS, report.interval)))
    return {k: float(v) for k, v in m.items()}


def privacy_metrics(p: Any) -> dict[str, float]:
    """The documented ``dp.*`` / ``vuln.*`` metric names of one target's
    :class:`~raymia.pipeline.dp_audit.PrivacyFindings`."""
    m: dict[str, float] = {"dp.delta": p.delta}
    if p.claimed_eps is not None:
        m["dp.claimed_eps"] = p.claimed_eps
    for name, e in p.estimates.items():
        k = f"dp.{name}.eps_estimate"
        m.update({k: e.eps, f"{k}.tp": e.tp, f"{k}.fp": e.fp, f"{k}.fn": e.fn, f"{k}.tn": e.tn, f"{k}.alpha": e.alpha_used})
        if math.isfinite(e.threshold):
            m[f"{k}.threshold"] = e.threshold
    if (best := p.strongest_estimate()) is not None:
        m["dp.eps_estimate"] = best[1].eps
    if (o := p.one_run) is not None:
        m.update({"dp.eps_lower_bound": o.eps, "dp.one_run.canaries": o.m, "dp.one_run.guesses": o.r,
                  "dp.one_run.correct": o.v, "dp.one_run.beta": o.beta, "dp.one_run.k_searched": o.searched})
    if (v := p.vulnerable) is not None:
        m["vuln.top_k"] = len(v.top)
        for subset in ("all", "top", "canary"):
            if (sm := v.metrics(subset)) is not None:
                m.update(attack_metric_values(f"vuln.{subset}.", sm, ("1pct", "0.1pct")))
    m["dp.claim_violated"] = float(bool(p.warnings()))
    return m


def privacy_files(report: Any) -> dict[str, bytes]:
    """``privacy/findings.json`` and ``privacy/per_sample.parquet`` of one target (empty without findings)."""
    p = report.privacy
    if p is None:
        return {}
    meta: dict[str, Any] = {"delta": p.delta, "claimed_eps": p.claimed_eps, "warnings": p.warnings(),
                            "estimates": {n: {**e.__dict__, "decision": "member iff score >= threshold",
                                              "kind": "estimate (samples of one model are not independent)"}
                                          for n, e in p.estimates.items()}}
    if (o := p.one_run) is not None:
        meta["one_run"] = {"eps_lower_bound": o.eps, "canaries": o.m, "guesses": o.r, "correct": o.v,
                           "delta": o.delta, "beta": o.beta, "k_searched": o.searched, "attack": o.attack,
                           "kind": "certified (Steinke et al. 2023); beta already divided by k_searched"}
    files = {PRIVACY_FILE: json.dumps(meta, indent=2).encode()}
    if (v := p.vulnerable) is not None:
        rank = np.empty(len(v.score), np.int64)
        rank[np.argsort(-v.score, kind="stable")] = np.arange(len(v.score))
        frame = pd.DataFrame({"index": v.rows, "vulnerability": v.score, "rank": rank,
                              "most_vulnerable": np.isin(np.arange(len(v.score)), v.top)})
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        files[VULNERABLE_FILE] = buf.getvalue()
    return files


def system_metrics(report: Any) -> dict[str, float]:
    """The documented metric names of one diffusion-track system's child run."""
    def of(prefix: str, attacks: dict) -> dict[str, float]:
        m = {}
        for name, a in attacks.items():
            m.update(attack_metric_values(f"{prefix}{name}.", a.metrics, ("1pct", "0.1pct")))
            m[f"{prefix}{name}.asr"] = a.metrics.best_bal_acc
        return m

    m = of("mia.", report.attacks)
    for name, (t, auc) in report.best_of_grid().items():
        m[f"mia.{name}.best_of_grid.auc"], m[f"mia.{name}.best_of_grid.t"] = auc, float(t)
        m.update({f"mia.{name}.grid.t{t}.auc": v for t, v in report.grid[name].items()})
    best = report.strongest()
    m.update(attack_metric_values("mia.best.", best.metrics, ("1pct",)))
    for part, attacks in report.parts.items():
        m.update(of(f"{part}.mia.", attacks))
    m[report.fid_name] = report.fid
    m["mia.n_members"], m["mia.n_nonmembers"] = (best.metrics.n_members, best.metrics.n_nonmembers)
    return m


#: Metrics summarised across seeds (``seeds:``): utility, and per attack its AUC and TPR at 1 % and 0.1 % FPR.
SPREAD_SUFFIXES = (".auc", ".tpr_at_1pct_fpr", ".tpr_at_0.1pct_fpr")


def seed_spread(reports: list[Any]) -> dict[str, tuple[float, float, int]]:
    """``{metric: (mean, sd, n)}`` over one configuration's reports under several seeds (sd with ddof 1)."""
    per_seed = [target_metrics(r) for r in reports]
    keys = [k for k in per_seed[0] if k in ("test_acc", "gap", "dp.eps_estimate", "dp.eps_lower_bound")
            or (k.startswith(("mia.", "vuln.")) and k.endswith(SPREAD_SUFFIXES))]
    out = {}
    for k in keys:
        v = np.array([m[k] for m in per_seed if k in m], dtype=np.float64)
        out[k] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))
    return out


@contextmanager
def mlflow_store(uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API and registry at ``uri`` for the block (``None``: leave them), then restore them.

    The fluent calls that exist only in that form (``mlflow.pyfunc.log_model`` / ``load_model``,
    ``mlflow.register_model``) thus use the audit's store, never a global default."""
    if uri is None:
        yield
        return
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")},
             fluent._active_experiment_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    fluent._active_experiment_id = None  # a caller's mlflow.set_experiment() must not redirect the audit's runs
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
        fluent._active_experiment_id = saved[3]
        for k, v in saved[2].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def split_datasets(dataset: str, split_hash: str, sizes: dict[str, int], input_shape: tuple[int, ...],
                   source_uri: str) -> list[DatasetInput]:
    """The MLflow dataset inputs of a target run: one per role of :data:`DATASET_CONTEXTS`, named
    ``<dataset>.<role>``, digest = the split hash (its first :data:`DIGEST_CHARS` characters), source = the
    parent's split file, context ``members`` / ``non-members`` / ``population``."""
    from mlflow.types import Schema, TensorSpec

    schema = json.dumps({"mlflow_tensorspec": {
        "features": Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), "x")]).to_json(),
        "targets": Schema([TensorSpec(np.dtype(np.int64), (-1,), "y")]).to_json()}})
    scheme = source_uri.split(":", 1)[0] if "://" in source_uri else "local"
    out = []
    for role, context in DATASET_CONTEXTS.items():
        ds = Dataset(name=f"{dataset}.{role}", digest=split_hash[:DIGEST_CHARS],
                     source_type="local" if scheme == "file" else scheme,
                     source=json.dumps({"uri": source_uri, "role": role}), schema=schema,
                     profile=json.dumps({"num_rows": sizes.get(role, 0), "split_hash": split_hash}))
        out.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
    return out


def audit_note(name: str, dataset: str, sizes: dict[str, int], references: int, attacks: list[str],
               rows: list[dict[str, Any]], champion: str | None) -> str:
    """The parent run's description: what was audited, how to read its child runs, the results in one table."""
    lines = [f"**raymia audit `{name}`** on `{dataset}`: {sizes.get('target_members', 0)} members, "
             f"{sizes.get('target_nonmembers', 0)} non-members, {sizes.get('population', 0)} population samples; "
             f"each configuration is attacked by {len(attacks)} membership-inference attacks with {references} "
             "reference models trained with its exact recipe.",
             "",
             "Each child run is one configuration (`+diffence`: the same classifier deployed behind DIFFENCE) with "
             "its MLflow model (Models column), its dataset inputs (members / non-members / population, digest = "
             "split hash) and every metric. Read **test_acc** and **gap** (train - test) as utility, "
             "**mia.best.auc** (0.5 = chance) and **mia.best.tpr_at_0.1pct_fpr** (members found while accusing "
             "0.1 % of non-members) as leakage; `plots/roc_loglog.png` shows every attack's ROC. This run's "
             "`report.html` has the frontier and the protocol behind each number."]
    if rows:
        lines += ["", "| configuration | test acc | leakage | on front |", "|---|---|---|---|"]
        lines += [f"| {r['configuration']} | {r['test_acc']:.3f} | {r['leakage']:.3f} | {'yes' if r['on_front'] else ''} |"
                  for r in rows]
    if champion:
        lines += ["", f"Champion: {champion}"]
    return "\n".join(lines)


class AuditRun:
    """The parent MLflow run of one audit, with helpers that log its children and artifacts."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str, tracking_uri: str):
        self.client, self.experiment_id, self.run_id = client, experiment_id, run_id
        self.tracking_uri = tracking_uri

    def artifact_uri(self, path: str) -> str:
        """The full URI of one of the parent's artifacts (e.g. :data:`SPLIT_FILE`)."""
        return f"{self.client.get_run(self.run_id).info.artifact_uri.rstrip('/')}/{path}"

    def _log(self, run_id: str, *, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
             tags: dict[str, str] | None = None, model_id: str | None = None) -> None:
        metrics_ = [Metric(k, float(v), 0, 0, model_id=model_id) for k, v in (metrics or {}).items()]
        params_ = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        tags_ = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        # MLflow takes at most 1000 metrics, 100 params and 100 tags per batch
        for i in range(0, len(metrics_), 1000):
            self.client.log_batch(run_id, metrics=metrics_[i:i + 1000])
        for i in range(0, max(len(params_), len(tags_)), 100):
            self.client.log_batch(run_id, params=params_[i:i + 100], tags=tags_[i:i + 100])

    def log_params(self, params: dict[str, Any]) -> None:
        self._log(self.run_id, params=params)

    def log_metrics(self, metrics: dict[str, float], run_id: str | None = None) -> None:
        """Log metrics to the parent (default) or another run."""
        self._log(run_id or self.run_id, metrics=metrics)

    def log_files(self, files: dict[str, bytes | Path], run_id: str | None = None) -> None:
        """Log ``{artifact path: bytes or local file}`` to the parent (default) or another run."""
        with tempfile.TemporaryDirectory() as d:
            for rel, content in files.items():
                local = Path(d) / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
                folder = Path(rel).parent.as_posix()
                self.client.log_artifact(run_id or self.run_id, str(local), None if folder == "." else folder)

    def log_figures(self, figures: dict[str, Any], run_id: str | None = None) -> None:
        """Log matplotlib figures ``{artifact path: figure}`` (then close them)."""
        for path, fig in figures.items():
            self.client.log_figure(run_id or self.run_id, fig, path)
            close(fig)

    @contextmanager
    def child(self, name: str, *, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[str]:
        """A child run (``mlflow.parentRunId`` = this audit) that ends FINISHED, or FAILED if the block raises."""
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.run_id, **(tags or {})})
        child_id = run.info.run_id
        try:
            self._log(child_id, params=params)
            yield child_id
        except BaseException:
            self.client.set_terminated(child_id, "FAILED")
            raise
        self.client.set_terminated(child_id, "FINISHED")

    def log_target(self, report: Any, *, params: dict[str, Any], model: Any | None,
                   datasets: list[DatasetInput] = (), roc: bytes | None = None,
                   vulnerable_png: bytes | None = None) -> str:
        """One child run per target configuration: its dataset inputs, its MLflow model (``model``: a
        :class:`raymia.registry.ModelPackage`, or ``None``), params, the documented metrics (linked to the model),
        figures (``roc``: the ROC PNG if already rendered; ``vulnerable_png``: the most vulnerable images),
        per-sample scores, the privacy findings and every model's outputs."""
        t = report.target
        best = report.best_attack()
        tags = {"mia.best_attack": best.name, **{f"threshold_source.{k}": v for k, v in THRESHOLD_SOURCES.items()}}
        scores = io.BytesIO()
        report.scores.to_parquet(scores, index=False)
        with self.child(t.name, params=params, tags={**tags, "raymia.kind": "target"}) as child_id:
            if datasets:
                self.client.log_inputs(child_id, datasets=list(datasets))
            model_id = self._log_model(child_id, model) if model is not None else None
            self._log(child_id, metrics=target_metrics(report), model_id=model_id)
            self.log_figures({HISTOGRAM_PLOT: score_histograms(report.attacks, f"{t.name}: member vs non-member")},
                             child_id)
            with tempfile.TemporaryDirectory() as d:
                self.log_files({ROC_PLOT: roc if roc is not None else roc_png(report), SCORES_FILE: scores.getvalue(),
                                SIGNALS_FILE: report.pool.to_parquet(Path(d) / "pool"),
                                PROTOCOL_FILE: json.dumps(target_protocol(report), indent=2).encode(),
                                TARGET_FILE: t.model_dump_json(indent=2).encode(), **privacy_files(report),
                                **({VULNERABLE_PLOT: vulnerable_png} if vulnerable_png else {})}, child_id)
        return child_id

    def _log_model(self, run_id: str, model: Any) -> str:
        """Log ``model`` (a :class:`raymia.registry.ModelPackage`) as the run's MLflow model :data:`MODEL_DIR`
        (models from code: :data:`PYFUNC_CODE` plus its artifact folder); tag the run with the model's id."""
        from raymia.pyfunc_model import ARTIFACT_KEY

        with tempfile.TemporaryDirectory() as d, mlflow_store(self.tracking_uri), \
                mlflow.start_run(run_id=run_id, nested=True):
            folder = Path(d) / ARTIFACT_KEY
            for rel, content in model.files.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(content)
            info = mlflow.pyfunc.log_model(name=MODEL_DIR, python_model=str(PYFUNC_CODE),
                                           artifacts={ARTIFACT_KEY: str(folder)}, signature=model.signature,
                                           input_example=model.input_example, pip_requirements=model.requirements,
                                           metadata=model.metadata)
        self.client.set_tag(run_id, "raymia.model_id", info.model_id)
        return info.model_id

    def log_repeats(self, child_id: str, reports: list[Any], seeds: list[int]) -> None:
        """A configuration audited under several seeds: ``<metric>.seeds_mean`` / ``.seeds_sd`` and ``seeds.n`` on
        its child run (whose own numbers are the first seed's), and one nested run per seed with its metrics."""
        spread = seed_spread(reports)
        tops = [r.privacy.vulnerable.rows[r.privacy.vulnerable.top] for r in reports
                if r.privacy is not None and r.privacy.vulnerable is not None]
        overlap = {"vuln.overlap_at_k": overlap_at_k(tops)} if len(tops) == len(reports) else {}
        self._log(child_id, metrics={**{f"{k}.seeds_mean": m for k, (m, _, _) in spread.items()},
                                     **{f"{k}.seeds_sd": sd for k, (_, sd, _) in spread.items()},
                                     "seeds.n": len(reports), **overlap}, params={"seeds": json.dumps(seeds)})
        name = reports[0].target.name
        for seed, report in zip(seeds, reports):
            run = self.client.create_run(self.experiment_id, run_name=f"{name} [seed {seed}]",
                                         tags={"mlflow.parentRunId": child_id, "raymia.kind": "seed",
                                               "raymia.seed": str(seed)})
            self._log(run.info.run_id, metrics=target_metrics(report), params={"seed": seed})
            self.client.set_terminated(run.info.run_id, "FINISHED")

    def log_system(self, report: Any, *, params: dict[str, Any]) -> str:
        """One child run per diffusion-track system: metrics, ROC and sample figures, the t-grid, the protocol."""
        tags = {"raymia.kind": "diffusion-system", "t_selection": DIFFUSION_PROTOCOL["mia.<attack>.*"]}
        with self.child(report.name, params=params, tags=tags) as child_id:
            self.log_metrics(system_metrics(report), child_id)
            self.log_figures({SYSTEM_ROC_PLOT: roc_figure(report.attacks, f"{report.name}: white-box attacks"),
                              SAMPLES_PLOT: sample_grid(report.samples, f"{report.name}: samples")}, child_id)
            protocol = {"protocol": DIFFUSION_PROTOCOL, "confidence": 0.95,
                        "attacks": {n: attack_protocol(a.metrics) for n, a in report.attacks.items()}}
            self.log_files({PROTOCOL_FILE: json.dumps(protocol, indent=2).encode(),
                            GRID_FILE: json.dumps(report.grid, indent=2).encode()}, child_id)
        return child_id

    def log_utility_child(self, result: Any) -> str:
        """A child run for a utility-only configuration: its defense settings and accuracies."""
        defense = result.target.defense
        params = {"defense": defense.name, **flat_params("defense", defense.model_dump(exclude={"name"}))}
        with self.child(result.target.name, params=params, tags={"raymia.kind": "utility"}) as child_id:
            self._log(child_id, metrics={"test_acc": result.test_acc, "val_acc": result.val_acc})
        return child_id

    def log_failed_child(self, name: str, error: str) -> None:
        """A FAILED child run for a configuration whose trial raised, with the error in tag ``raymia.error``."""
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.run_id, "raymia.kind": "target",
                                           "raymia.error": error[:5000]})
        self.client.set_terminated(run.info.run_id, "FAILED")

    def log_decision(self, *, html: str, rows: list[dict[str, Any]], figures: dict[str, Any]) -> None:
        """The parent's decision artifacts: ``report.html``, ``frontier.json`` and the frontier figure."""
        self.log_figures(figures)
        self.log_files({REPORT_FILE: html.encode(), FRONTIER_FILE: json.dumps(rows, indent=2).encode()})

    def register_champion(self, name: str, child_run_id: str) -> str:
        """Register the child run's MLflow model as a new version of ``name`` and point alias ``champion`` at
        it. Returns the version."""
        client = self.client
        model_id = client.get_run(child_run_id).data.tags.get("raymia.model_id")
        if model_id is None:
            raise UserError(f"child run {child_run_id} logged no model (its weights were not in the cache)")
        with mlflow_store(self.tracking_uri):
            version = mlflow.register_model(f"models:/{model_id}", name, tags={"raymia.audit_run": self.run_id})
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, description=(
                "raymia's champion: the configuration its audit chose on the privacy-utility frontier. An MLflow "
                "pyfunc from code (raymia.pyfunc_model) with safetensors weights: "
                f"mlflow.pyfunc.load_model('models:/{name}@champion').predict(images) -> label, p0..p<C-1>."))
        client.set_registered_model_alias(name, "champion", version.version)
        client.set_tag(self.run_id, "raymia.champion_run", child_run_id)
        client.set_tag(self.run_id, "raymia.champion_model", f"models:/{name}@champion")
        return version.version

    def describe(self, text: str) -> None:
        """The parent run's description (``mlflow.note.content``, Markdown), shown on its page in the UI."""
        self.client.set_tag(self.run_id, "mlflow.note.content", text)


@contextmanager
def audit_run(cfg: RunConfig, tracking_uri: str, *,
              tags: dict[str, str] | None = None) -> Iterator[AuditRun]:
    """Create the audit's parent run; it ends FINISHED, FAILED on an error, KILLED on Ctrl-C — never RUNNING."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name = cfg.tracking.experiment
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        name, artifact_location=_artifact_location(tracking_uri, name), tags=EXPERIMENT_TAGS)
    for key, value in EXPERIMENT_TAGS.items() if exp is not None else ():
        if key not in exp.tags or key in RUNS_VIEW and exp.tags[key] != value:  # an older raymia's view: ours
            client.set_experiment_tag(exp_id, key, value)
    run = client.create_run(exp_id, run_name=cfg.name, tags={"raymia.version": raymia.__version__,
                                                             "raymia.kind": "audit", **(tags or {})})
    audit = AuditRun(client, exp_id, run.info.run_id, tracking_uri)
    try:
        audit.log_files({CONFIG_FILE: yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode()})
        yield audit
    except KeyboardInterrupt:
        client.set_terminated(audit.run_id, "KILLED")
        raise
    except BaseException as exc:
        client.set_tag(audit.run_id, "raymia.error", f"{type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(audit.run_id, "FAILED")
        raise
    client.set_terminated(audit.run_id, "FINISHED")


class StoredAudit:
    """Read access to a finished audit's parent run: its config, its target child runs, their artifacts."""

    def __init__(self, client: MlflowClient, run: Any):
        self.client, self.run = client, run

    def config(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as d:
            return yaml.safe_load(Path(self.client.download_artifacts(self.run.info.run_id, CONFIG_FILE, d)).read_text())

    def children(self) -> list[Any]:
        runs = self.client.search_runs([self.run.info.experiment_id],
                                       f"tags.mlflow.parentRunId = '{self.run.info.run_id}' "
                                       "and tags.`raymia.kind` = 'target' and attributes.status = 'FINISHED'")
        return sorted(runs, key=lambda r: r.info.start_time)

    def download(self, run_id: str, path: str, dest: str) -> str:
        return self.client.download_artifacts(run_id, path, dest)


@contextmanager
def open_run(tracking_uri: str, run_id: str) -> Iterator[StoredAudit]:
    """Open a finished audit by parent run id; a wrong id is a :class:`UserError`."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException subclasses for unknown ids
        raise UserError(f"no run '{run_id}' in {tracking_uri} ({type(exc).__name__}); pass a parent run id "
                        "printed by 'raymia audit' and the same MLFLOW_TRACKING_URI / --tracking-uri") from None
    if run.data.tags.get("raymia.kind") != "audit":
        raise UserError(f"run '{run_id}' is not a raymia audit parent run")
    yield StoredAudit(client, run)


def ui_links(tracking_uri: str, base: str) -> list[str]:
    """``name: URL`` of each raymia experiment in the store, opening the MLflow UI on raymia's runs view."""
    client = MlflowClient(tracking_uri)
    return [f"{e.name}: {base}/#/experiments/{e.experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}"
            "&workflowType=machine_learning"
            for e in client.search_experiments() if any(k in e.tags for k in RUNS_VIEW)]
