"""Audit a model the user brings: a checkpoint trained outside raymia, the same weights from the MLflow registry, a
black-box HTTP endpoint, reference models trained with the user's own training function, and every bad input."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from raymia.audit import run_audit
from raymia.cli import main
from raymia.config import parse_config
from raymia.data.datasets import load_dataset
from tests import own_model

N_MEMBERS = 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A target trained by a plain PyTorch loop on 200 digits rows (it overfits), saved as safetensors with its
    member rows, as a user would hand it over."""
    tmp = tmp_path_factory.mktemp("own")
    ds = load_dataset("digits")
    members = np.random.default_rng(1).choice(len(ds), N_MEMBERS, replace=False)
    model = own_model.fit(own_model.build(ds.input_shape, 10), torch.from_numpy(ds.x[members]),
                          torch.from_numpy(ds.y[members].astype("int64")), seed=0, device=torch.device("cpu"),
                          epochs=100)
    save_file(model.state_dict(), str(tmp / "model.safetensors"))
    np.save(tmp / "members.npy", members)
    return {"dir": tmp, "model": model, "members": members, "ds": ds}


def config(trained, tmp, **target) -> dict:
    """The README's dozen-line config for the trained model (plus test paths)."""
    t = {"name": "mine", "model": {"arch": "tests.own_model:build", "params": {"hidden": 256}},
         "weights": str(trained["dir"] / "model.safetensors"), "train": {"fn": "tests.own_model:fit"}}
    t.update(target)
    t = {k: v for k, v in t.items() if v is not None}
    return {"name": "own", "data": {"dataset": "digits"},
            "split": {"members": str(trained["dir"] / "members.npy"), "target_nonmembers": 0.25, "population": 0.3,
                      "calibration": 0.05, "test": 0.1},
            "targets": [t], "reference": {"count": 4},
            "attacks": {"enabled": ["loss", "confidence", "lira_online", "rmia_online"]},
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "own"},
            "output_dir": str(tmp / "runs")}


def audit(raw):
    return run_audit(parse_config(raw), local=True, echo=lambda line: None)


def metrics(outcome, name="mine"):
    r = next(r for r in outcome.reports if r.target.name == name)
    return {a: (m.metrics.auc, m.metrics.tpr_at_fpr["1pct"]) for a, m in r.attacks.items()}


def test_a_checkpoint_trained_outside_raymia_is_audited_with_the_users_training_function(trained, tmp_path):
    own_model.CALLS.clear()
    out = audit(config(trained, tmp_path))
    report = out.reports[0]
    assert out.models.trained == 4  # the reference models; the target is never retrained
    # every reference model was trained by the user's function, on as many rows as the target
    assert len(own_model.CALLS) == 4 and all(abs(n - N_MEMBERS) <= 1 for n in own_model.CALLS)
    assert report.best_attack().metrics.auc > 0.6  # overfit on 200 rows: it leaks clearly
    # the loss attack's AUC is the one computed directly from the model's outputs
    ds, pool = trained["ds"], report.pool
    rows = pool.indices[pool.role_mask("target_members", "target_nonmembers")]
    with torch.no_grad():
        logits = trained["model"](torch.from_numpy(ds.x[pool.indices])).double()  # the rows it was asked about
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ds.y[pool.indices].astype("int64")),
                                             reduction="none").numpy()[np.isin(pool.indices, rows)]
    direct = roc_auc_score(np.isin(rows, trained["members"]), -loss)
    assert report.attacks["loss"].metrics.auc == pytest.approx(direct, abs=1e-9)
    # cached: a second audit trains nothing and calls the function no more
    again = audit(config(trained, tmp_path))
    assert again.models.trained == 0 and len(own_model.CALLS) == 4
    assert metrics(again) == metrics(out)
    run = mlflow.MlflowClient(out.tracking_uri).get_run(out.run_id)
    assert run.info.status == "FINISHED"


