"""Content keys and derived seeds: what makes two runs share a cached model, and how seeds follow from config.

Both are pure functions of their inputs (no randomness, no clock), so the cache, the classifier pipeline and the
DDPM track agree on them across processes, machines and runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def content_key(payload: dict[str, Any]) -> str:
    """SHA-256 of a JSON-serialisable description (numpy arrays hashed by their bytes)."""
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return {"sha256": hashlib.sha256(np.ascontiguousarray(o).tobytes()).hexdigest(), "dtype": str(o.dtype)}
        raise TypeError(type(o).__name__)

    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=default).encode()).hexdigest()


def derive_seed(*parts: object) -> int:
    """A 31-bit seed determined by ``parts`` (e.g. the audit seed, a target's recipe and a model index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
