"""Ray Serve: the champion classifier behind DIFFENCE as a batched, hardened HTTP deployment.

    serve run serve/config.yaml          (local)      serve deploy serve/config.yaml   (a ``ray start`` cluster)

The classifier comes from the MLflow Model Registry (``models:/<name>@champion``), the diffusion model from the
audit run that produced it, both read through :func:`raymia.registry.load_champion` (tensors only; nothing is
unpickled). DIFFENCE's knobs (N, T', scenario, interval, noise mode, seed) are the deployment's
``user_config``, so ``serve deploy`` with new values reconfigures replicas without restarting them.

Every query's noise is seeded from the service seed and the query's bytes, so the response to an input does not
depend on what else shares its batch, and repeating a query returns the same regeneration (an attacker cannot
average DIFFENCE's randomness away).

HTTP API (FastAPI; OpenAPI at ``/docs`` and ``/openapi.json``):

- ``POST /v1/predict`` ``{"inputs": [[...], ...]}`` (arrays in the model's input shape) or ``{"images": [base64
  PNG, ...]}`` -> per input ``label`` and ``probabilities``, plus ``model_version`` and ``batch_size`` (how many
  inputs the replica processed together: batching is observable);
- ``GET /v1/model`` -> dataset, classes, input shape, defense configuration, MLflow run id;
- ``/-/healthz`` (Serve's own).

Bad input gets a 4xx JSON ``{"error": ..., "field": ...}``; the replica keeps serving.
"""


# No "from __future__ import annotations": FastAPI must see the real Request type on the ingress methods.
import base64
import binascii
import hashlib
import io
import json
import os
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field
from ray import serve
from scipy.special import softmax

from raymia.defenses.diffence import Diffence, DiffenceConfig
from raymia.diffusion.model import make_noise_schedule
from raymia.registry import Champion, load_champion

MAX_BATCH = 64


class ServiceKnobs(DiffenceConfig):
    """The deployment's ``user_config``: DIFFENCE's knobs (:class:`~raymia.defenses.diffence.DiffenceConfig`, with
    its defaults) plus the interval to select in. ``n: 0`` serves the undefended classifier; ``interval: null``
    with scenario 1 or 2 uses the one the audit calibrated for this classifier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # tighter bounds than the audit's: a replica bounds the work one request can ask for
    n: int = Field(30, ge=0, le=256, description="candidates per query (0: the undefended output)")
    t_prime: int = Field(160, ge=1, le=999, description="forward-noising step T' of the 1000-step schedule")
    interval: tuple[float, float] | None = None


class BadInput(Exception):
    """A client error: HTTP ``status``, the offending ``field`` and a message saying what is expected."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


api = FastAPI(title="raymia defended classifier", version="1",
              description="A classifier behind DIFFENCE, served by Ray Serve. See raymia/serving.py.")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return JSONResponse(status_code=422, content={"error": first.get("msg", "invalid"), "field": field})


def _error(exc: BadInput) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"error": exc.message, "field": exc.field})


def query_seed(service_seed: int, x: np.ndarray) -> int:
    """A 31-bit seed from the service seed and the query's float32 bytes."""
    digest = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes() + service_seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest()[:4], "little") & 0x7FFFFFFF


def parse_inputs(body: Any, input_shape: tuple[int, ...], max_inputs: int) -> np.ndarray:
    """Validate a decoded JSON body into float32 ``[B, *input_shape]`` or raise :class:`BadInput`."""
    if not isinstance(body, dict):
        raise BadInput(422, "body", 'expected a JSON object like {"inputs": [...]} or {"images": [...]}')
    unknown = set(body) - {"inputs", "images"}
    if unknown:
        raise BadInput(422, sorted(unknown)[0], "unknown field; send inputs or images")
    if ("inputs" in body) == ("images" in body):
        raise BadInput(422, "inputs", "send exactly one of inputs (arrays) or images (base64 PNG)")
    field = "inputs" if "inputs" in body else "images"
    items = body[field]
    if not isinstance(items, list):
        raise BadInput(422, field, "expected a list")
    if not items:
        raise BadInput(422, field, "empty batch: send at least one input")
    if len(items) > max_inputs:
        raise BadInput(413, field, f"{len(items)} inputs; at most {max_inputs} per request")
    out = np.empty((len(items), *input_shape), dtype=np.float32)
    for i, item in enumerate(items):
        out[i] = (_parse_array if field == "inputs" else _parse_image)(item, input_shape, f"{field}[{i}]")
    return out


