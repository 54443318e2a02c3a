"""Ray Serve deployment of a registered champion behind DIFFENCE: real Serve, real HTTP on 127.0.0.1."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raymia.audit import run_audit
from raymia.config import parse_config
from raymia.registry import load_champion
from raymia.inference import ServiceKnobs, query_seed
from tests.conftest import diffence_champion_config

pytestmark = pytest.mark.ray
PORT, CLI_PORT = 18431, 18433
REPO = Path(__file__).resolve().parents[1]
URL, CLI_URL = f"http://127.0.0.1:{PORT}", f"http://127.0.0.1:{CLI_PORT}"
STOP_S = 5  # the most `serve run` may take to stop on SIGINT or SIGTERM


@pytest.fixture(scope="module")
def champion_audit(ray_local, tmp_path_factory):
    """A tiny audit with DIFFENCE whose champion is registered in a temporary MLflow store: (raw config, outcome)."""
    raw = diffence_champion_config(tmp_path_factory.mktemp("serve"), "serve-test")
    return raw, run_audit(parse_config(raw), echo=lambda line: None)


@pytest.fixture(scope="module")
def champion(champion_audit):
    return {"model_uri": "models:/serve-test@champion", "tracking_uri": champion_audit[1].tracking_uri}


def config_for(champion, user_config, port=PORT):
    """serve/config.yaml with the test store, a test port, one replica and the given knobs."""
    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["name"] = "raymia-test"
    app["args"].update(champion)
    app["deployments"][0]["user_config"] = user_config
    app["deployments"][0]["autoscaling_config"]["max_replicas"] = 1
    return cfg


def deploy(champion, user_config):
    """Deploy serve/config.yaml (test store, port and knobs) the way `serve deploy` does: through the controller."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config_for(champion, user_config)),
                                     _blocking=True)


def serve_run(champion, tmp, port):
    """`serve run` of serve/config.yaml as the docs give it (its own local Ray), once /v1/model answers."""
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(config_for(champion, {"n": 2, "scenario": 3}, port)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}
    log = open(tmp / "serve-run.log", "w+")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", "--address", "local", str(config)],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=5).ok:
                return proc, log
        except requests.RequestException:
            pass
        time.sleep(1)
    _kill_group(proc)
    log.seek(0)
    pytest.fail(f"serve run did not come up:\n{log.read()[-3000:]}")


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session `serve run` started: its local Ray, nothing else
    except ProcessLookupError:
        pass


def assert_stops_cleanly(proc, log, sig):
    """Send ``sig``; `serve run` must exit within STOP_S seconds without Ray's abort."""
    start = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(STOP_S)
    except subprocess.TimeoutExpired:
        pass
    took = time.monotonic() - start
    _kill_group(proc)
    log.seek(0)
    out = log.read()
    assert took <= STOP_S and proc.returncode is not None, f"still running {took:.1f} s after {sig.name}"
    assert proc.returncode not in (-signal.SIGABRT, 134) and "Aborted" not in out and "SIGTERM received" not in out, \
        out[-2000:]


@pytest.fixture(scope="module")
def service(champion):
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    deploy(champion, {"n": 4, "scenario": 3, "seed": 7})
    yield champion
    serve.delete("raymia-test")
    serve.shutdown()


@pytest.fixture(scope="module")
def cli_service(champion, tmp_path_factory):
    """`serve run` in a subprocess; its cleanup proves the clean stop on SIGTERM."""
    proc, log = serve_run(champion, tmp_path_factory.mktemp("serve-run"), CLI_PORT)
    yield CLI_URL
    assert_stops_cleanly(proc, log, signal.SIGTERM)


