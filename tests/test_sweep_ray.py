"""Defense sweeps through real Ray Tune: one audited trial per configuration, frontier, report, champion registry."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raymia.audit import run_audit
from raymia.config import parse_config
from raymia.registry import load_model
from raymia.signals import PoolSignals
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray
QUIET = {"echo": lambda line: None}


def _sweep_config(tmp_path, **sweep_overrides):
    raw = tiny_config(tmp_path)
    del raw["targets"]
    raw["sweep"] = {
        "base": {"model": {"arch": "mlp", "params": {"hidden": [64]}}, "train": {"epochs": 15, "batch_size": 32}},
        "defenses": [{"name": "none"}, {"name": "relaxloss", "alpha": {"grid": [0.05, 0.5]}},
                     {"name": "regularization", "weight_decay": {"loguniform": [1e-4, 1e-2]}, "samples": 2}],
        **sweep_overrides,
    }
    raw["attacks"] = {"enabled": ["loss", "lira_online", "rmia_online", "nn"], "nn": {"epochs": 3}}
    raw["frontier"] = {"leakage": "auc"}
    raw["champion"] = {"rule": "min_leakage", "max_accuracy_drop": 0.05, "registry_name": "tiny-champion"}
    return raw


def test_sweep_audits_each_configuration_and_registers_the_champion(ray_local, tmp_path, digits):
    outcome = run_audit(parse_config(_sweep_config(tmp_path)), **QUIET)
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["mode"] == "sweep"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    names = sorted(c.info.run_name for c in children)
    assert len(names) == 5 and {"none", "relaxloss(alpha=0.05)", "relaxloss(alpha=0.5)"} <= set(names)
    assert all(c.info.status == "FINISHED" for c in children)
    wds = [float(c.data.params["defense.weight_decay"]) for c in children if c.data.params["defense"] == "regularization"]
    assert len(wds) == 2 and wds[0] != wds[1] and all(1e-4 <= w <= 1e-2 for w in wds)
    relax = next(c for c in children if c.info.run_name == "relaxloss(alpha=0.5)")
    assert relax.data.params["defense.alpha"] == "0.5" and "mia.rmia_online.auc" in relax.data.metrics

    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"report.html", "frontier.json", "plots"} <= artifacts
    html = (outcome.report_path).read_text()
    configurations = html.split("<h2>")[0]  # the summary table, before the figures and the privacy table
    assert configurations.count("<tr>") == 1 + 5 and html.count("data:image/png;base64") == 1 + 5 and "Champion" in html

    win, _ = outcome.champion
    version = client.get_model_version_by_alias("tiny-champion", "champion")
    assert version.run_id == win.run_id == parent.data.tags["raymia.champion_run"]
    loaded = load_model("models:/tiny-champion@champion", tracking_uri=outcome.tracking_uri)
    pool = PoolSignals.from_parquet(client.download_artifacts(win.run_id, "signals/pool.parquet", str(tmp_path)))
    from raymia.training.loop import predict_logits

    np.testing.assert_allclose(predict_logits(loaded.model, digits.x[pool.indices]), pool.logits[0, :, 0], rtol=1e-5,
                               atol=1e-5)


def _utility_sweep_config(tmp_path):
    """Four label-smoothing configurations ranked by validation accuracy, ASHA stopping the weak ones early."""
    raw = _sweep_config(tmp_path, objective="utility", scheduler="asha",
                        defenses=[{"name": "none"}, {"name": "label_smoothing", "epsilon": {"grid": [0.1, 0.2, 0.3]}}])
    del raw["champion"]
    return raw


def test_utility_sweep_with_asha_reports_accuracy_only(ray_local, tmp_path):
    raw = _utility_sweep_config(tmp_path)
    outcome = run_audit(parse_config(raw), **QUIET)
    client = MlflowClient(outcome.tracking_uri)
    exp = client.get_run(outcome.run_id).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    assert len(children) == 4 and all(c.data.tags["raymia.kind"] == "utility" for c in children)
    assert all(0 < c.data.metrics["val_acc"] <= 1 for c in children)
    assert not outcome.reports and "test acc" in outcome.summary()


def test_ctrl_c_during_a_sweep_stops_it_as_interrupted_not_as_finished(ray_local, tmp_path):
    # Tune's own SIGINT handler stops the running trials and returns as if the sweep had finished: a utility
    # trial's last epoch would pass for its result (or a pending trial's missing one raise a KeyError)
    import os
    import signal

    raw = _utility_sweep_config(tmp_path)
    lines, before = [], signal.getsignal(signal.SIGINT)

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("[1/"):  # the first trial is done, the others running or pending: press Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_audit(parse_config(raw), echo=echo)
    assert any("interrupted; run the same command again to resume" in line for line in lines)
    client = MlflowClient(raw["tracking"]["uri"])
    parent = client.search_runs([client.get_experiment_by_name(raw["tracking"]["experiment"]).experiment_id],
                                "tags.`raymia.kind` = 'audit'")[0]
    assert parent.info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is before  # the next Ctrl-C is not swallowed by Tune's stale handler
