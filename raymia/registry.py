"""The model format, both directions, and reading a registered champion back (nothing is ever unpickled).

A logged classifier is a folder ``model/`` on its child run: ``model.safetensors`` (tensors only) and
``spec.json`` (architecture name or import path, its params, input shape, number of classes). DIFFENCE's
diffusion model is the parent run's ``diffusion_model/`` folder as diffusers' ``save_pretrained`` writes it
(config.json + safetensors). :func:`load_champion` gathers what serving needs: the classifier, the diffusion model
and the DIFFENCE interval the audit calibrated for that classifier.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save
from torch import nn

from raymia.diffusion.model import DiffusionSpec
from raymia.models.classifiers import ModelSpec, build_model
from raymia.tracking import (
    CONFIG_FILE,
    DIFFUSION_MODEL_DIR,
    INTERVAL_METRICS,
    MODEL_DIR,
)

_WEIGHTS, _SPEC = "model.safetensors", "spec.json"


def model_artifacts(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int,
                    state: dict[str, torch.Tensor] | None) -> dict[str, bytes]:
    """The files of a logged classifier (``{artifact path: bytes}``): its spec, and its weights when known."""
    meta = {"arch": spec.arch, "params": spec.params, "input_shape": list(input_shape), "num_classes": num_classes}
    files = {f"{MODEL_DIR}/{_SPEC}": json.dumps(meta, indent=2).encode()}
    if state is not None:
        files[f"{MODEL_DIR}/{_WEIGHTS}"] = save({k: v.contiguous() for k, v in state.items()})
    return files


def unet_artifacts(unet: nn.Module) -> dict[str, bytes]:
    """The diffusion model as ``save_pretrained`` writes it (config.json + safetensors), for the parent run."""
    files = {}
    with tempfile.TemporaryDirectory() as d:
        unet.save_pretrained(d, safe_serialization=True)
        for f in Path(d).iterdir():
            files[f"{DIFFUSION_MODEL_DIR}/{f.name}"] = f.read_bytes()
    return files


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode and what it expects: ``input_shape`` per example and ``num_classes`` logits."""

    model: nn.Module
    spec: ModelSpec
    input_shape: tuple[int, ...]
    num_classes: int
    source: str


def _client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _version(client: MlflowClient, model_uri: str) -> Any:
    name_ref = model_uri.removeprefix("models:/")
    if "@" in name_ref:
        name, alias = name_ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, number = name_ref.rsplit("/", 1)
    return client.get_model_version(name, number)


def resolve_source(model_uri: str, tracking_uri: str | None = None) -> str:
    """The ``runs:/...`` source behind ``models:/name@alias`` or ``models:/name/version`` (other URIs unchanged).

    The registry is read from the same store as the runs (``tracking_uri``), not from MLflow's global default.
    """
    if not model_uri.startswith("models:/"):
        return model_uri
    return _version(_client(tracking_uri), model_uri).source


def load_model(model_uri: str, *, tracking_uri: str | None = None) -> LoadedModel:
    """Download ``model_uri`` (``models:/name@alias``, ``models:/name/1`` or ``runs:/id/model``) and rebuild it."""
    source = resolve_source(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory() as d:
        local = Path(mlflow.artifacts.download_artifacts(source, dst_path=d, tracking_uri=tracking_uri))
        meta = json.loads((local / _SPEC).read_text())
        spec = ModelSpec(arch=meta["arch"], params=meta["params"])
        model = build_model(spec, tuple(meta["input_shape"]), meta["num_classes"])
        model.load_state_dict(load_file(str(local / _WEIGHTS)))
    return LoadedModel(model.eval(), spec, tuple(meta["input_shape"]), meta["num_classes"], model_uri)


@dataclass(frozen=True)
class Champion:
    """A registered classifier with what its audit knows about deploying it behind DIFFENCE.

    ``unet`` is ``None`` when the audit had no ``diffence:`` section; ``interval`` is the one the audit calibrated
    for this classifier (``None`` if it did not calibrate one).
    """

    classifier: LoadedModel
    version: str
    run_id: str
    dataset: str
    defense: str
    unet: nn.Module | None
    diffusion_spec: DiffusionSpec
    interval: tuple[float, float] | None


def _interval(client: MlflowClient, run: Any, parent: str) -> tuple[float, float] | None:
    """The interval on the run itself if it is the ``+diffence`` variant, else on its ``<name>+diffence`` sibling
    (same classifier, same diffusion model)."""
    candidates = [run]
    if not run.info.run_name.endswith("+diffence"):
        candidates += client.search_runs([run.info.experiment_id],
                                         f"tags.mlflow.parentRunId = '{parent}' and "
                                         f"attributes.run_name = '{run.info.run_name}+diffence'")
    for r in candidates:
        low, high = (r.data.metrics.get(name) for name in INTERVAL_METRICS)
        if low is not None and high is not None:
            return float(low), float(high)
    return None


def load_champion(model_uri: str, *, tracking_uri: str | None = None) -> Champion:
    """The classifier behind ``model_uri``, its audit's diffusion model and its calibrated DIFFENCE interval."""
    from diffusers import UNet2DModel

    client = _client(tracking_uri)
    classifier = load_model(model_uri, tracking_uri=tracking_uri)
    run_id = resolve_source(model_uri, tracking_uri).removeprefix("runs:/").split("/")[0]
    run = client.get_run(run_id)
    version = (f"{_version(client, model_uri).name}/{_version(client, model_uri).version}"
               if model_uri.startswith("models:/") else model_uri)
    parent = run.data.tags.get("mlflow.parentRunId", run_id)
    unet, spec = None, DiffusionSpec()
    with tempfile.TemporaryDirectory() as d:
        audit_cfg = yaml.safe_load(Path(client.download_artifacts(parent, CONFIG_FILE, d)).read_text()) or {}
        if audit_cfg.get("diffence"):
            spec = DiffusionSpec.model_validate(audit_cfg["diffence"].get("model", {}))
            unet = UNet2DModel.from_pretrained(client.download_artifacts(parent, DIFFUSION_MODEL_DIR, d),
                                               use_safetensors=True).eval()
    return Champion(classifier, version, run_id, run.data.params.get("dataset", "?"),
                    run.data.params.get("defense", "none"), unet, spec, _interval(client, run, parent))
