"""Tiny audits through a real local Ray (Tune trials) into a real MLflow SQLite store."""


import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from raymia.attacks import ATTACK_NAMES
from raymia.audit import rescore_run, run_audit
from raymia.config import parse_config
from raymia.data.splits import SplitPlan
from raymia.pipeline.plan import plan_audit
from raymia.signals import PoolSignals

pytestmark = pytest.mark.ray
QUIET = {"echo": lambda line: None}


def _children(client, run_id):
    exp = client.get_run(run_id).info.experiment_id
    return {c.info.run_name: c for c in client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'")}


@pytest.fixture(scope="module")
def audited(ray_local, tmp_path_factory):
    """One tiny audit shared by the tests below (its MLflow store and cache live in a module temp dir)."""
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("audit")
    raw = tiny_config(tmp)
    raw["attacks"]["loo_targets"] = 2
    outcome = run_audit(parse_config(raw), **QUIET)
    return raw, outcome, tmp


def test_audit_logs_parent_children_metrics_and_artifacts(audited, tmp_path):
    raw, outcome, _ = audited
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    for phase in ("ray_start", "training", "attacks", "tracking"):
        assert parent.data.metrics[f"time.{phase}_s"] >= 0
    assert parent.data.metrics["models.trained"] == 2 * (1 + 4)

    plan = SplitPlan.from_parquet(client.download_artifacts(outcome.run_id, "split/split.parquet", str(tmp_path)))
    assert plan.content_hash() == parent.data.params["split_hash"]

    children = _children(client, outcome.run_id)
    assert sorted(children) == ["small", "wide"]
    for child in children.values():
        assert child.info.status == "FINISHED"
        m, p = child.data.metrics, child.data.params
        for name in ("train_acc", "test_acc", "gap", "reference_test_acc", "mia.best.auc",
                     "mia.best.tpr_at_0.1pct_fpr", "mia.n_members", "mia.n_nonmembers"):
            assert name in m, name
        for attack in ATTACK_NAMES:
            for suffix in ("auc", "bal_acc_oracle", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "tpr_at_0.01pct_fpr",
                           "tpr_at_0pct_fpr"):
                assert 0.0 <= m[f"mia.{attack}.{suffix}"] <= 1.0, (attack, suffix)
        assert "mia.loss.bal_acc_shadow" in m and "mia.lira_online.bal_acc_shadow" not in m
        assert 0 <= m["loo.lira_online.auc"] <= 1 and "loo.rmia_offline.tpr_at_0.1pct_fpr" in m
        assert m["gap"] == pytest.approx(m["train_acc"] - m["test_acc"])
        assert p["dataset"] == "digits" and p["arch"] == "mlp" and p["defense"] == "none"
        assert p["split_hash"] == parent.data.params["split_hash"] and "raymia_version" in p and "seed" in p
        assert p["attacks.rmia.gamma"] == "1.0" and p["attacks.lira.center"] == "mean"  # knobs are params
        assert child.data.tags["threshold_source.bal_acc_shadow"].startswith("shadow")

        paths = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert paths == {"plots/roc_loglog.png", "plots/score_histograms.png"}
        local = client.download_artifacts(child.info.run_id, "scores/per_sample.parquet", str(tmp_path / child.info.run_id))
        scores = pd.read_parquet(local)
        assert len(scores) == m["mia.n_members"] + m["mia.n_nonmembers"]
        assert set(ATTACK_NAMES) <= set(scores.columns) and scores["is_member"].sum() == m["mia.n_members"]
        assert np.array_equal(np.sort(scores["index"][scores["is_member"]]), plan["target_members"])

    by_name = {r.target.name: r for r in outcome.reports}
    assert by_name["wide"].train_acc > by_name["small"].train_acc  # the longer-trained wide net fits harder
    assert "MLflow parent run: " + outcome.run_id in outcome.summary()


def test_stored_keep_mask_is_what_each_model_trained_on(audited, tmp_path, digits):
    raw, outcome, _ = audited
    client = MlflowClient(outcome.tracking_uri)
    plan = plan_audit(parse_config(raw), digits)
    child = _children(client, outcome.run_id)["wide"]
    pool = PoolSignals.from_parquet(client.download_artifacts(child.info.run_id, "signals/pool.parquet", str(tmp_path)))
    assert list(pool.model_ids) == ["target"] + [f"ref-{k:03d}" for k in range(4)]
    for row, job in enumerate(plan.target_jobs("wide")):
        assert np.array_equal(pool.indices[pool.keep[row]], np.sort(job.train_indices)), job.job_id
    audited_rows = pool.role_mask("target_members", "target_nonmembers")
    assert (pool.keep[1:, audited_rows].sum(axis=0) == 2).all()  # every audited sample IN for exactly K/2


def test_rescore_reproduces_logged_metrics_exactly(audited):
    _, outcome, _ = audited
    again = rescore_run(outcome.run_id, tracking_uri=outcome.tracking_uri, **QUIET)
    client = MlflowClient(outcome.tracking_uri)
    assert client.get_run(again.run_id).data.tags["raymia.rescored_from"] == outcome.run_id
    before, after = _children(client, outcome.run_id), _children(client, again.run_id)
    for name in before:
        old = {k: v for k, v in before[name].data.metrics.items()}
        new = after[name].data.metrics
        assert old == new, name

    changed = rescore_run(outcome.run_id, ["attacks.rmia.gamma=3.0", "attacks.enabled=[rmia_online]"],
                          tracking_uri=outcome.tracking_uri, **QUIET)
    child = _children(client, changed.run_id)["wide"]
    assert child.data.params["attacks.rmia.gamma"] == "3.0" and "mia.loss.auc" not in child.data.metrics


def test_second_run_reuses_cached_models_and_retrains_a_corrupted_one(audited):
    raw, outcome, tmp = audited
    again = run_audit(parse_config(raw), **QUIET)
    assert (again.models.trained, again.models.reused) == (0, 10)
    assert MlflowClient(outcome.tracking_uri).get_run(again.run_id).data.metrics["models.trained"] == 0
    assert [r.attacks["loss"].metrics.auc for r in again.reports] == [r.attacks["loss"].metrics.auc
                                                                      for r in outcome.reports]
    cache = tmp / "runs" / "cache"
    victim = next((cache / "models").rglob("*.safetensors")).stem  # corrupt one model's weights and its outputs
    for f in [*cache.rglob(f"{victim}.safetensors"), *cache.rglob(f"{victim}-*.npz")]:
        f.write_bytes(f.read_bytes()[:10])
    third = run_audit(parse_config(raw), **QUIET)
    assert third.models.trained == 1 and third.models.reused == 9


def test_plugin_architecture_reaches_ray_workers(ray_local, tiny, tmp_path, monkeypatch):
    # A user's own module, importable by the driver only: workers get it by value.
    (tmp_path / "user_arch_mod.py").write_text(
        "import math\nfrom torch import nn\n"
        "def tiny_net(input_shape, num_classes, width=16):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),\n"
        "                         nn.Linear(width, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny["targets"] = [{"name": "plug", "model": {"arch": "user_arch_mod:tiny_net", "params": {"width": 24}},
                        "train": {"epochs": 20}}]
    tiny["reference"] = {"count": 2}
    outcome = run_audit(parse_config(tiny), **QUIET)
    (report,) = outcome.reports
    assert report.test_acc > 0.5  # the plug-in network really trained (chance is 0.1)
    params = _children(MlflowClient(outcome.tracking_uri), outcome.run_id)["plug"].data.params
    assert params["arch"] == "user_arch_mod:tiny_net" and params["model.params.width"] == "24"


def test_tracking_uri_env_var_wins_over_the_config(ray_local, tiny, tmp_path, monkeypatch):
    env_db = tmp_path / "from_env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")
    tiny["targets"] = tiny["targets"][:1]
    outcome = run_audit(parse_config(tiny), **QUIET)
    assert outcome.tracking_uri == f"sqlite:///{env_db}" and not (tmp_path / "mlflow.db").exists()
    assert MlflowClient(outcome.tracking_uri).get_run(outcome.run_id).info.status == "FINISHED"
