"""infra/ validated offline: image and Ray versions agree with the installed Ray, the RayService's Serve config
is serve/config.yaml's and passes Ray's own schema, the cluster-launcher YAML passes Ray's validator."""

import re
import subprocess
import sys
from pathlib import Path

import ray
import yaml
from ray.serve.schema import ServeDeploySchema

import raymia

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_image_and_ray_versions_match_the_installed_ray():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    tags = set(re.findall(r"rayproject/ray:([\w.\-]+)", "".join(p.read_text() for p in INFRA.rglob("*.yaml"))))
    assert all(t.startswith(ray.__version__) for t in tags), tags
    for path in (INFRA / "kuberay").glob("*.yaml"):
        for doc in _docs(path):
            spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            assert spec["rayVersion"] == ray.__version__, path
    images = set(re.findall(r"image: (raymia:[\w.\-]+)", "".join(p.read_text() for p in INFRA.rglob("*.yaml"))))
    assert images == {f"raymia:{raymia.__version__}"}


def test_rayservice_runs_exactly_serve_config_yaml():
    assert subprocess.run([sys.executable, str(INFRA / "render_rayservice.py"), "--check"]).returncode == 0
    (service,) = _docs(INFRA / "kuberay" / "rayservice.yaml")
    v2 = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(v2)
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(local)
    for app_k8s, app_local in zip(v2["applications"], local["applications"], strict=True):
        assert app_k8s["deployments"] == app_local["deployments"]
        assert app_k8s["import_path"] == app_local["import_path"]
        assert {k: v for k, v in app_k8s["args"].items() if k != "tracking_uri"} == \
               {k: v for k, v in app_local["args"].items() if k != "tracking_uri"}
        assert app_k8s["args"]["tracking_uri"] == "http://mlflow:5000"


def test_cluster_launcher_config_passes_rays_validator():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((INFRA / "launcher" / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # fills the provider's defaults first, as `ray up` does
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    broken = {**cfg, "available_node_types": {**cfg["available_node_types"], "head": {"resources": {}}}}
    with pytest.raises(Exception):  # a node type without node_config is rejected
        validate_config(prepare_config(broken))


def test_mlflow_server_uses_postgres_and_s3_and_every_manifest_parses():
    docs = _docs(INFRA / "mlflow" / "mlflow.yaml")
    server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    command = " ".join(server["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "postgresql://" in command and "--artifacts-destination s3://" in command
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "mlflow" for d in docs)
    for path in INFRA.rglob("*.yaml"):
        assert all("kind" in d or "cluster_name" in d for d in _docs(path)), path


def test_local_services_bind_to_loopback_by_default():
    serve = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert serve["http_options"]["host"] == "127.0.0.1"
    assert "--host 127.0.0.1" in (REPO / "Makefile").read_text()
