"""Quiet, offline-friendly defaults for Ray, Tune and MLflow; the environment can still override each one."""

import logging
import os

_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
}


def quiet_defaults() -> None:
    """Set each default unless the user already set the variable; silence MLflow's schema-migration chatter."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    for noisy in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
