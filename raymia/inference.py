"""The Ray-free core of the HTTP service: request parsing and the classifier behind DIFFENCE.

Shared by the Ray Serve deployment (:mod:`raymia.serving`) and the plain FastAPI + uvicorn baseline of
``benchmarks/serve_load.py``, so the two serve the same model through the same code and differ only in the stack.

A request body is a JSON object with exactly one of

- ``inputs``: a list of arrays, each in the model's input shape or flat;
- ``images``: a list of base64 PNG strings, each the model's image size;
- ``tensor``: ``{"data": base64 of little-endian float32, "shape": [B, *input_shape]}`` (or ``[B, D]``), the
  compact form: a fifth of the bytes of JSON arrays and no per-number parsing.

Anything else is a :class:`BadInput` (HTTP 4xx, the offending field, what is expected); :func:`parse_request` raises
nothing else for any bytes a client can send.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from raymia.defenses.diffence import Diffence, DiffenceConfig, query_seed
from raymia.diffusion.model import make_noise_schedule
from raymia.registry import Champion, load_champion

FLOAT32_MAX = float(np.finfo(np.float32).max)
FIELDS = ("inputs", "images", "tensor")


class ServiceKnobs(DiffenceConfig):
    """The deployment's ``user_config``: DIFFENCE's knobs (:class:`~raymia.defenses.diffence.DiffenceConfig`, with
    its defaults) plus the interval to select in. ``n: 0`` serves the undefended classifier; ``interval: null``
    with scenario 1 or 2 uses the one the audit calibrated for this classifier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # tighter bounds than the audit's: a replica bounds the work one request can ask for
    n: int = Field(30, ge=0, le=256, description="candidates per query (0: the undefended output)")
    t_prime: int = Field(160, ge=1, le=999, description="forward-noising step T' of the 1000-step schedule")
    interval: tuple[float, float] | None = None


class TensorInput(BaseModel):
    """The compact input form: float32 little-endian bytes, base64-encoded, with their shape."""

    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="base64 of the little-endian float32 values, row-major")
    shape: list[int] = Field(description="[B, *input_shape] or [B, prod(input_shape)]", min_length=2)


class PredictRequest(BaseModel):
    """``POST /v1/predict``'s body (exactly one field). Documents the API in OpenAPI; parsing is
    :func:`parse_request`'s, which names the offending element of a bad body."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[list[Any]] | None = Field(None, description="arrays in the model's input shape, or flat")
    images: list[str] | None = Field(None, description="base64 PNG images of the model's size")
    tensor: TensorInput | None = None


class BadInput(Exception):
    """A client error: HTTP ``status``, the offending ``field`` and a message saying what is expected."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def error_body(exc: BadInput) -> dict[str, Any]:
    """The JSON a 4xx carries."""
    return {"error": exc.message, "field": exc.field}


async def read_body(request: Any, max_bytes: int) -> bytes:
    """An ASGI request's body (Starlette's ``Request``), refusing (413) more than ``max_bytes`` before reading it
    all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BadInput(413, "body", f"request body of {declared} bytes; at most {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadInput(413, "body", f"request body over {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_content_type(value: str | None) -> None:
    """Only ``application/json`` (any parameters) is accepted: 415 otherwise, so a client that sends a form or
    plain text learns it at once instead of having its body guessed at."""
    media = (value or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise BadInput(415, "content-type", f"send Content-Type: application/json (got {value or 'none'!r})")


def parse_request(raw: bytes, input_shape: tuple[int, ...], max_inputs: int) -> np.ndarray:
    """A raw JSON body to float32 ``[B, *input_shape]``, or :class:`BadInput`."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadInput(400, "body", "JSON nested too deeply; inputs need at most "
                                    f"{len(input_shape) + 3} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer with too many digits
        raise BadInput(400, "body", f"not valid JSON ({str(exc)[:120]})") from None
    return parse_inputs(body, input_shape, max_inputs)