def _post(payload, url=URL, **kw):
    return requests.post(f"{url}/v1/predict", data=payload if isinstance(payload, (bytes, str)) else json.dumps(payload),
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
    np.testing.assert_allclose([p["probabilities"] for p in again["predictions"]], served[:3], atol=2e-6)  # float
    # rounding of a batch of 3 vs 12 may move the 6th decimal; other noise would move the 2nd


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
     ' 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]}', 422,
     "inputs[0][0]"),
    ({"inputs": [[0.0] * 3 + [1e308] + [0.0] * 60]}, 422, "inputs[0][3]"),  # finite, but not as float32
    ({"inputs": [[[[0.0] * 8] * 7 + [[0.0] * 7 + [-1e39]]]]}, 422, "inputs[0][0][7][7]"),
    ('{"inputs": [[' + "1" * 5000 + "]]}", 400, "body"),  # beyond Python's int-parsing digit limit
    ("[" * 100_000 + "]" * 100_000, 400, "body"),  # deeper than any JSON parser's recursion
    ({"inputs": [[[[[0.0]]]] * 64]}, 422, "inputs[0]"),
    ({"inputs": [[True] * 64]}, 422, "inputs[0]"),
    ({"inputs": [[10**30] * 63 + [10**400]]}, 422, "inputs[0]"),
    ({"tensor": {"data": "%%", "shape": [1, 64]}}, 422, "tensor.data"),
    ({"tensor": {"data": base64.b64encode(b"\0" * 12).decode(), "shape": [1, 64]}}, 422, "tensor.data"),
    ({"tensor": {"data": "", "shape": [1, 65]}}, 422, "tensor.shape"),
    ({"tensor": {"data": "", "shape": [0, 64]}}, 422, "tensor.shape"),
    ({"tensor": {"data": base64.b64encode(np.full(64, np.inf, "<f4").tobytes()).decode(), "shape": [1, 64]}}, 422,
     "tensor.data"),
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


def test_compact_tensor_form_answers_as_the_json_arrays_do(service, digits):
    x = digits.x[:5]
    tensor = {"data": base64.b64encode(x.astype("<f4").tobytes()).decode(), "shape": list(x.shape)}
    compact, arrays = _post({"tensor": tensor}), _post({"inputs": x.tolist()})
    assert compact.status_code == 200, compact.text
    assert compact.json()["predictions"] == arrays.json()["predictions"]
    assert "compute;dur=" in compact.headers["server-timing"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_under_another_content_type_is_415(service, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = requests.post(f"{URL}/v1/predict", data=json.dumps({"inputs": [[0.5] * 64]}), headers=headers, timeout=60)
    assert r.status_code == 415 and r.json()["field"] == "content-type", r.text
    assert requests.post(f"{URL}/v1/predict", json={"inputs": [[0.5] * 64]},
                         headers={"content-type": "application/json; charset=utf-8"}, timeout=60).status_code == 200


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
    assert meta["inference_defense"]["scenario"] == 3 and meta["inference_defense"]["seed"] == 7
    assert meta["max_batch_size"] == 64 and meta["input_forms"] == ["inputs", "images", "tensor"]
    assert requests.get(f"{URL}/-/healthz", timeout=30).status_code == 200
    assert requests.get(f"{URL}/openapi.json", timeout=30).status_code == 200
    deploy(service, {"n": 6, "scenario": 3, "seed": 7})
    after = requests.get(f"{URL}/v1/model", timeout=30).json()
    assert after["inference_defense"]["n"] == 6 and after["replica_pid"] == meta["replica_pid"]
    assert _post({"inputs": [[0.5] * 64]}).status_code == 200  # and it answers with the new knobs


def _attack_metrics(outcome, name):
    report = next(r for r in outcome.reports if r.target.name == name)
    return {a: (r.metrics.auc, r.metrics.tpr_at_fpr["1pct"]) for a, r in report.attacks.items()}


def test_auditing_the_deployment_over_http_gives_the_in_process_audits_numbers(service, champion_audit):
    """The champion behind DIFFENCE, audited as a black box through its own /v1/predict, against reference models
    queried through the same DIFFENCE: the in-process audit's ``+diffence`` numbers; with n = 0 the undefended
    ones."""
    raw, outcome = champion_audit
    audit_knobs = raw["diffence"]
    deploy(service, {"n": audit_knobs["n"], "scenario": audit_knobs["scenario"], "seed": 0})
    meta = requests.get(f"{URL}/v1/model", timeout=30).json()
    http = {**raw, "name": "over-http", "champion": None,
            "cache": {"uri": str(Path(raw["output_dir"]) / "cache")},  # the same reference models and UNet
            "tracking": {**raw["tracking"], "experiment": "over-http"},
            "targets": [{**raw["targets"][0], "endpoint": {"url": f"{URL}/v1/predict", "batch_size": 50}}],
            "diffence": {**audit_knobs, "interval": meta["inference_defense"]["interval"]}}
    try:
        defended = run_audit(parse_config(http), local=True, echo=lambda line: None)
        want, got = _attack_metrics(outcome, "mlp+diffence"), _attack_metrics(defended, "mlp+diffence")
        for attack in want:  # float rounding of the server's batches vs the audit's chunks: the 5th decimal at most
            assert got[attack] == pytest.approx(want[attack], abs=1e-4), attack
        assert defended.reports[0].extra["endpoint.queries"] == len(defended.reports[0].pool.indices)
        deploy(service, {"n": 0})
        plain = run_audit(parse_config({**http, "diffence": None}), local=True, echo=lambda line: None)
        want, got = _attack_metrics(outcome, "mlp"), _attack_metrics(plain, "mlp")
        for attack in want:
            assert got[attack] == pytest.approx(want[attack], abs=1e-4), attack
    finally:
        deploy(service, {"n": 4, "scenario": 3, "seed": 7})


# ---- property-based: every request a client can send is answered 200 or 4xx, and the replica keeps serving ----

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.sampled_from([1e308, -1e39, 2**70, 10**400])
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=16)


def from_schema(schema):
    """A Hypothesis strategy for a (ref-free) JSON schema as FastAPI publishes it: types, anyOf, properties."""
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object":
        props = {k: from_schema(v) for k, v in schema.get("properties", {}).items()}
        return st.fixed_dictionaries({}, optional=props)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0), max_size=5)
    if kind == "string":
        return st.text(max_size=12) | st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
    if kind == "integer":
        return st.integers(-3, 300) | st.integers()
    if kind == "number":
        return st.floats()
    if kind == "null":
        return st.none()
    return JSON_VALUES


