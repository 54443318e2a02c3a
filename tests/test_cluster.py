"""raymia as a distributed system: a real two-node Ray cluster on 127.0.0.1 (head + worker, ``ray start``) and a
real ``mlflow server``; audits submitted with ``ray job submit`` or run as drivers; faults injected for real —
the MLflow server stopped, the worker node killed, the driver killed. Everything started is stopped by PID."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))
from local_cluster import LocalCluster  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c.start()
    finally:
        c.stop()


def _children(client: MlflowClient, run_id: str) -> list:
    parent = client.get_run(run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")


def _parent_id(output: str) -> str:
    return re.findall(r"MLflow parent run: (\w+)", output)[-1]  # the summary's last line


def _sweep_config(path: Path, cluster: LocalCluster, name: str, *, uris: bool = False) -> Path:
    """A four-configuration sweep; with ``uris`` its cache and Tune storage are given as ``file://`` URIs (the
    pyarrow.fs path an ``s3://`` bucket takes too)."""
    cfg = {"name": name, "data": {"dataset": "digits"},
           "sweep": {"base": {"model": {"arch": "mlp", "params": {"hidden": [64]}},
                              "train": {"epochs": 10, "batch_size": 64}},
                     "defenses": [{"name": "none"}, {"name": "label_smoothing", "epsilon": 0.1},
                                  {"name": "relaxloss", "alpha": {"grid": [0.05, 0.5]}}]},
           "reference": {"count": 2}, "attacks": {"enabled": ["loss", "lira_offline"]},
           "frontier": {"leakage": "auc"},
           "tracking": {"uri": cluster.tracking_uri, "experiment": name},
           "output_dir": str(path / "runs"),
           "cache": {"uri": (path / "cache").as_uri() if uris else str(path / "cache")},
           **({"ray": {"storage_path": (path / "tune").as_uri()}} if uris else {})}
    f = path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def _driver(config: Path, cluster: LocalCluster) -> subprocess.Popen:
    """``raymia audit`` as a driver joining the cluster (as a job's driver does, through RAY_ADDRESS)."""
    env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.ports.gcs}",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # retry every 1, 2, 4, ... s (default factor 2)
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "audit.py"), str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_line(proc: subprocess.Popen, needle: str, lines: list[str], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return
        assert time.time() < deadline, "".join(lines)
    raise AssertionError(f"the driver ended before printing {needle!r}:\n{''.join(lines)}")


def test_quickstart_job_uses_both_nodes_and_lands_in_the_mlflow_server(cluster, tmp_path):
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", cluster.dashboard, "--",
         sys.executable, str(REPO / "jobs" / "audit.py"), str(REPO / "configs" / "quickstart.yaml"),
         "--set", f"tracking.uri={cluster.tracking_uri}", "--set", f"output_dir={tmp_path / 'runs'}",
         "--set", "reference.count=4"],
        env=cluster.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f":{cluster.ports.gcs} (2 CPUs" in proc.stdout  # the job joined this two-node cluster
    run_id = proc.stdout.split("MLflow parent run: ")[-1].split()[0]
    client = MlflowClient(cluster.tracking_uri)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["cluster.nodes_used"] == 2  # trials ran on the head and on the worker
    children = _children(client, run_id)
    assert sorted(c.info.run_name for c in children) == ["overfit", "regularized"]
    for child in children:
        assert child.info.status == "FINISHED" and "mia.best.auc" in child.data.metrics
        plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}  # uploaded through the server
        assert any(p.startswith("plots/roc") for p in plots), plots


def test_killed_driver_resumes_where_it_stopped(cluster, tmp_path):
    config = _sweep_config(tmp_path, cluster, "resume", uris=True)
    lines: list[str] = []
    proc = _driver(config, cluster)
    _wait_for_line(proc, "[2/", lines)  # two configurations finished
    time.sleep(12)  # Tune saves its experiment state every few seconds
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run([sys.executable, str(REPO / "jobs" / "audit.py"), str(config)],
                           env={**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.ports.gcs}"},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the interrupted sweep in file://" in again.stderr
    client = MlflowClient(cluster.tracking_uri)
    parent = client.get_run(_parent_id(again.stdout))
    assert parent.data.metrics["configurations.restored"] >= 2
    assert parent.data.metrics["models.trained"] <= 2 * 3  # only what the killed driver had not finished
    children = _children(client, parent.info.run_id)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)


def test_sweep_survives_losing_a_node_and_the_mlflow_server(cluster, tmp_path):
    """Runs last: it kills the worker. The MLflow server goes away as training starts and comes back only after
    every trial has finished (the driver is then retrying its logging calls); the worker node is killed after the
    first trial, so its running trial is retried on the head. Exactly one finished child run per configuration."""
    config = _sweep_config(tmp_path, cluster, "faults")
    lines: list[str] = []
    proc = _driver(config, cluster)
    _wait_for_line(proc, "Ray at", lines)
    cluster.stop_mlflow()
    _wait_for_line(proc, "[1/", lines)
    cluster.kill_worker()
    cluster.wait_for_nodes(1, timeout=120)  # Ray has noticed: only the head is left
    _wait_for_line(proc, "[4/", lines)  # all four configurations trained: the driver now logs to MLflow
    time.sleep(10)
    assert proc.poll() is None  # still retrying, not failed
    cluster.restart_mlflow()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, "".join(lines) + out
    client = MlflowClient(cluster.tracking_uri)
    children = _children(client, _parent_id(out))
    names = [c.info.run_name for c in children]
    assert len(names) == 4 and len(set(names)) == 4, names
    assert all(c.info.status == "FINISHED" for c in children)
