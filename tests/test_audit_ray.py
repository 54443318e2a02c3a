"""A tiny audit through a real local Ray (Tune trials) into a real MLflow SQLite store."""

import io

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from raymia.attacks import ATTACK_NAMES
from raymia.audit import run_audit
from raymia.config import parse_config
from raymia.data.splits import SplitPlan

pytestmark = pytest.mark.ray


def _artifact_bytes(client, run_id, path, tmp_path):
    local = client.download_artifacts(run_id, path, str(tmp_path))
    with open(local, "rb") as f:
        return f.read()


def test_audit_logs_parent_children_metrics_and_artifacts(ray_local, tiny, tmp_path, monkeypatch):
    env_db = tmp_path / "from_env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")  # the standard variable wins over the config
    outcome = run_audit(parse_config(tiny), echo=lambda line: None)

    assert outcome.tracking_uri == f"sqlite:///{env_db}" and not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    for phase in ("ray_start", "training", "attacks", "tracking"):
        assert parent.data.metrics[f"time.{phase}_s"] >= 0

    split_path = client.download_artifacts(outcome.run_id, "split/split.parquet", str(tmp_path / "dl"))
    plan = SplitPlan.from_parquet(split_path)
    assert plan.content_hash() == parent.data.params["split_hash"]

    exp_id = parent.info.experiment_id
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["small", "wide"]
    for child in children:
        assert child.info.status == "FINISHED"
        m, p = child.data.metrics, child.data.params
        for name in ("train_acc", "test_acc", "gap", "mia.best.auc", "mia.best.tpr_at_0.1pct_fpr",
                     "mia.n_members", "mia.n_nonmembers"):
            assert name in m, name
        for attack in ATTACK_NAMES:
            for suffix in ("auc", "bal_acc_oracle", "bal_acc_shadow", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr",
                           "tpr_at_0.01pct_fpr"):
                assert 0.0 <= m[f"mia.{attack}.{suffix}"] <= 1.0
        assert m["gap"] == pytest.approx(m["train_acc"] - m["test_acc"])
        assert p["dataset"] == "digits" and p["arch"] == "mlp" and p["defense"] == "none"
        assert p["split_hash"] == parent.data.params["split_hash"] and "raymia_version" in p and "seed" in p
        assert child.data.tags["threshold_source.bal_acc_shadow"].startswith("shadow")

        paths = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert paths == {"plots/roc_loglog.png", "plots/score_histograms.png"}
        scores = pd.read_parquet(io.BytesIO(_artifact_bytes(client, child.info.run_id, "scores/per_sample.parquet",
                                                            tmp_path / child.info.run_id)))
        assert len(scores) == m["mia.n_members"] + m["mia.n_nonmembers"]
        assert set(ATTACK_NAMES) <= set(scores.columns) and scores["is_member"].sum() == m["mia.n_members"]
        assert np.array_equal(np.sort(scores["index"][scores["is_member"]]), plan["target_members"])

    by_name = {r.target.name: r for r in outcome.reports}
    assert by_name["wide"].train_acc > by_name["small"].train_acc  # the longer-trained wide net fits harder
    assert "MLflow parent run: " + outcome.run_id in outcome.summary()


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
    tiny["shadows"] = {"count": 1}
    outcome = run_audit(parse_config(tiny), echo=lambda line: None)
    (report,) = outcome.reports
    assert report.test_acc > 0.5  # the plug-in network really trained (chance is 0.1)
    params = MlflowClient(outcome.tracking_uri).search_runs(
        [MlflowClient(outcome.tracking_uri).get_run(outcome.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{outcome.run_id}'")[0].data.params
    assert params["arch"] == "user_arch_mod:tiny_net" and params["model.params.width"] == "24"
