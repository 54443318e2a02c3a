"""``raymia diffusion-audit`` end to end on a real local Ray and a real MLflow store."""

import pytest
from mlflow.tracking import MlflowClient

from raymia.cli import main
from raymia.config import DiffusionAuditConfig, parse_config
from raymia.diffusion_audit import run_diffusion_audit


def _config(tmp_path) -> dict:
    return {"name": "tiny-diffusion", "data": {"dataset": "digits"},
            "split": {"members": 0.05, "nonmembers": 0.15, "heldout": 0.2},
            "train": {"steps": 80, "batch_size": 32, "warmup_steps": 20},
            "attacks": {"t_grid": [50]},
            "sampling": {"steps": 10, "n_samples": 40}, "fid": {"proxy_epochs": 3},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "diffusion"},
            "output_dir": str(tmp_path / "runs")}


@pytest.mark.slow
def test_diffusion_audit_logs_three_systems_side_by_side(ray_local, tmp_path):
    cfg = parse_config(_config(tmp_path), schema=DiffusionAuditConfig)
    lines: list[str] = []
    outcome = run_diffusion_audit(cfg, echo=lines.append)
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["raymia.kind"] == "diffusion-audit"
    assert "fid_proxy.real_floor" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"undefended", "dualmd", "distillmd"}
    for name, child in by_name.items():
        m = child.data.metrics
        assert child.info.status == "FINISHED"
        for attack in ("loss", "secmi", "pia", "pian"):
            for stat in ("auc", "asr", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "best_of_grid.auc"):
                assert 0 <= m[f"mia.{attack}.{stat}"] <= 1, (name, attack, stat)
        assert m["fid_proxy"] > 0
        arts = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert arts == {"plots/roc.png", "plots/samples.png"}
    dual = by_name["dualmd"].data.metrics
    assert {"theta1.mia.secmi.auc", "theta2.mia.pia.auc", "cross.mia.loss.auc"} <= set(dual)
    report = outcome.report_path.read_text()
    assert all(s in report for s in ("undefended", "dualmd", "distillmd", "fid_proxy"))
    assert any("training" in line or "Ray at" in line for line in lines)

    again: list[str] = []
    only = cfg.model_copy(update={"defenses": cfg.defenses.model_copy(update={"enabled": ["undefended"]})})
    second = run_diffusion_audit(only, echo=again.append)  # the model is cached: no training, same scores
    assert any("nothing to train" in line for line in again)
    assert second.reports[0].attacks["secmi"].metrics.auc == outcome.reports[0].attacks["secmi"].metrics.auc


def test_cli_validates_and_rejects_bad_diffusion_configs(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("name: x\ntrain: {steps: 10}\n")
    assert main(["diffusion-audit", str(good), "--validate"]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: {sampler: euler}\n")
    assert main(["diffusion-audit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sampling.sampler" in err and "Traceback" not in err
    assert main(["diffusion-audit", str(good), "--set", "split.members=1.5", "--validate"]) == 2


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