def _parse_array(item: Any, shape: tuple[int, ...], field: str) -> np.ndarray:
    try:
        arr = np.asarray(item, dtype=np.float64)
    except (ValueError, TypeError):
        raise BadInput(422, field, f"expected numbers in shape {list(shape)}") from None
    if arr.shape != shape:
        if arr.size == int(np.prod(shape)) and arr.ndim >= 1 and arr.dtype != object:
            arr = arr.reshape(shape)
        else:
            raise BadInput(422, field, f"expected shape {list(shape)} (or {int(np.prod(shape))} flat values), "
                                       f"got {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise BadInput(422, field, "NaN or infinite values are not allowed")
    return arr.astype(np.float32)


def _parse_image(item: Any, shape: tuple[int, ...], field: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(item, str):
        raise BadInput(422, field, "expected a base64-encoded PNG string")
    try:
        raw = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(422, field, "not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError):
        raise BadInput(422, field, "not a decodable image (send a PNG)") from None
    c, h, w = shape
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        raise BadInput(422, field, f"expected a {w}x{h} image, got {img.size[0]}x{img.size[1]}")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


@serve.deployment(max_ongoing_requests=2 * MAX_BATCH, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class DefendedClassifier:
    """One replica: the classifier behind DIFFENCE, with batched inference."""

    def __init__(self, model_uri: str, tracking_uri: str | None = None, batching: bool = True,
                 max_inputs_per_request: int = 256, max_body_bytes: int = 4 * 2**20):
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.bundle: Champion = load_champion(model_uri, tracking_uri=tracking_uri)
        self.batching, self.max_inputs, self.max_body = batching, max_inputs_per_request, max_body_bytes
        if self.bundle.unet is None:
            self.knobs = ServiceKnobs(n=0)  # the audit had no DIFFENCE: serve the classifier as is
        else:
            self.knobs = ServiceKnobs(scenario=1 if self.bundle.interval else 3)
        self.defended = self._build(self.knobs)

    def _build(self, knobs: ServiceKnobs) -> Diffence:
        if knobs.n > 0 and self.bundle.unet is None:
            raise ValueError("user_config asks for DIFFENCE (n > 0) but the model's audit logged no diffusion model")
        if knobs.n > 0 and knobs.scenario != 3 and knobs.interval is None:
            if self.bundle.interval is None:
                raise ValueError("DIFFENCE scenarios 1 and 2 need user_config.interval [a, b] (the audit logs it as "
                                 "diffence.interval_low / diffence.interval_high on the +diffence run)")
            knobs = knobs.model_copy(update={"interval": self.bundle.interval})
        abar = make_noise_schedule(self.bundle.diffusion_spec).alphas_cumprod
        unet = self.bundle.unet if self.bundle.unet is not None else torch.nn.Identity()
        return Diffence(self.bundle.classifier.model, unet, abar, knobs, knobs.interval)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new DIFFENCE knobs without restarting the replica (invalid ones keep the old and raise)."""
        knobs = ServiceKnobs.model_validate(user_config or {})
        self.defended = self._build(knobs)
        self.knobs = knobs if knobs.interval is not None or knobs.scenario == 3 else \
            knobs.model_copy(update={"interval": self.defended.interval})

    def _run(self, x: np.ndarray) -> np.ndarray:
        seeds = [query_seed(self.knobs.seed, row) for row in x]
        return self.defended(x, seeds=seeds)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.01)
    async def _batched(self, chunks: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        x = np.concatenate(chunks)
        logits = self._run(x)
        bounds = np.cumsum([0] + [len(c) for c in chunks])
        return [(logits[a:b], len(x)) for a, b in zip(bounds[:-1], bounds[1:])]

    @api.post("/v1/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            size = int(request.headers.get("content-length") or 0)
            if size > self.max_body:
                raise BadInput(413, "body", f"request body of {size} bytes; at most {self.max_body}")
            raw = await request.body()
            if len(raw) > self.max_body:
                raise BadInput(413, "body", f"request body of {len(raw)} bytes; at most {self.max_body}")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadInput(400, "body", "not valid JSON") from None
            x = parse_inputs(body, self.bundle.classifier.input_shape, self.max_inputs)
        except BadInput as exc:
            return _error(exc)
        if self.batching:
            logits, batch = await self._batched(x)
        else:
            logits, batch = self._run(x), len(x)
        p = softmax(logits.astype(np.float64), axis=1)
        return JSONResponse({
            "model_version": self.bundle.version,
            "batch_size": int(batch),
            "predictions": [{"label": int(row.argmax()), "probabilities": row.round(6).tolist()} for row in p],
        })

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        b = self.bundle
        return {"model_version": b.version, "mlflow_run_id": b.run_id, "dataset": b.dataset,
                "classes": list(range(b.classifier.num_classes)), "input_shape": list(b.classifier.input_shape),
                "training_defense": b.defense, "inference_defense": self.knobs.model_dump(mode="json"),
                "batching": self.batching, "replica_pid": os.getpid()}


def app_builder(args: dict[str, Any]) -> Any:
    """``import_path: raymia.serving:app_builder``; ``args``: model_uri, tracking_uri, batching,
    max_inputs_per_request, max_body_bytes, gpu_fraction (``auto``: 0.5 of a GPU when the cluster has one)."""
    import ray

    opts = dict(args or {})
    gpu = opts.pop("gpu_fraction", "auto")
    if gpu == "auto":
        gpu = 0.5 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    deployment = DefendedClassifier.options(ray_actor_options={"num_cpus": 1, "num_gpus": float(gpu)})
    try:
        return deployment.bind(**opts)
    except TypeError as exc:
        raise ValueError(f"bad application args: {exc}") from None