def test_the_same_weights_from_the_mlflow_registry_give_identical_metrics(trained, tmp_path):
    base = audit(config(trained, tmp_path))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("user-models")
    with mlflow.start_run() as run:
        mlflow.pytorch.log_state_dict(trained["model"].state_dict(), "weights")
    client = mlflow.MlflowClient()
    client.create_registered_model("my-classifier")
    v = client.create_model_version("my-classifier", f"{run.info.artifact_uri}/weights", run.info.run_id)
    client.set_registered_model_alias("my-classifier", "prod", v.version)
    via_registry = audit(config(trained, tmp_path, weights=None, model_uri="models:/my-classifier@prod"))
    assert metrics(via_registry) == metrics(base)
    mlflow.set_tracking_uri(None)


def test_a_pickled_mlflow_model_is_refused_unless_allowed(trained, tmp_path, capsys):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("user-models")
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(trained["model"], name="pickled", serialization_format="pickle")
    mlflow.set_tracking_uri(None)
    uri = f"runs:/{run.info.run_id}/pickled"
    raw = config(trained, tmp_path, weights=None, model_uri=uri)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["audit", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert "pickled PyTorch model" in err and "log_state_dict" in err and "Traceback" not in err
    raw["targets"][0]["allow_pickle"] = True
    out = audit(raw)
    assert out.reports[0].best_attack().metrics.auc > 0.6


class Toy(BaseHTTPRequestHandler):
    """A user's own prediction service for the trained model: JSON arrays in, probabilities out, with failure
    modes a test switches on (``server.mode``)."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        srv = self.server
        with srv.lock:  # concurrent requests: each sees its own number
            srv.requests += 1
            number = srv.requests
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        x = torch.tensor(body["instances"], dtype=torch.float32)
        with torch.no_grad():
            p = torch.softmax(srv.model(x).double(), dim=1).numpy()
        mode = srv.mode
        if mode == "flaky" and number == 1 or mode == "fail_after" and number > 3:
            return self._send(503, b'{"error": "overloaded"}')
        if mode == "malformed_after" and number > 3:
            return self._send(200, b"<html>oops</html>")
        if mode == "bad_sum":
            p = p * 2
        self._send(200, json.dumps({"probabilities": p.tolist()}).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def toy_server(trained):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Toy)
    srv.model, srv.mode, srv.requests, srv.lock = trained["model"], "ok", 0, threading.Lock()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def endpoint(srv, **kw) -> dict:
    return {"url": f"http://127.0.0.1:{srv.server_address[1]}/predict", "input_field": "instances",
            "input_format": "lists", "output_path": "probabilities", "output_kind": "probabilities",
            "batch_size": 100, "concurrency": 2, "timeout_s": 10, "retries": 2, "backoff_s": 0.05, **kw}


def test_a_black_box_endpoint_gives_the_checkpoint_audits_metrics(trained, tmp_path, toy_server):
    base = audit(config(trained, tmp_path))
    toy_server.mode = "flaky"  # the first request fails: retried
    raw = config(trained, tmp_path, weights=None, endpoint=endpoint(toy_server))
    out = audit(raw)
    got, want = metrics(out), metrics(base)
    for attack in want:  # probabilities -> log-probabilities: the same scores up to float rounding
        assert got[attack] == pytest.approx(want[attack], abs=1e-9), attack
    extra = out.reports[0].extra
    n_scored = len(out.reports[0].pool.indices)
    assert extra["endpoint.queries"] == n_scored and extra["endpoint.retries"] >= 1
    assert extra["endpoint.requests"] == toy_server.requests
    run = mlflow.MlflowClient(out.tracking_uri).search_runs(
        [mlflow.MlflowClient(out.tracking_uri).get_experiment_by_name("own").experiment_id],
        filter_string="tags.mlflow.runName = 'mine'", max_results=1)[0]
    assert run.data.metrics["endpoint.queries"] == n_scored and run.data.params["source"] == "endpoint"


BAD = {
    "weights of another width": ({"model": {"arch": "tests.own_model:build", "params": {"hidden": 128}}},
                                 "1.weight: checkpoint [256, 64] vs architecture [128, 64]"),
    "weights of another architecture": ({"model": {"arch": "mlp", "params": {"hidden": [256]}}}, "missing keys"),
    "a state dict for 5 classes": ("five_classes", "predicts 5 classes"),
    "a pickle instead of a state dict": ("pickle_file", "cannot read"),
    "members out of range": ("members_out_of_range", "outside the dataset's rows 0-1796"),
    "duplicated members": ("members_duplicated", "appear more than once"),
    "members overlapping the non-members": ("overlap", "both members and non-members"),
    "a training function that cannot be imported": ({"train": {"fn": "tests.no_such_module:fit"}},
                                                     "cannot import module 'tests.no_such_module'"),
    "a training function that returns nothing": ({"train": {"fn": "tests.own_model:fit_returns_nothing"}},
                                                 "returned NoneType; it must return the trained"),
    "an unreachable endpoint": ("unreachable", "is unreachable"),
    "an endpoint that starts failing mid-audit": ("fail_after", "answered HTTP 503"),
    "an endpoint that starts sending malformed JSON": ("malformed_after", "without a numeric array"),
    "probabilities that do not sum to 1": ("bad_sum", "sum to 2"),
    "a query budget too small": ("budget", "max_queries is 100"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_message_naming_the_field_and_exit_code_2(case, trained, tmp_path, toy_server, capsys):
    change, message = BAD[case]
    raw = config(trained, tmp_path)
    t, d = raw["targets"][0], trained["dir"]
    if isinstance(change, dict):
        t.update(change)
    elif change == "five_classes":
        save_file(own_model.build((1, 8, 8), 5).state_dict(), str(tmp_path / "five.safetensors"))
        t["weights"] = str(tmp_path / "five.safetensors")
    elif change == "pickle_file":
        torch.save(trained["model"], tmp_path / "whole.pt")  # the whole module, pickled
        t["weights"] = str(tmp_path / "whole.pt")
    elif change.startswith("members") or change == "overlap":
        rows = {"members_out_of_range": np.append(trained["members"], 5000),
                "members_duplicated": np.append(trained["members"], trained["members"][0])}.get(change)
        if rows is not None:
            np.save(tmp_path / "m.npy", rows)
            raw["split"]["members"] = str(tmp_path / "m.npy")
        else:
            np.save(tmp_path / "n.npy", trained["members"][:10])
            raw["split"]["nonmembers"] = str(tmp_path / "n.npy")
    else:
        del t["weights"]
        t["endpoint"] = endpoint(toy_server, **({"max_queries": 100} if change == "budget" else {}))
        if change == "unreachable":
            t["endpoint"]["url"] = "http://127.0.0.1:9/predict"
        toy_server.mode = change
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["audit", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert "raymia: error:" in err and message in err and "Traceback" not in err, err
    assert "targets.0" in err or "split." in err or "targets.mine" in err, err  # names the field
    if change in ("fail_after", "malformed_after") or case.startswith("a training function that returns"):
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("own").experiment_id],
                                  filter_string="tags.mlflow.runName = 'own'")
        assert runs and all(r.info.status == "FAILED" for r in runs)  # the parent run, never left RUNNING
        assert not list((tmp_path / "runs").glob("*/report.html"))  # nothing half-written


def test_the_readme_example_runs_as_written(tmp_path):
    """examples/own-model: train outside raymia with plain PyTorch, then the dozen-line config (README)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "own-model"
    for f in ("mymodel.py", "train.py", "audit.yaml"):
        shutil.copy(example / f, tmp_path / f)
    env = {**os.environ, "PYTHONPATH": "."}
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, check=True, timeout=300)
    raymia = str(Path(sys.executable).with_name("raymia"))
    done = subprocess.run([raymia, "audit", "audit.yaml", "--local", "--set", "reference.count=4"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mine" in done.stdout and "MLflow parent run:" in done.stdout