def _valid_bodies():
    row = st.lists(st.floats(0, 1, width=32), min_size=64, max_size=64)
    arrays = st.lists(row, min_size=1, max_size=3).map(lambda rows: {"inputs": rows})
    tensor = st.lists(row, min_size=1, max_size=3).map(lambda rows: {"tensor": {
        "data": base64.b64encode(np.asarray(rows, "<f4").tobytes()).decode(), "shape": [len(rows), 64]}})
    return arrays | tensor


@st.composite
def mutated(draw, bodies):
    """A valid body with one node replaced, dropped or wrapped, or its encoded bytes cut or corrupted."""
    body = draw(bodies)
    paths, stack = [], [((), body)]
    while stack:
        path, node = stack.pop()
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend(((*path, k), v) for k, v in children)
    path = draw(st.sampled_from(paths[1:]))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(["replace", "drop", "wrap", "deep", "bytes"]))
    if how == "replace":
        parent[path[-1]] = draw(JSON_VALUES)
    elif how == "drop":
        del parent[path[-1]]
    elif how == "wrap":
        parent[path[-1]] = [parent[path[-1]]]
    elif how == "deep":
        parent[path[-1]] = json.loads("[" * 900 + "0" + "]" * 900)
    raw = json.dumps(body).encode()
    if how == "bytes":
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=8)) + raw[cut + draw(st.integers(0, 4)):]
    return raw


def _assert_answered(r):
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["error"], r.text


def test_no_generated_or_mutated_request_gets_a_500(cli_service):
    schema = requests.get(f"{cli_service}/openapi.json", timeout=30).json()["paths"]["/v1/predict"]["post"]
    from_api = from_schema(schema["requestBody"]["content"]["application/json"]["schema"])
    requests_ = st.one_of(from_api.map(lambda b: json.dumps(b).encode()), mutated(_valid_bodies()),
                          _valid_bodies().map(lambda b: json.dumps(b).encode()), st.binary(max_size=64))
    content_types = st.sampled_from(["application/json"] * 6 + ["text/plain", "application/json; charset=latin-1",
                                                                "", "application/octet-stream"])
    session = requests.Session()

    @settings(max_examples=70, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(raw=requests_, content_type=content_types)
    def one(raw, content_type):
        _assert_answered(session.post(f"{cli_service}/v1/predict", data=raw, headers={"content-type": content_type},
                                      timeout=60))

    one()
    assert _post({"inputs": [[0.5] * 64]}, url=cli_service).status_code == 200  # the replica kept serving


@pytest.mark.slow
def test_serve_run_stops_cleanly_on_sigint(champion, tmp_path):
    proc, log = serve_run(champion, tmp_path, CLI_PORT + 1)
    assert _post({"inputs": [[0.5] * 64]}, url=f"http://127.0.0.1:{CLI_PORT + 1}").status_code == 200
    assert_stops_cleanly(proc, log, signal.SIGINT)


def test_prometheus_metrics_count_requests_latency_and_batch_sizes(service):
    """Runs after the tests above have sent 200s and 4xxs; Ray's metrics agent exports them every few seconds."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ['ray_raymia_predict_requests_total{', 'status="200"', 'status="422"', "ray_raymia_batch_inputs_bucket",
              'ray_raymia_predict_stage_ms_bucket{', 'stage="queue"', "ray_serve_num_http_requests_total",
              "ray_serve_http_request_latency_ms_bucket", "ray_raymia_batch_requests_bucket"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    assert [w for w in wanted if w not in text] == []
