"""Content-addressed store of trained models and their outputs, on any ``pyarrow.fs`` filesystem.

A model's key hashes everything that determines its weights — architecture, recipe, defense, the data
fingerprint, the exact training indices, the seed and the code version — so rerunning an audit, adding attacks
or re-querying reuses models instead of retraining. Outputs are keyed by (model key, views fingerprint).
Every file is written under a temporary name and moved into place; a SHA-256 sidecar is checked on every load,
and a corrupted or truncated entry counts as missing (and is retrained).

Layout under the root (a local path or a URI such as ``s3://bucket/raymia-cache``):

    models/<kk>/<key>.safetensors  (+ .sha256)      signals/<kk>/<key>-<views>.npz  (+ .sha256)
    records/<kk>/<key>.json  (+ .sha256)            small results derived from models (e.g. a DIFFENCE interval)
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from raymia.signals import ModelSignals


def safe_open_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` header of serialized safetensors bytes."""
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}


class ModelCache:
    """Model weights (safetensors) and model outputs (npz), keyed by content, with checksums."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        self.uri = uri

    def __getstate__(self) -> dict[str, Any]:  # filesystems are rebuilt from the URI in Ray workers
        return {"uri": self.uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"])

    def _path(self, kind: str, name: str, ext: str) -> str:
        return f"{self.root}/{kind}/{name[:2]}/{name}{ext}"

    def _write(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        for target, blob in ((path, data), (path + ".sha256", hashlib.sha256(data).hexdigest().encode())):
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(blob)
            self.fs.move(tmp, target)

    def _read(self, path: str) -> bytes | None:
        """The file's bytes if it exists and matches its checksum, else ``None``."""
        try:
            with self.fs.open_input_stream(path) as f:
                data = f.read()
            with self.fs.open_input_stream(path + ".sha256") as f:
                expected = f.read().decode().strip()
        except (FileNotFoundError, OSError):
            return None
        return data if hashlib.sha256(data).hexdigest() == expected else None

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # ------------------------------------------------------------------------------------------ weights
    def has_model(self, key: str) -> bool:
        return self._exists(self._path("models", key, ".safetensors"))

    def save_model(self, key: str, state: dict[str, torch.Tensor], extra: dict[str, float] | None = None) -> None:
        """Store weights (and numbers their training reported, in the safetensors metadata)."""
        self._write(self._path("models", key, ".safetensors"),
                    st_save({k: v.detach().cpu().contiguous() for k, v in state.items()},
                            metadata={"raymia.extra": json.dumps(extra or {})}))

    def load_model(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
        """``(weights, extra)``, weights as tensors only (safetensors never runs code); ``None`` if missing or
        corrupted."""
        data = self._read(self._path("models", key, ".safetensors"))
        if data is None:
            return None
        try:
            meta = safe_open_metadata(data)
            return st_load(data), json.loads(meta.get("raymia.extra", "{}"))
        except Exception:  # noqa: BLE001 - a checksum-valid but unparsable file is treated as missing
            return None

    # ------------------------------------------------------------------------------------------ outputs
    def save_signals(self, key: str, views: str, signals: ModelSignals) -> None:
        buf = io.BytesIO()
        np.savez(buf, logits=signals.logits, label_only=signals.label_only, extra=np.array(json.dumps(signals.extra)))
        self._write(self._path("signals", f"{key}-{views}", ".npz"), buf.getvalue())

    def load_signals(self, key: str, views: str) -> ModelSignals | None:
        data = self._read(self._path("signals", f"{key}-{views}", ".npz"))
        if data is None:
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            extra = json.loads(str(z["extra"])) if "extra" in z.files else {}
            return ModelSignals(z["logits"], z["label_only"], extra)

    # ------------------------------------------------------------------------------------------ records
    def save_record(self, key: str, record: dict[str, Any]) -> None:
        """Store a small JSON-serialisable result under ``key``."""
        self._write(self._path("records", key, ".json"), json.dumps(record, sort_keys=True).encode())

    def load_record(self, key: str) -> dict[str, Any] | None:
        data = self._read(self._path("records", key, ".json"))
        return None if data is None else json.loads(data)
