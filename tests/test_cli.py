"""The user-facing commands, run as a user runs them (subprocesses): bad input and the happy path."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _write(tmp_path, cfg, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg) if not isinstance(cfg, str) else cfg)
    return path


def _raymia(tmp_path, config, *extra):
    return _run(["-m", "raymia.cli", "audit", str(config), *extra], tmp_path)


def _assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def test_missing_config_file(tmp_path):
    _assert_user_error(_raymia(tmp_path, tmp_path / "nope.yaml"), "config file not found")


def test_malformed_yaml(tmp_path):
    path = _write(tmp_path, "targets:\n  - name: a\n   model: {arch: mlp\n")
    _assert_user_error(_raymia(tmp_path, path), "malformed YAML at line")


@pytest.mark.parametrize(("patch", "fragment"), [
    ({"data": {"dataset": "imagenet"}}, "data.dataset: unknown dataset 'imagenet'"),
    ({"attacks": {"enabled": ["loss", "lira9"]}}, "attacks.enabled: unknown attack(s) ['lira9']"),
    ({"targets": [{"name": "a", "model": {"arch": "transformer"}}]}, "targets.0.model.arch: unknown architecture"),
    ({"data": {"dataset": "cifar10", "data_root": "/nonexistent/cifar"}}, "data.data_root: no cifar10 files"),
])
def test_bad_names_and_paths(tmp_path, patch, fragment):
    cfg = tiny_config(tmp_path)
    cfg.update(patch)
    _assert_user_error(_raymia(tmp_path, _write(tmp_path, cfg)), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_gpu_request_without_gpus_fails_cleanly_and_marks_the_run(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["compute"] = {"device": "cuda"}
    proc = _raymia(tmp_path, _write(tmp_path, cfg))
    _assert_user_error(proc, "compute.device: GPUs were requested but the Ray cluster has none")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "GPUs were requested" in runs[0].data.tags["raymia.error"]


@pytest.mark.ray
def test_job_entrypoint_prints_table_and_run_id(tmp_path):
    cfg = tiny_config(tmp_path)
    proc = _run([str(REPO / "jobs" / "audit.py"), str(_write(tmp_path, cfg)), "--set", "reference.count=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^target\s+test acc\s+gap\s+best attack\s+AUC \[95% CI\]\s+TPR@0.1%FPR \[95% CI\]", out, re.M)
    assert "† 449 non-members are fewer than 1/0.1% = 1,000" in out  # the unresolvable TPR is marked, with counts
    assert re.search(r"^small\s+0\.\d{3}", out, re.M) and re.search(r"^wide\s+0\.\d{3}", out, re.M)
    run_id = re.search(r"MLflow parent run: ([0-9a-f]{32})", out).group(1)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["reference.count"] == "2"
