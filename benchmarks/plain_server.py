"""The load benchmark's baseline: the same model, DIFFENCE and request parsing as the Serve deployment
(:mod:`raymia.inference`) behind plain FastAPI + uvicorn: one process, one request at a time through the model,
no batching, no replicas.

    python benchmarks/plain_server.py --port 18778 --model-uri models:/bench@champion \\
        --tracking-uri sqlite:////abs/mlflow.db --knobs '{"n": 8, "scenario": 1}'
"""

from __future__ import annotations

import argparse
import json
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from raymia.inference import BadInput, DefendedModel, ServiceKnobs, check_content_type, error_body, parse_request, \
    read_body


def create_app(model: DefendedModel, max_inputs: int = 256, max_body: int = 4 * 2**20) -> FastAPI:
    """``POST /v1/predict`` and ``GET /v1/model`` as the Serve deployment answers them, without batching."""
    app = FastAPI(title="raymia plain baseline")

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            check_content_type(request.headers.get("content-type"))
            raw = await read_body(request, max_body)
            t_body = time.perf_counter()
            x = parse_request(raw, model.input_shape, max_inputs)
        except BadInput as exc:
            return JSONResponse(status_code=exc.status, content=error_body(exc))
        t1 = time.perf_counter()
        logits = model.logits(x)  # blocks the event loop: the plain server computes one request at a time
        t2 = time.perf_counter()
        response = JSONResponse(model.answer(logits, len(x)))
        stages = {"receive": t_body - t0, "parse": t1 - t_body, "queue": 0.0, "compute": t2 - t1,
                  "total": time.perf_counter() - t0}
        response.headers["server-timing"] = ", ".join(f"{k};dur={1e3 * v:.2f}" for k, v in stages.items())
        return response

    @app.get("/v1/model")
    async def info() -> dict:
        return model.describe()

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model-uri", required=True)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--knobs", default="{}", help="DIFFENCE knobs as JSON (the Serve user_config)")
    args = p.parse_args()
    model = DefendedModel(args.model_uri, args.tracking_uri)
    model.configure(ServiceKnobs.model_validate(json.loads(args.knobs)))
    uvicorn.run(create_app(model), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
