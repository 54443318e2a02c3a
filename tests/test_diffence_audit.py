"""DIFFENCE inside an audit through real Ray: cascaded on a trained target, reference models queried through it."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raymia.audit import run_audit
from raymia.config import parse_config
from raymia.signals import PoolSignals
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray


def test_audit_reports_each_target_with_and_without_diffence(ray_local, tmp_path):
    raw = tiny_config(tmp_path)
    raw["targets"] = [{"name": "mlp", "model": {"arch": "mlp", "params": {"hidden": [256]}},
                       "train": {"epochs": 60, "batch_size": 32, "lr": 0.002}}]
    raw["split"] = {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.27, "calibration": 0.05,
                    "calibration_members": 0.08, "test": 0.10}
    raw["reference"] = {"count": 4}
    raw["diffence"] = {"n": 2, "scenario": 1, "train": {"steps": 100}}
    raw["attacks"] = {"enabled": ["loss", "entropy", "lira_online_fixed_var", "lira_offline_fixed_var", "rmia_online"],
                      "rmia": {"num_z": 100}}
    raw["frontier"] = {"leakage": "auc"}
    outcome = run_audit(parse_config(raw), echo=lambda line: None)

    plain, defended = outcome.reports
    assert defended.target.name == "mlp+diffence" and defended.inference["name"] == "diffence"
    assert defended.test_acc == plain.test_acc  # labels are preserved, so accuracy is identical
    rows = np.searchsorted(plain.pool.indices, defended.pool.indices)
    np.testing.assert_array_equal(defended.pool.logits[..., 0, :].argmax(-1),
                                  plain.pool.logits[:, rows, 0, :].argmax(-1))  # every model, every queried sample
    assert not np.allclose(defended.pool.logits[1:], plain.pool.logits[1:, rows])  # references went through it too
    assert "ece" in defended.extra and defended.interval is not None and defended.interval[0] < defended.interval[1]
    assert defended.best_attack().metrics.auc < plain.best_attack().metrics.auc  # DIFFENCE lowers the best AUC

    client = MlflowClient(outcome.tracking_uri)
    children = {c.info.run_name: c for c in client.search_runs(
        [client.get_run(outcome.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{outcome.run_id}'")}
    assert set(children) == {"mlp", "mlp+diffence"}
    assert children["mlp+diffence"].data.params["inference_defense"] == "diffence"
    assert children["mlp"].data.params["inference_defense"] == "none"
    assert children["mlp+diffence"].data.metrics["test_acc"] == children["mlp"].data.metrics["test_acc"]
    assert children["mlp+diffence"].data.metrics["diffence.interval_low"] == defended.interval[0]
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "diffusion_model")}
    assert {"diffusion_model/config.json", "diffusion_model/diffusion_pytorch_model.safetensors"} <= artifacts
    stored = PoolSignals.from_parquet(client.download_artifacts(children["mlp+diffence"].info.run_id,
                                                                "signals/pool.parquet", str(tmp_path)))
    np.testing.assert_array_equal(stored.logits, defended.pool.logits)


def test_scenario_needs_known_members():
    with pytest.raises(Exception, match="split.calibration_members"):
        parse_config({"targets": [{"name": "a"}], "diffence": {"n": 4, "scenario": 1}})