def parse_inputs(body: Any, input_shape: tuple[int, ...], max_inputs: int) -> np.ndarray:
    """Validate a decoded JSON body into float32 ``[B, *input_shape]`` or raise :class:`BadInput`."""
    if not isinstance(body, dict):
        raise BadInput(422, "body", 'expected a JSON object like {"inputs": [...]}, {"images": [...]} or '
                                    '{"tensor": {"data": ..., "shape": [...]}}')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadInput(422, unknown[0], "unknown field; send one of inputs, images or tensor")
    given = [f for f in FIELDS if f in body]
    if len(given) != 1:
        raise BadInput(422, given[1] if given else "inputs", "send exactly one of inputs, images or tensor")
    field = given[0]
    if field == "tensor":
        return _parse_tensor(body[field], input_shape, max_inputs)
    items = body[field]
    if not isinstance(items, list):
        raise BadInput(422, field, "expected a list")
    _check_count(len(items), field, max_inputs)
    out = np.empty((len(items), *input_shape), dtype=np.float32)
    for i, item in enumerate(items):
        out[i] = (_parse_array if field == "inputs" else _parse_image)(item, input_shape, f"{field}[{i}]")
    return out


def _check_count(count: int, field: str, max_inputs: int) -> None:
    if count < 1:
        raise BadInput(422, field, "empty batch: send at least one input")
    if count > max_inputs:
        raise BadInput(413, field, f"{count} inputs; at most {max_inputs} per request")


