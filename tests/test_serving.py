"""Ray Serve deployment of a registered champion behind DIFFENCE: real Serve, real HTTP on 127.0.0.1."""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from raymia.audit import run_audit
from raymia.config import parse_config
from raymia.registry import load_champion
from raymia.serving import ServiceKnobs, query_seed
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray
PORT = 18431
REPO = Path(__file__).resolve().parents[1]
URL = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def champion(ray_local, tmp_path_factory):
    """A tiny audit with DIFFENCE whose champion is registered in a temporary MLflow store."""
    tmp = tmp_path_factory.mktemp("serve")
    raw = tiny_config(tmp)
    raw["targets"] = [{"name": "mlp", "model": {"arch": "mlp", "params": {"hidden": [64]}}, "train": {"epochs": 20}}]
    raw["split"] = {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.27, "calibration": 0.05,
                    "calibration_members": 0.08, "test": 0.10}
    raw["reference"] = {"count": 2}
    raw["diffence"] = {"n": 2, "scenario": 1, "train": {"steps": 30}}
    raw["attacks"] = {"enabled": ["loss", "rmia_online"], "rmia": {"num_z": 20}}
    raw["frontier"] = {"leakage": "auc"}
    raw["champion"] = {"rule": "min_leakage", "max_accuracy_drop": 0.5, "registry_name": "serve-test"}
    outcome = run_audit(parse_config(raw), echo=lambda line: None)
    return {"model_uri": "models:/serve-test@champion", "tracking_uri": outcome.tracking_uri}


def deploy(champion, user_config):
    """Deploy serve/config.yaml (test store, port and knobs) the way `serve deploy` does: through the controller."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    cfg["http_options"]["port"] = PORT
    app = cfg["applications"][0]
    app["name"] = "raymia-test"
    app["args"].update(champion)
    app["deployments"][0]["user_config"] = user_config
    app["deployments"][0]["autoscaling_config"]["max_replicas"] = 1
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=True)


@pytest.fixture(scope="module")
def service(champion):
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    deploy(champion, {"n": 4, "scenario": 3, "seed": 7})
    yield champion
    serve.delete("raymia-test")
    serve.shutdown()


def _post(payload, **kw):
    return requests.post(f"{URL}/v1/predict", data=payload if isinstance(payload, (bytes, str)) else json.dumps(payload),
                         headers={"content-type": "application/json"}, timeout=60, **kw)


def test_responses_equal_in_process_diffence_and_keep_labels(service, digits):
    x = digits.x[:12]
    r = _post({"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"].startswith("serve-test/") and len(body["predictions"]) == 12
    bundle = load_champion(service["model_uri"], tracking_uri=service["tracking_uri"])
    from raymia.defenses.diffence import Diffence
    from raymia.diffusion.model import make_noise_schedule

    knobs = ServiceKnobs(n=4, scenario=3, seed=7)
    local = Diffence(bundle.classifier.model, bundle.unet, make_noise_schedule(bundle.diffusion_spec).alphas_cumprod,
                     knobs)
    logits = local(x, seeds=[query_seed(7, row) for row in x])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    served = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(served, probs, atol=2e-6)
    plain = bundle.classifier.model(__import__("torch").from_numpy(x)).argmax(1).numpy()
    assert [p["label"] for p in body["predictions"]] == plain.tolist()
    again = _post({"inputs": x[:3].tolist()}).json()  # same query, same answer, whatever else is batched with it
    assert [p["probabilities"] for p in again["predictions"]] == [p["probabilities"] for p in body["predictions"][:3]]


def _png(arr, size=(8, 8)):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.asarray(arr) * 255).astype(np.uint8).reshape(size), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_png_images_are_accepted(service, digits):
    r = _post({"images": [_png(digits.x[i, 0]) for i in range(3)]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3


@pytest.mark.parametrize(("payload", "status", "field"), [
    ({"inputs": [[0.0] * 5]}, 422, "inputs[0]"),
    ({"inputs": [[["a"] * 8] * 8]}, 422, "inputs[0]"),
    ('{"inputs": [[NaN, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,'
     ' 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]}', 422, "inputs[0]"),
    ({"inputs": []}, 422, "inputs"),
    ({"inputs": [[0.0] * 64] * 300}, 413, "inputs"),
    ("this is not json", 400, "body"),
    ({"images": ["%%%not-base64%%%"]}, 422, "images[0]"),
    ({"images": [base64.b64encode(b"plain text, not an image").decode()]}, 422, "images[0]"),
    ({"images": ["iVBORw0KGgo="]}, 422, "images[0]"),
    ({"inputs": [[0.0] * 64], "extra": 1}, 422, "extra"),
    ({"pixels": [[0.0] * 64]}, 422, "pixels"),
])
def test_bad_input_gets_a_4xx_naming_the_field_and_service_continues(service, payload, status, field):
    r = _post(payload)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"]
    assert _post({"inputs": [[0.5] * 64]}).status_code == 200


def test_oversized_body_is_rejected(service):
    r = _post(b'{"inputs": [' + b"0.0," * 1_200_000 + b"0.0]}")
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_concurrent_burst_is_answered_and_batched(service, digits):
    def one(i):
        return _post({"inputs": [digits.x[i % 100].reshape(-1).tolist()]})
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(96)))
    assert all(r.status_code == 200 for r in responses)
    assert max(r.json()["batch_size"] for r in responses) > 1  # requests shared a replica batch


def test_metadata_health_and_reconfigure_without_restart(service):
    meta = requests.get(f"{URL}/v1/model", timeout=30).json()
    assert meta["input_shape"] == [1, 8, 8] and meta["inference_defense"]["n"] == 4 and meta["dataset"] == "digits"
    assert requests.get(f"{URL}/-/healthz", timeout=30).status_code == 200
    assert requests.get(f"{URL}/openapi.json", timeout=30).status_code == 200
    deploy(service, {"n": 6, "scenario": 3, "seed": 7})
    after = requests.get(f"{URL}/v1/model", timeout=30).json()
    assert after["inference_defense"]["n"] == 6 and after["replica_pid"] == meta["replica_pid"]
