"""A black-box target behind HTTP: query a prediction endpoint for the output vectors the attacks read.

The client sends the scored samples in batches (``batch_size`` per request, at most ``concurrency`` requests in
flight), each request with a timeout, retried with exponential backoff on connection errors, 429/5xx answers
and malformed bodies; a request that fails ``retries + 1`` times, a 4xx other than 408/429, or a response
whose vectors are not what ``output`` says fails the audit with a :class:`~raymia.errors.UserError` naming the
endpoint, the request and the fix. ``max_queries`` bounds the samples sent, checked before the first request.

The defaults fit raymia's own ``POST /v1/predict`` (:mod:`raymia.serving`): the compact ``tensor`` form in,
``predictions[*].logits`` out. No Ray, no MLflow.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from raymia.errors import UserError


class EndpointConfig(BaseModel):
    """Where the endpoint is and how to talk to it.

    ``input_field`` is the JSON key the batch goes under, as ``input_format`` ``tensor`` (raymia's compact form:
    ``{"data": base64 float32 LE, "shape": [B, ...]}``) or ``lists`` (nested arrays in the input shape).
    ``output_path`` finds the vectors in the response: dotted keys, ``[*]`` maps over a list (``probabilities``
    for ``{"probabilities": [[...], ...]}``, ``predictions[*].logits`` for raymia's server); ``output_kind``
    says whether they are logits or probabilities (rows must then sum to 1 within ``sum_tolerance``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    input_field: str = "tensor"
    input_format: Literal["tensor", "lists"] = "tensor"
    output_path: str = "predictions[*].logits"
    output_kind: Literal["logits", "probabilities"] = "logits"
    headers: dict[str, str] = {}
    batch_size: int = Field(64, ge=1, le=100_000)
    concurrency: int = Field(4, ge=1, le=256)
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(3, ge=0, le=20)
    backoff_s: float = Field(0.5, ge=0)
    max_queries: int | None = Field(None, ge=1, description="most samples the audit may send (None: no bound)")
    sum_tolerance: float = Field(1e-3, gt=0, lt=1)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1/predict")
        return v


@dataclass
class QueryStats:
    """What querying the endpoint cost: samples sent, requests (retries included), retries, wall seconds."""

    queries: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        return {"endpoint.queries": float(self.queries), "endpoint.requests": float(self.requests),
                "endpoint.retries": float(self.retries), "endpoint.seconds": self.seconds}


def _extract(body: Any, path: str) -> Any:
    """The value at ``path`` (``a.b``, ``a[*].b``) in a decoded JSON body; ``KeyError`` if it is not there."""
    value = body
    for i, part in enumerate(path.split(".")):
        every = part.endswith("[*]")
        key = part.removesuffix("[*]")
        if key:
            if not isinstance(value, dict) or key not in value:
                raise KeyError(".".join(path.split(".")[:i + 1]))
            value = value[key]
        if every:
            if not isinstance(value, list):
                raise KeyError(f"{key}[*] (not a list)")
            rest = ".".join(path.split(".")[i + 1:])
            return [_extract(item, rest) if rest else item for item in value]
    return value


@dataclass
class EndpointClient:
    """Query ``config.url`` for output vectors of samples ``[n, *input_shape]``; counts in :attr:`stats`."""

    config: EndpointConfig
    where: str = "endpoint"  # the config field errors name, e.g. targets.<name>.endpoint
    stats: QueryStats = field(default_factory=QueryStats)

    def _body(self, x: np.ndarray) -> bytes:
        c = self.config
        if c.input_format == "tensor":
            payload: Any = {"data": base64.b64encode(np.ascontiguousarray(x, "<f4").tobytes()).decode(),
                            "shape": list(x.shape)}
        else:
            payload = x.tolist()
        return json.dumps({c.input_field: payload}).encode()

    def _fail(self, what: str, fix: str) -> UserError:
        return UserError(f"{self.config.url}: {what}; {fix}", field=self.where)

    def _post(self, x: np.ndarray, first: int) -> np.ndarray:
        """One batch (rows ``first...``), retried; returns float64 ``[B, K]`` log-probabilities or logits."""
        c = self.config
        body = self._body(x)
        last = ""
        for attempt in range(c.retries + 1):
            if attempt:
                self.stats.retries += 1
                time.sleep(c.backoff_s * 2 ** (attempt - 1))
            self.stats.requests += 1
            request = urllib.request.Request(c.url, data=body, method="POST",
                                             headers={"content-type": "application/json", **c.headers})
            try:
                with urllib.request.urlopen(request, timeout=c.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode(errors="replace")
                last = f"answered HTTP {exc.code} ({detail})"
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    raise self._fail(f"the request for samples {first}-{first + len(x) - 1} {last}",
                                     "check input_field / input_format against the endpoint's API") from None
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"is unreachable ({getattr(exc, 'reason', exc)})"
                continue
            try:
                vectors = _extract(json.loads(raw), c.output_path)
                out = np.asarray(vectors, dtype=np.float64)
            except (ValueError, KeyError, TypeError) as exc:
                last = f"sent a response without a numeric array at output_path {c.output_path!r} ({exc})"
                continue
            return self._checked(out, len(x), first)
        raise self._fail(f"{last}, {c.retries + 1} attempts for samples {first}-{first + len(x) - 1}",
                         "check that the endpoint is up and the url, output_path and timeout_s are right")

    def _checked(self, out: np.ndarray, n: int, first: int) -> np.ndarray:
        c = self.config
        if out.ndim != 2 or len(out) != n:
            raise self._fail(f"returned an array of shape {list(out.shape)} for {n} samples (from {first})",
                             f"output_path {c.output_path!r} must select one vector per sample")
        if not np.isfinite(out).all() and c.output_kind == "logits":
            raise self._fail(f"returned non-finite logits for samples from {first}", "fix the endpoint")
        if c.output_kind == "probabilities":
            sums = out.sum(axis=1)
            bad = np.flatnonzero((np.abs(sums - 1) > c.sum_tolerance) | (out < 0).any(axis=1) | ~np.isfinite(sums))
            if len(bad):
                raise self._fail(f"sample {first + int(bad[0])}'s probabilities sum to {sums[bad[0]]:.6g} (or hold "
                                 "negative values), not 1", "set output_kind: logits if the endpoint returns logits, "
                                 "or point output_path at the probability vector")
            return np.log(np.clip(out, 1e-45, None))  # log-probabilities: logits up to a constant per row
        return out

    def planned(self, n: int) -> None:
        """Raise before any request if ``n`` more samples would exceed ``max_queries``."""
        c = self.config
        if c.max_queries is not None and self.stats.queries + n > c.max_queries:
            raise UserError(f"the audit needs {self.stats.queries + n} queries of {c.url} but max_queries is "
                            f"{c.max_queries}; raise max_queries or audit fewer samples "
                            "(smaller split fractions, fewer label-only views)", field=self.where)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Output vectors ``[n, K]`` (float32 logits, or log-probabilities) of samples ``x [n, *shape]``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.planned(len(x))
        start = time.perf_counter()
        b = self.config.batch_size
        firsts = range(0, len(x), b)
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            parts = list(pool.map(lambda i: self._post(x[i:i + b], i), firsts))
        self.stats.queries += len(x)
        self.stats.seconds += time.perf_counter() - start
        if not parts:
            return np.zeros((0, 0), np.float32)
        widths = {p.shape[1] for p in parts}
        if len(widths) != 1:
            raise self._fail(f"returned vectors of different lengths {sorted(widths)}", "fix the endpoint")
        return np.concatenate(parts).astype(np.float32)
