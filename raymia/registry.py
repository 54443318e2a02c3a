"""Load a registered raymia model (e.g. ``models:/raymia-champion@champion``) without unpickling any code.

A registered version points at a run's ``model/`` folder: ``model.safetensors`` (tensors only) and
``spec.json`` (architecture name or import path, its params, input shape, number of classes).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch import nn

from raymia.models.classifiers import ModelSpec, build_model


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode and what it expects: ``input_shape`` per example and ``num_classes`` logits."""

    model: nn.Module
    spec: ModelSpec
    input_shape: tuple[int, ...]
    num_classes: int
    source: str


def resolve_source(model_uri: str, tracking_uri: str | None = None) -> str:
    """The ``runs:/...`` source behind ``models:/name@alias`` or ``models:/name/version`` (other URIs unchanged).

    The registry is read from the same store as the runs (``tracking_uri``), not from MLflow's global default.
    """
    if not model_uri.startswith("models:/"):
        return model_uri
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name_ref = model_uri.removeprefix("models:/")
    if "@" in name_ref:
        name, alias = name_ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, number = name_ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    return version.source


def load_model(model_uri: str, *, tracking_uri: str | None = None) -> LoadedModel:
    """Download ``model_uri`` (``models:/name@alias``, ``models:/name/1`` or ``runs:/id/model``) and rebuild it."""
    source = resolve_source(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory() as d:
        local = Path(mlflow.artifacts.download_artifacts(source, dst_path=d, tracking_uri=tracking_uri))
        meta = json.loads((local / "spec.json").read_text())
        spec = ModelSpec(arch=meta["arch"], params=meta["params"])
        model = build_model(spec, tuple(meta["input_shape"]), meta["num_classes"])
        model.load_state_dict(load_file(str(local / "model.safetensors")))
    return LoadedModel(model.eval(), spec, tuple(meta["input_shape"]), meta["num_classes"], model_uri)
