"""Know the cost before you start: what `raymia validate` plans is what the audit then trains."""

from __future__ import annotations

import re

import pytest
import yaml
from mlflow.tracking import MlflowClient
from torch import nn

from raymia.audit import run_audit, validate_audit
from raymia.cli import main
from raymia.config import parse_config
from raymia.data.datasets import load_dataset
from raymia.pipeline.cost import Cost, Progress, forward_macs, plan_cost
from raymia.pipeline.plan import plan_audit
from tests.conftest import tiny_config


def test_forward_macs_counts_linear_and_conv_layers():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    assert forward_macs(mlp, (1, 28, 28)) == 784 * 128 + 128 * 10
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 28 * 28, 10))
    assert forward_macs(conv, (1, 28, 28)) == 28 * 28 * 8 * 9 + 8 * 28 * 28 * 10


def test_validate_plans_exactly_the_models_and_flops_the_audit_trains(tmp_path, capsys):
    raw = tiny_config(tmp_path)
    raw["targets"][1]["defense"] = {"name": "dmp", "k": 100}  # two networks per model
    raw.update(split={"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.2, "calibration": 0.05,
                      "test": 0.1, "defender_reference": 0.1},
               seeds=[0, 1], audit={"eps": False, "vulnerable": 0, "mode": "one_run", "canaries": 40},
               attacks={"enabled": ["loss", "lira_online"]})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(config), "--no-estimate"]) == 0
    printed = capsys.readouterr().out
    models, networks, tflop = re.search(r"(\d+) models to train \((\d+) networks.*?, ([\d.e+-]+) TFLOP of training",
                                        printed).groups()
    cfg = parse_config(raw)
    cost = plan_cost(plan_audit(cfg, load_dataset("digits")), cfg.targets)
    assert int(models) == 2 * 2 * 5 and int(networks) == 2 * (5 + 2 * 5)  # 2 seeds x 2 targets x (1 + 4 refs)
    assert float(tflop) == pytest.approx(2 * cost.train_flops / 1e12, rel=1e-2)  # seed 1: other coins

    outcome = run_audit(cfg, local=True)
    parent = MlflowClient(outcome.tracking_uri).get_run(outcome.run_id).data.metrics
    assert parent["models.trained"] == int(models) == parent["cost.models"]
    assert parent["flops.trained"] == pytest.approx(parent["cost.train_flops"], rel=1e-9)
    assert parent["cost.train_flops"] == pytest.approx(2 * cost.train_flops, rel=1e-2)


def test_validate_estimates_wall_time_from_a_calibration(tmp_path):
    cfg = parse_config(tiny_config(tmp_path))
    text = validate_audit(cfg, source="tiny.yaml")
    assert re.search(r"about [\d.]+ (s|min|h) in one process on this machine", text)
    assert "10 models to train" in text


def test_progress_reports_models_done_and_an_eta():
    p = Progress(Cost(models=10, train_flops=100.0, by_target={"a": 50.0, "b": 50.0}), runs=1)
    assert p.advance(5, 50.0, 50.0).startswith("models 5/10, ETA ")
    assert p.advance(5, 50.0, 0.0) == "models 10/10"
