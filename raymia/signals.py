"""Model outputs that attacks consume, per model and pooled over an audit's models, with Parquet storage.

Storing every model's logits on every scored sample (plus the keep-mask saying who trained on what) is what
lets any attack be re-scored later without retraining (``raymia rescore``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from raymia.data.queries import QUERY_VIEWS, LabelOnlyConfig
from raymia.parquet_io import read_table, write_table
from raymia.training.loop import predict_logits


@dataclass(frozen=True, eq=False)
class ModelSignals:
    """One model's outputs on the scored samples: ``logits [n, A, C]`` for the A query views and the
    labels it predicts under the V label-only views, ``label_only [n, V]``, plus numbers its training reported
    (``extra``, e.g. the DP epsilon)."""

    logits: np.ndarray
    label_only: np.ndarray
    extra: dict[str, float] = field(default_factory=dict)


#: A model to query: a network (run here), or any function from inputs ``[n, *shape]`` to output vectors
#: ``[n, K]`` (logits or log-probabilities), e.g. an HTTP endpoint's client.
Queryable = nn.Module | Callable[[np.ndarray], np.ndarray]


def queries_needed(n: int, query_views: list[str], label_only: LabelOnlyConfig, x1: np.ndarray,
                   label_rows: np.ndarray | None = None) -> int:
    """How many inputs :func:`compute_signals` sends one model for ``n`` samples (``x1``: one of them)."""
    rows = n if label_rows is None else len(label_rows)
    return n * len(query_views) + rows * len(label_only.views(x1))


def compute_signals(models: Sequence[Queryable], x: np.ndarray, query_views: list[str], label_only: LabelOnlyConfig,
                    *, device: torch.device | str = "cpu", label_rows: np.ndarray | None = None) -> list[ModelSignals]:
    """Query each model on every view of ``x [n, *shape]`` (networks in eval mode); the views are built once for
    all. The label-only views are queried only on the positions ``label_rows`` (default: all); elsewhere the
    predicted labels are -1 (no attack reads them there)."""
    queries = [QUERY_VIEWS[v](x) for v in query_views]
    rows = np.arange(len(x)) if label_rows is None else np.asarray(label_rows)
    n_views = len(label_only.views(x[:1]))
    perturbed = label_only.views(x[rows]) if len(rows) else []
    out = []
    for model in models:
        def ask(q: np.ndarray) -> np.ndarray:
            if isinstance(model, nn.Module):
                return predict_logits(model, torch.from_numpy(q), device=device)
            return model(q)

        logits = np.stack([ask(q) for q in queries], axis=1)
        preds = np.full((len(x), n_views), -1, np.int16)
        if len(perturbed):
            preds[rows] = np.stack([ask(v).argmax(1) for v in perturbed], axis=1)
        out.append(ModelSignals(logits.astype(np.float32), preds))
    return out


@dataclass(frozen=True, eq=False)
class PoolSignals:
    """All models of one target configuration on the scored samples.

    Attributes:
        indices: dataset rows ``[n]`` (sorted); ``labels [n]``; ``roles [n]`` (split role of each row).
        model_ids: ``[M]`` names, ``"target"`` and ``"ref-000"``, ``"ref-001"``, ...
        logits: float32 ``[M, n, A, C]`` for the query views ``query_views``.
        keep: bool ``[M, n]``: ``keep[m, i]`` iff model m trained on sample i.
        label_only: int16 ``[M, n, V]`` predicted labels under the label-only views.
        target_extra: numbers the target's training reported (e.g. ``dp_epsilon``).
    """

    indices: np.ndarray
    labels: np.ndarray
    roles: np.ndarray
    model_ids: np.ndarray
    logits: np.ndarray
    keep: np.ndarray
    label_only: np.ndarray
    query_views: tuple[str, ...]
    target_extra: dict[str, float] = field(default_factory=dict)

    def model(self, model_id: str) -> int:
        hits = np.flatnonzero(self.model_ids == model_id)
        if len(hits) != 1:
            raise KeyError(model_id)
        return int(hits[0])

    @property
    def reference_rows(self) -> np.ndarray:
        """Positions of the reference models in ``model_ids``."""
        return np.flatnonzero(np.char.startswith(self.model_ids.astype(str), "ref-"))

    def role_mask(self, *roles: str) -> np.ndarray:
        return np.isin(self.roles, roles)

    def to_parquet(self, path: str | Path) -> Path:
        """One row per (model, sample); written atomically."""
        m, n, a, c = self.logits.shape
        v = self.label_only.shape[2]
        table = pa.table({
            "model": pa.array(np.repeat(self.model_ids, n)).dictionary_encode(),
            "index": np.tile(self.indices, m).astype(np.int64),
            "label": np.tile(self.labels, m).astype(np.int64),
            "role": pa.array(np.tile(self.roles, m)).dictionary_encode(),
            "keep": self.keep.reshape(-1),
            "logits": pa.FixedSizeListArray.from_arrays(pa.array(self.logits.reshape(-1), pa.float32()), a * c),
            "label_only": pa.FixedSizeListArray.from_arrays(pa.array(self.label_only.reshape(-1), pa.int16()), v),
        })
        return write_table(table, path, {"raymia.query_views": ",".join(self.query_views), "raymia.num_classes": str(c),
                                         "raymia.target_extra": json.dumps(self.target_extra)})

    @classmethod
    def from_parquet(cls, path: str | Path) -> "PoolSignals":
        table, meta = read_table(path)
        views = tuple(meta["raymia.query_views"].split(","))
        c = int(meta["raymia.num_classes"])
        model = np.asarray(table.column("model").to_pylist())
        model_ids = np.asarray(list(dict.fromkeys(model)))
        m = len(model_ids)
        n = len(model) // m
        first = slice(0, n)
        logits = table.column("logits").combine_chunks().flatten().to_numpy()
        lo = table.column("label_only").combine_chunks()
        v = lo.type.list_size
        return cls(
            indices=table.column("index").to_numpy()[first],
            labels=table.column("label").to_numpy()[first],
            roles=np.asarray(table.column("role").to_pylist()[:n]),
            model_ids=model_ids,
            logits=logits.reshape(m, n, len(views), c),
            keep=table.column("keep").to_numpy(zero_copy_only=False).reshape(m, n),
            label_only=lo.flatten().to_numpy().reshape(m, n, v),
            query_views=views,
            target_extra=json.loads(meta.get("raymia.target_extra", "{}")),
        )