def _to_float32(arr: np.ndarray, name: Callable[[tuple[int, ...]], str]) -> np.ndarray:
    """``arr`` as float32; the first NaN, infinite or float32-overflowing element is a :class:`BadInput` whose field
    ``name(index)`` gives."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), out.shape)
        value, field = arr[at], name(at)
        why = "NaN or infinite values are not allowed" if not np.isfinite(value) else \
            f"{float(value):g} overflows float32 (largest magnitude {FLOAT32_MAX:.4g})"
        raise BadInput(422, field, f"{why} (element {[int(i) for i in at]})")
    return out


def _parse_array(item: Any, shape: tuple[int, ...], field: str) -> np.ndarray:
    expected = f"expected numbers in shape {list(shape)} (or {int(np.prod(shape))} flat values)"
    try:
        arr = np.asarray(item)
    except (ValueError, TypeError, OverflowError, RecursionError):  # ragged, too deep, out of range
        raise BadInput(422, field, expected) from None
    if arr.dtype.kind == "O" and _all_numbers(item):  # integers beyond 64 bits
        try:
            arr = np.asarray(item, dtype=np.float64)
        except OverflowError:
            raise BadInput(422, field, f"an integer beyond float32's range (largest magnitude {FLOAT32_MAX:.4g})") \
                from None
    if arr.dtype.kind not in "iuf":  # strings, booleans, null, objects
        raise BadInput(422, field, expected)
    if arr.shape != shape and not (arr.ndim == 1 and arr.size == int(np.prod(shape))):
        raise BadInput(422, field, f"{expected}, got shape {list(arr.shape)}")
    out = _to_float32(arr, lambda at: field + "".join(f"[{i}]" for i in at))
    return out.reshape(shape)


def _all_numbers(item: Any) -> bool:
    """Whether every leaf of nested lists is an int or float (not a bool)."""
    stack = [item]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, bool) or not isinstance(node, (int, float)):
            return False
    return True


def _parse_tensor(item: Any, shape: tuple[int, ...], max_inputs: int) -> np.ndarray:
    if not isinstance(item, dict) or set(item) != {"data", "shape"}:
        raise BadInput(422, "tensor", 'expected {"data": "<base64 float32 LE>", "shape": [B, ...]}')
    dims = item["shape"]
    flat = int(np.prod(shape))
    if not (isinstance(dims, list) and all(type(d) is int for d in dims)) or \
            list(dims[1:]) not in (list(shape), [flat]):
        raise BadInput(422, "tensor.shape", f"expected [B, {', '.join(map(str, shape))}] or [B, {flat}]")
    _check_count(dims[0], "tensor.shape", max_inputs)
    data = item["data"]
    if not isinstance(data, str):
        raise BadInput(422, "tensor.data", "expected a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(422, "tensor.data", "not valid base64") from None
    if len(raw) != 4 * dims[0] * flat:
        raise BadInput(422, "tensor.data", f"{len(raw)} bytes; shape {dims} needs {4 * dims[0] * flat} "
                                           "(float32, 4 bytes each)")
    arr = np.frombuffer(raw, dtype="<f4").reshape(dims[0], *shape)
    _to_float32(arr, lambda at: "tensor.data")
    return arr.astype(np.float32)  # native order, writable


def _parse_image(item: Any, shape: tuple[int, ...], field: str) -> np.ndarray:
    from PIL import Image

    if not isinstance(item, str):
        raise BadInput(422, field, "expected a base64-encoded PNG string")
    try:
        raw = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(422, field, "not valid base64") from None
    c, h, w = shape
    try:
        img = Image.open(io.BytesIO(raw))  # reads the header only: the size is checked before any pixel is
        if img.size != (w, h):
            raise BadInput(422, field, f"expected a {w}x{h} image, got {img.size[0]}x{img.size[1]}")
        img.load()
        img = img.convert("L" if c == 1 else "RGB")
    except BadInput:
        raise
    except Exception:  # PIL raises many types for hostile bytes (OSError, SyntaxError, ValueError, bombs ...)
        raise BadInput(422, field, "not a decodable image (send a PNG)") from None
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


class DefendedModel:
    """The registered classifier behind DIFFENCE with knobs that can change in place; no web framework."""

    def __init__(self, model_uri: str, tracking_uri: str | None = None):
        self.bundle: Champion = load_champion(model_uri, tracking_uri=tracking_uri)
        self.input_shape = tuple(self.bundle.classifier.input_shape)
        knobs = ServiceKnobs(n=0) if self.bundle.unet is None else \
            ServiceKnobs(scenario=1 if self.bundle.interval else 3)
        self.configure(knobs)

    def configure(self, knobs: ServiceKnobs) -> None:
        """Apply new knobs (invalid ones raise and keep the old)."""
        if knobs.n > 0 and self.bundle.unet is None:
            raise ValueError("user_config asks for DIFFENCE (n > 0) but the model's audit logged no diffusion model")
        if knobs.n > 0 and knobs.scenario != 3 and knobs.interval is None:
            if self.bundle.interval is None:
                raise ValueError("DIFFENCE scenarios 1 and 2 need user_config.interval [a, b] (the audit logs it as "
                                 "diffence.interval_low / diffence.interval_high on the +diffence run)")
            knobs = knobs.model_copy(update={"interval": self.bundle.interval})
        abar = make_noise_schedule(self.bundle.diffusion_spec).alphas_cumprod
        unet = self.bundle.unet if self.bundle.unet is not None else torch.nn.Identity()
        self.defended = Diffence(self.bundle.classifier.model, unet, abar, knobs, knobs.interval)
        self.knobs = knobs

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Released logits ``[B, K]``; each query's noise seeded from its bytes (independent of its batch)."""
        return self.defended(x, seeds=[query_seed(self.knobs.seed, row) for row in x])

    def answer(self, logits: np.ndarray, batch_size: int) -> dict[str, Any]:
        """The JSON response for one request's logits."""
        z = logits.astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return {"model_version": self.bundle.version, "batch_size": int(batch_size),
                "predictions": [{"label": int(row.argmax()), "probabilities": row.round(6).tolist(),
                                 "logits": z32.tolist()} for row, z32 in zip(p, logits.astype(np.float32))]}

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` reports: the model, and the DIFFENCE knobs in effect now."""
        b = self.bundle
        return {"model_version": b.version, "mlflow_run_id": b.run_id, "dataset": b.dataset,
                "classes": list(range(b.classifier.num_classes)), "input_shape": list(self.input_shape),
                "training_defense": b.defense, "inference_defense": self.knobs.model_dump(mode="json"),
                "input_forms": list(FIELDS), "replica_pid": os.getpid()}
