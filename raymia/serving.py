"""Ray Serve: the champion classifier behind DIFFENCE as a batched, hardened HTTP deployment.

    serve run serve/config.yaml          (local)      serve deploy serve/config.yaml   (a ``ray start`` cluster)

The model and request parsing are :mod:`raymia.inference`'s (Ray-free); this module adds the HTTP routes, dynamic
batching (:class:`Batcher`) and the Prometheus metrics. DIFFENCE's knobs are the deployment's ``user_config``, so
``serve deploy`` with new values reconfigures replicas without restarting them; the batch size and wait are the
application's ``args``.

HTTP API (FastAPI; OpenAPI at ``/docs`` and ``/openapi.json``):

- ``POST /v1/predict`` (``Content-Type: application/json``) with ``inputs``, ``images`` or ``tensor`` (see
  :mod:`raymia.inference`) -> per input ``label`` and ``probabilities``, plus ``model_version`` and ``batch_size``
  (inputs the replica processed together); a ``Server-Timing`` header says where the replica's time went;
- ``GET /v1/model`` -> dataset, classes, input shape, the DIFFENCE knobs and batching in effect, MLflow run id;
- ``/-/healthz`` (Serve's own).

Bad input gets a 4xx JSON ``{"error": ..., "field": ...}``; only a bug in this code is a (logged) 500.
"""


# No "from __future__ import annotations": FastAPI must see the real Request type on the ingress methods.
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.util.metrics import Counter, Histogram

from raymia.inference import (BadInput, DefendedModel, PredictRequest, ServiceKnobs, check_content_type, error_body,
                              parse_request, read_body)

MAX_BATCH = 64  # requests per replica batch (the largest allowed; args.max_batch_size tunes it down)
log = logging.getLogger("ray.serve")

api = FastAPI(title="raymia defended classifier", version="1",
              description="A classifier behind DIFFENCE, served by Ray Serve. See raymia/serving.py.")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return JSONResponse(status_code=422, content={"error": first.get("msg", "invalid"), "field": field})


def inline_refs(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """A JSON schema with its ``$defs`` references replaced by their definitions (for OpenAPI's ``openapi_extra``)."""
    if defs is None and isinstance(schema, dict):
        defs = schema.get("$defs", {})
    if isinstance(schema, dict):
        if "$ref" in schema:
            return inline_refs(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
        return {k: inline_refs(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [inline_refs(v, defs) for v in schema]
    return schema


PREDICT_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": inline_refs(PredictRequest.model_json_schema())}}}}


def _metrics() -> dict[str, Any]:
    ms = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
    return {
        "requests": Counter("raymia_predict_requests", description="POST /v1/predict answers by HTTP status",
                            tag_keys=("status",)),
        "stage_ms": Histogram("raymia_predict_stage_ms", description="replica time per request by stage: receive "
                              "(the body, from Serve's proxy), parse, queue (waiting for the batch), compute "
                              "(DIFFENCE + classifier), total",
                              boundaries=ms, tag_keys=("stage",)),
        "batch_inputs": Histogram("raymia_batch_inputs", description="inputs per DIFFENCE call (all requests "
                                  "of a batch together)", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512]),
        "batch_requests": Histogram("raymia_batch_requests", description="requests per batch",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64]),
    }


class Batcher:
    """Dynamic batching on one compute thread. DIFFENCE runs off the event loop (torch releases the GIL), so the
    replica keeps reading, parsing and answering requests meanwhile; whatever arrived while a batch computed goes
    together as the next one (up to ``max_batch`` requests). A request that finds the thread idle waits
    ``wait_s`` for company first. Serve's ``@serve.batch`` forms batches on a timer even while the previous one
    is still computing, which on a busy CPU makes many tiny batches queue behind each other."""

    def __init__(self, fn: Callable[[np.ndarray], tuple[np.ndarray, float]], max_batch: int, wait_s: float,
                 sizes: Histogram | None = None):
        self.fn, self.max_batch, self.wait_s, self.sizes = fn, max_batch, wait_s, sizes
        self.pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffence")
        self.arrived: asyncio.Event | None = None  # made on the replica's event loop, at the first request

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, int, float]:
        """This request's logits, the inputs of its batch, and when the batch started (``perf_counter``)."""
        loop = asyncio.get_running_loop()
        if self.arrived is None:
            self.arrived = asyncio.Event()
            self.worker = loop.create_task(self._serve_batches())  # held: the loop keeps only weak references
        future = loop.create_future()
        self.pending.append((x, future))
        self.arrived.set()
        return await future

    async def _serve_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            if len(self.pending) < self.max_batch and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)  # the thread was idle: wait a moment for company
            while self.pending:
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                await self._run(loop, batch)
            self.arrived.clear()

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            x = np.concatenate([item for item, _ in batch])
            logits, start = await loop.run_in_executor(self.thread, self.fn, x)
        except Exception as exc:  # a bug: each waiting request fails with it (and is logged there)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        if self.sizes is not None:
            self.sizes.observe(len(batch))
        bounds = np.cumsum([0] + [len(item) for item, _ in batch])
        for (_, future), a, b in zip(batch, bounds[:-1], bounds[1:]):
            if not future.done():  # a client that hung up has its future cancelled
                future.set_result((logits[a:b], len(x), start))


