"""Shared fixtures: a real local Ray instance, the digits data, and a tiny audit config."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.pop("RAY_ADDRESS", None)  # never join a cluster someone left running on the machine
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance (2 CPUs, no dashboard) shared by the tests that need Ray."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits():
    from raymia.data.datasets import load_dataset

    return load_dataset("digits")


def tiny_config(tmp_path, **overrides) -> dict:
    """A raw config dict for a fast two-target audit on digits, writing everything under ``tmp_path``."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "digits"},
        "targets": [
            {"name": "small", "model": {"arch": "mlp", "params": {"hidden": [32]}},
             "train": {"epochs": 5, "batch_size": 64}},
            {"name": "wide", "model": {"arch": "mlp", "params": {"hidden": [256]}},
             "train": {"epochs": 30, "batch_size": 32}},
        ],
        "reference": {"count": 4},
        "attacks": {"nn": {"epochs": 3}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tiny"},
        "output_dir": str(tmp_path / "runs"),
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny(tmp_path):
    return tiny_config(tmp_path)


@pytest.fixture(scope="session")
def browsable_audit(tmp_path_factory):
    """One small local audit (no Ray) with DIFFENCE and a registered champion ``raymia-digits``, shared by the
    MLflow-model and browser tests: ``(outcome, raw config)``."""
    from raymia.audit import run_audit
    from raymia.config import parse_config

    raw = diffence_champion_config(tmp_path_factory.mktemp("browsable"), "raymia-digits", name="browse-audit")
    return run_audit(parse_config(raw), local=True, echo=lambda line: None), raw


def diffence_champion_config(tmp, registry_name: str, **overrides) -> dict:
    """A raw config for a tiny audit with DIFFENCE that registers its champion as ``registry_name@champion``."""
    raw = tiny_config(tmp, **overrides)
    raw["targets"] = [{"name": "mlp", "model": {"arch": "mlp", "params": {"hidden": [64]}}, "train": {"epochs": 20}}]
    raw["split"] = {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.27, "calibration": 0.05,
                    "calibration_members": 0.08, "test": 0.10}
    raw["reference"] = {"count": 2}
    raw["diffence"] = {"n": 2, "scenario": 1, "train": {"steps": 30}}
    raw["attacks"] = {"enabled": ["loss", "rmia_online"], "rmia": {"num_z": 20}}
    raw["frontier"] = {"leakage": "auc"}
    raw["champion"] = {"rule": "min_leakage", "max_accuracy_drop": 0.5, "registry_name": registry_name}
    return raw
