"""raymia's models are MLflow models: loadable by ``mlflow.pyfunc`` alone in a fresh interpreter, pickle-free,
their metrics and datasets linked, anything else refused with a clear message (``browsable_audit``'s store)."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raymia.errors import UserError
from raymia.registry import load_bundle, load_champion
from raymia.signals import PoolSignals
from raymia.tracking import DIGEST_CHARS, ui_links

PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".joblib", ".cloudpickle", ".ckpt"}


def _client(outcome):
    return MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)


def test_champion_predicts_the_audited_test_labels_in_a_fresh_interpreter(browsable_audit, digits, tmp_path):
    outcome, _ = browsable_audit
    client = _client(outcome)
    run_id = client.get_model_version_by_alias("raymia-digits", "champion").run_id
    pool = PoolSignals.from_parquet(client.download_artifacts(run_id, "signals/pool.parquet", str(tmp_path)))
    test = pool.role_mask("test")
    audited = pool.logits[0, test, 0].argmax(axis=1)  # the target's logged outputs on the test split
    np.save(tmp_path / "x.npy", digits.x[pool.indices[test]])
    script = ("import sys, json, mlflow, numpy as np\n"
              "mlflow.set_tracking_uri(sys.argv[1])\n"
              "m = mlflow.pyfunc.load_model('models:/raymia-digits@champion')\n"
              "print(json.dumps(m.predict(np.load(sys.argv[2]))['label'].tolist()))\n")
    proc = subprocess.run([sys.executable, "-c", script, outcome.tracking_uri, str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert labels == audited.tolist()
    assert np.mean(np.array(labels) == pool.labels[test]) == pytest.approx(client.get_run(run_id).data.metrics["test_acc"])


def _pickles(folder: Path) -> list[str]:
    found = []
    for f in folder.rglob("*"):
        if not f.is_file():
            continue
        head = f.read_bytes()[:2]
        if f.suffix in PICKLE_SUFFIXES or (f.suffix != ".safetensors" and head[:1] == b"\x80" and head[1:2] in
                                           (b"\x02", b"\x03", b"\x04", b"\x05")):
            found.append(str(f.relative_to(folder)))
        elif zipfile.is_zipfile(f) and any(n.endswith(".pkl") for n in zipfile.ZipFile(f).namelist()):
            found.append(str(f.relative_to(folder)))  # a torch.save archive
    return found


def test_no_logged_model_holds_a_pickle_and_each_is_code_plus_safetensors(browsable_audit, tmp_path):
    outcome, _ = browsable_audit
    client = _client(outcome)
    exp = client.get_run(outcome.run_id).info.experiment_id
    models = client.search_logged_models([exp])
    assert len(models) == 2  # mlp and mlp+diffence
    for lm in models:
        with _store(outcome):
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{lm.model_id}", dst_path=str(tmp_path / lm.model_id)))
        assert _pickles(local) == [], lm.model_id
        flavor = (local / "MLmodel").read_text()
        assert "loader_module: mlflow.pyfunc.loaders.code_model" in flavor and "python_model:" not in flavor
        assert (local / "pyfunc_model.py").exists()  # the model's code travels with it
        assert list(local.rglob("*.safetensors"))


def _store(outcome):
    from raymia.tracking import mlflow_store

    return mlflow_store(outcome.tracking_uri)


def test_metrics_and_datasets_are_linked_to_each_model_and_run(browsable_audit):
    outcome, _ = browsable_audit
    client = _client(outcome)
    parent = client.get_run(outcome.run_id)
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert ui_links(outcome.tracking_uri, "http://h") == [  # what `make ui` prints: raymia's view of the runs
        f"{exp.name}: http://h/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=raymia"
        "&workflowType=machine_learning"]
    assert "browse-audit" in parent.data.tags["mlflow.note.content"] and "mia.best.auc" in parent.data.tags[
        "mlflow.note.content"]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    for child in children:
        lm = client.get_logged_model(child.data.tags["raymia.model_id"])
        assert lm.source_run_id == child.info.run_id
        linked = {m.key: m.value for m in lm.metrics}
        for key in ("test_acc", "mia.best.auc", "mia.best.tpr_at_0.1pct_fpr"):
            assert linked[key] == child.data.metrics[key]
        inputs = {d.dataset.name: d for d in child.inputs.dataset_inputs}
        assert sorted(inputs) == ["digits.population", "digits.target_members", "digits.target_nonmembers"]
        contexts = {n: [t.value for t in d.tags if t.key == "mlflow.data.context"] for n, d in inputs.items()}
        assert contexts == {"digits.target_members": ["members"], "digits.target_nonmembers": ["non-members"],
                            "digits.population": ["population"]}
        assert {d.dataset.digest for d in inputs.values()} == {parent.data.params["split_hash"][:DIGEST_CHARS]}
        assert json.loads(inputs["digits.target_members"].dataset.profile)["num_rows"] == int(
            parent.data.params["split.n_target_members"])


def test_a_model_that_is_not_raymias_is_refused_with_the_reason(browsable_audit, tmp_path):
    outcome, _ = browsable_audit
    with pytest.raises(UserError, match="not an MLflow model"):
        load_bundle(str(tmp_path))
    code = tmp_path / "other.py"
    code.write_text("import mlflow\nclass M(mlflow.pyfunc.PythonModel):\n    def predict(self, context, x):\n"
                    "        return x\nmlflow.models.set_model(M())\n")
    mlflow.pyfunc.save_model(str(tmp_path / "other"), python_model=str(code))
    with pytest.raises(UserError, match="not one raymia logged"):
        load_bundle(str(tmp_path / "other"))
    with pytest.raises(UserError, match="cannot read model 'models:/no-such-model@champion'"):
        load_champion("models:/no-such-model@champion", tracking_uri=outcome.tracking_uri)


def test_plain_champion_is_served_with_its_diffence_siblings_interval(browsable_audit):
    outcome, _ = browsable_audit
    champ = load_champion("models:/raymia-digits@champion", tracking_uri=outcome.tracking_uri)
    client = _client(outcome)
    sibling = client.search_runs([client.get_run(outcome.run_id).info.experiment_id],
                                 "attributes.run_name = 'mlp+diffence'")[0]
    assert champ.unet is not None and champ.version == "raymia-digits/1"
    assert champ.interval == pytest.approx((sibling.data.metrics["diffence.interval_low"],
                                            sibling.data.metrics["diffence.interval_high"]))


def test_an_older_raymia_view_is_replaced_and_the_users_experiment_kind_kept(tmp_path):
    from raymia.config import parse_config
    from raymia.tracking import RUNS_VIEW, audit_run
    from tests.conftest import tiny_config

    cfg = parse_config(tiny_config(tmp_path))
    client = MlflowClient(cfg.tracking.uri)
    view_key = next(iter(RUNS_VIEW))
    client.create_experiment(cfg.tracking.experiment, tags={view_key: '{"selectedColumns": []}',
                                                            "mlflow.experimentKind": "genai_development"})
    with audit_run(cfg, cfg.tracking.uri):
        pass
    tags = client.get_experiment_by_name(cfg.tracking.experiment).tags
    assert tags[view_key] == RUNS_VIEW[view_key]  # this version's view (with its charts)
    assert tags["mlflow.experimentKind"] == "genai_development"  # the user's choice is theirs