@serve.deployment(max_ongoing_requests=2 * MAX_BATCH, ray_actor_options={"num_cpus": 1},
                  graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=3)
@serve.ingress(api)
class DefendedClassifier:
    """One replica: the classifier behind DIFFENCE, with batched inference."""

    def __init__(self, model_uri: str, tracking_uri: str | None = None, batching: bool = True,
                 max_batch_size: int = MAX_BATCH, batch_wait_timeout_s: float = 0.002,
                 max_inputs_per_request: int = 256, max_body_bytes: int = 4 * 2**20):
        if not 1 <= max_batch_size <= MAX_BATCH or not 0 <= batch_wait_timeout_s <= 1:
            raise ValueError(f"args.max_batch_size must be in [1, {MAX_BATCH}] and args.batch_wait_timeout_s in "
                             f"[0, 1] (got {max_batch_size}, {batch_wait_timeout_s})")
        self.model = DefendedModel(model_uri, tracking_uri)
        self.batching, self.max_inputs, self.max_body = batching, max_inputs_per_request, max_body_bytes
        self.batch_config = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        self.metrics = _metrics()
        self.batcher = Batcher(self._compute, max_batch_size if batching else 1, batch_wait_timeout_s,
                               self.metrics["batch_requests"])

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new DIFFENCE knobs without restarting the replica (invalid ones keep the old and raise)."""
        self.model.configure(ServiceKnobs.model_validate(user_config or {}))

    def _compute(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        logits = self.model.logits(x)
        self.metrics["batch_inputs"].observe(len(x))
        return logits, start

    @api.post("/v1/predict", openapi_extra=PREDICT_SCHEMA)
    async def predict(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            check_content_type(request.headers.get("content-type"))
            raw = await read_body(request, self.max_body)  # a call back to Serve's proxy, which holds the body
            t_body = time.perf_counter()
            x = parse_request(raw, self.model.input_shape, self.max_inputs)
        except BadInput as exc:
            self.metrics["requests"].inc(tags={"status": str(exc.status)})
            return JSONResponse(status_code=exc.status, content=error_body(exc))
        t1 = time.perf_counter()
        try:
            logits, batch, start = await self.batcher.submit(x)
            t2 = time.perf_counter()
            response = JSONResponse(self.model.answer(logits, batch))
        except Exception:  # a bug, not the client's doing: logged with its traceback, answered without it
            log.exception("predict failed")
            self.metrics["requests"].inc(tags={"status": "500"})
            return JSONResponse(status_code=500, content={"error": "internal error (logged)", "field": None})
        t3 = time.perf_counter()
        stages = {"receive": t_body - t0, "parse": t1 - t_body, "queue": start - t1, "compute": t2 - start,
                  "total": t3 - t0}
        for stage, seconds in stages.items():
            self.metrics["stage_ms"].observe(1e3 * seconds, tags={"stage": stage})
        self.metrics["requests"].inc(tags={"status": "200"})
        response.headers["server-timing"] = ", ".join(f"{k};dur={1e3 * v:.2f}" for k, v in stages.items())
        return response

    @api.get("/v1/model")
    async def model_info(self) -> dict[str, Any]:
        return {**self.model.describe(), "batching": self.batching, **self.batch_config,
                "max_inputs_per_request": self.max_inputs, "max_body_bytes": self.max_body}


def app_builder(args: dict[str, Any]) -> Any:
    """``import_path: raymia.serving:app_builder``; ``args``: model_uri, tracking_uri, batching, max_batch_size,
    batch_wait_timeout_s, max_inputs_per_request, max_body_bytes, gpu_fraction (``auto``: 0.5 of a GPU when the
    cluster has one)."""
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
