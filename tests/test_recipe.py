"""The Ray-free recipe: a whole audit in one process that cannot import Ray gives the Ray path's numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raymia.audit import run_audit
from raymia.config import parse_config
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
NO_RAY = "import sys; sys.modules['ray'] = None  # any 'import ray' now raises ImportError\n"


def _child_metrics(tracking_uri: str, run_id: str) -> dict[str, dict[str, float]]:
    client = MlflowClient(tracking_uri)
    exp = client.get_run(run_id).info.experiment_id
    return {c.info.run_name: dict(c.data.metrics)
            for c in client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'")}


def _local_audit_without_ray(raw: dict, tmp: Path, *extra: str) -> str:
    """Run ``raymia audit --local`` in a fresh interpreter where importing Ray fails; return the parent run id."""
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = NO_RAY + ("from raymia.cli import main\n"
                     f"code = main(['audit', {str(config)!r}, '--local', *{list(extra)!r}])\n"
                     "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules if sys.modules[m])\n"
                     "sys.exit(code)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["OMP_NUM_THREADS"] = "1"  # torch threads as in a 1-CPU trial: loops of float sums then round alike
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1].removeprefix("MLflow parent run: ")


def _same_config_both_ways(raw: dict, tmp_path: Path) -> tuple[dict, dict]:
    local_raw = json.loads(json.dumps(raw))
    local_raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'local.db'}"
    local_raw["output_dir"] = str(tmp_path / "local")
    local_id = _local_audit_without_ray(local_raw, tmp_path)
    ray_outcome = run_audit(parse_config(raw), echo=lambda line: None)
    return (_child_metrics(local_raw["tracking"]["uri"], local_id),
            _child_metrics(ray_outcome.tracking_uri, ray_outcome.run_id))


@pytest.mark.ray
def test_local_audit_without_ray_equals_the_ray_audit(ray_local, tmp_path):
    raw = tiny_config(tmp_path)
    raw["targets"] = [{"name": "mlp", "model": {"arch": "mlp", "params": {"hidden": [64], "dropout": 0.1}},
                       "train": {"epochs": 8, "batch_size": 32}}]
    raw["split"] = {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.27, "calibration": 0.05,
                    "calibration_members": 0.08, "test": 0.10}
    raw["reference"] = {"count": 4, "group_size": 3}  # two training groups, dropout drawn per group
    raw["diffence"] = {"n": 2, "scenario": 1, "train": {"steps": 20}}
    raw["attacks"] = {"enabled": ["loss", "nn", "lira_online", "rmia_offline", "label_only_aug"],
                      "nn": {"epochs": 2}, "loo_targets": 1, "rmia": {"num_z": 30}}
    local, on_ray = _same_config_both_ways(raw, tmp_path)
    assert set(local) == set(on_ray) == {"mlp", "mlp+diffence"}
    for name in local:
        assert local[name] == on_ray[name], name  # every metric, to the last bit


@pytest.mark.ray
def test_local_sweep_audits_the_same_sampled_configurations(ray_local, tmp_path):
    raw = tiny_config(tmp_path)
    del raw["targets"]
    raw["sweep"] = {"base": {"model": {"arch": "mlp", "params": {"hidden": [32]}}, "train": {"epochs": 4}},
                    "defenses": [{"name": "none"},
                                 {"name": "regularization", "weight_decay": {"loguniform": [1e-4, 1e-2]}, "samples": 2}]}
    raw["reference"] = {"count": 2}
    raw["attacks"] = {"enabled": ["loss", "lira_offline"]}
    local, on_ray = _same_config_both_ways(raw, tmp_path)
    assert len(local) == 3 and local == on_ray
