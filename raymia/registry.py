"""The model format, both directions, and reading a registered champion back (nothing is ever unpickled).

Every audited configuration is logged as an MLflow model (``mlflow.pyfunc``, *models from code*): the code is
:mod:`raymia.pyfunc_model`, the artifacts one folder (key ``raymia``) holding

- ``spec.json`` (architecture name or import path, its params, input shape, number of classes) and
  ``model.safetensors`` (the classifier's tensors);
- for a ``+diffence`` configuration also ``diffence.json`` (DIFFENCE's knobs, the calibrated interval, the
  noise schedule) and ``diffusion_model/`` (the UNet as diffusers' ``save_pretrained`` writes it).

:func:`load_bundle` reads any such model through ``mlflow.pyfunc.load_model`` (so raymia, Ray Serve and a plain
``mlflow.pyfunc.load_model(...).predict(x)`` run the same loader); :func:`load_champion` adds what serving needs:
the registry version, the audit run, and the DIFFENCE part (from the ``+diffence`` sibling for a plain champion).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from safetensors.torch import load_file, save
from torch import nn

import raymia
from raymia.defenses.diffence import Diffence, DiffenceConfig
from raymia.diffusion.model import DiffusionSpec, make_noise_schedule
from raymia.errors import UserError
from raymia.models.classifiers import ModelSpec, build_model
from raymia.tracking import DIFFUSION_MODEL_DIR, MODEL_DIR, MODEL_FORMAT_KEY, mlflow_store

_WEIGHTS, _SPEC, _DIFFENCE = "model.safetensors", "spec.json", "diffence.json"
_FORMAT = "1"


@dataclass(frozen=True)
class ModelPackage:
    """What :meth:`raymia.tracking.AuditRun.log_target` logs as the run's MLflow model."""

    files: dict[str, bytes]          # the artifact folder: relative path -> bytes
    signature: ModelSignature
    input_example: np.ndarray
    metadata: dict[str, str]
    requirements: list[str]


def _signature(input_shape: tuple[int, ...], num_classes: int, diffence: bool) -> ModelSignature:
    outputs = Schema([ColSpec("long", "label"), *(ColSpec("float", f"p{k}") for k in range(num_classes))])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]), outputs=outputs,
                          params=ParamSchema([ParamSpec("seed", "long", 0)]) if diffence else None)


def unet_artifacts(unet: nn.Module, folder: str = DIFFUSION_MODEL_DIR) -> dict[str, bytes]:
    """The diffusion model as ``save_pretrained`` writes it (config.json + safetensors) under ``folder``."""
    files = {}
    with tempfile.TemporaryDirectory() as d:
        unet.save_pretrained(d, safe_serialization=True)
        for f in Path(d).iterdir():
            files[f"{folder}/{f.name}"] = f.read_bytes()
    return files


def model_package(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int,
                  state: dict[str, torch.Tensor] | None, example: np.ndarray, *,
                  diffence: tuple[nn.Module, DiffenceConfig, DiffusionSpec, tuple[float, float] | None] | None = None,
                  ) -> ModelPackage | None:
    """The MLflow model of one configuration (``None`` without weights). ``diffence``: (UNet, knobs, noise
    schedule, interval) for a ``+diffence`` configuration; ``example``: a few inputs, recorded as its example."""
    if state is None:
        return None
    meta = {"arch": spec.arch, "params": spec.params, "input_shape": list(input_shape), "num_classes": num_classes}
    files = {_SPEC: json.dumps(meta, indent=2).encode(), _WEIGHTS: save({k: v.contiguous() for k, v in state.items()})}
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", "safetensors",
                    "numpy", "pandas", "scipy"]
    if diffence is not None:
        unet, knobs, schedule, interval = diffence
        knobs = DiffenceConfig.model_validate(knobs.model_dump(include=set(DiffenceConfig.model_fields)))
        files[_DIFFENCE] = json.dumps({"knobs": knobs.model_dump(mode="json"), "schedule": schedule.model_dump(),
                                       "interval": list(interval) if interval else None}, indent=2).encode()
        files.update(unet_artifacts(unet))
        requirements.append("diffusers")
    metadata = {MODEL_FORMAT_KEY: _FORMAT, "raymia_version": raymia.__version__,
                "raymia_kind": "classifier+diffence" if diffence else "classifier",
                "raymia_code": "raymia.pyfunc_model (pip install raymia where the model is loaded)"}
    return ModelPackage(files, _signature(input_shape, num_classes, diffence is not None),
                        np.ascontiguousarray(example[:2], dtype=np.float32), metadata, requirements)


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode and what it expects: ``input_shape`` per example and ``num_classes`` logits."""

    model: nn.Module
    spec: ModelSpec
    input_shape: tuple[int, ...]
    num_classes: int
    source: str


@dataclass(frozen=True)
class DiffencePart:
    """What a ``+diffence`` model adds: the UNet, its noise schedule, DIFFENCE's knobs and calibrated interval."""

    unet: nn.Module
    schedule: DiffusionSpec
    knobs: DiffenceConfig
    interval: tuple[float, float] | None


@dataclass
class ModelBundle:
    """A logged raymia model as :func:`read_folder` rebuilt it: the classifier and, if logged, its DIFFENCE."""

    classifier: LoadedModel
    diffence: DiffencePart | None = None
    _defended: Diffence | None = field(default=None, repr=False)

    def logits(self, x: np.ndarray, *, seed: int = 0) -> np.ndarray:
        """Logits ``[B, C]`` of images ``x [B, *input_shape]`` (or flat ``[B, prod(shape)]``), through DIFFENCE
        when the model has it (its noise drawn from ``seed``)."""
        shape = self.classifier.input_shape
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 2 and x.shape[1] == int(np.prod(shape)):
            x = x.reshape(len(x), *shape)
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"expected inputs of shape [batch, {', '.join(map(str, shape))}], got {list(x.shape)}")
        d = self.diffence
        if d is None or d.knobs.n == 0:
            with torch.no_grad():
                return self.classifier.model(torch.from_numpy(x)).float().numpy()
        if self._defended is None:
            self._defended = Diffence(self.classifier.model, d.unet, make_noise_schedule(d.schedule).alphas_cumprod,
                                      d.knobs, d.interval)
        return self._defended(x, seed=seed)


def read_folder(folder: str | Path, source: str = "") -> ModelBundle:
    """Rebuild the model stored in an artifact folder (see the module docstring); tensors only."""
    folder = Path(folder)
    meta = json.loads((folder / _SPEC).read_text())
    spec = ModelSpec(arch=meta["arch"], params=meta["params"])
    shape = tuple(meta["input_shape"])
    model = build_model(spec, shape, meta["num_classes"])
    model.load_state_dict(load_file(str(folder / _WEIGHTS)))
    classifier = LoadedModel(model.eval(), spec, shape, meta["num_classes"], source or str(folder))
    part = None
    if (folder / _DIFFENCE).exists():
        from diffusers import UNet2DModel

        d = json.loads((folder / _DIFFENCE).read_text())
        unet = UNet2DModel.from_pretrained(str(folder / DIFFUSION_MODEL_DIR), use_safetensors=True).eval()
        part = DiffencePart(unet, DiffusionSpec.model_validate(d["schedule"]), DiffenceConfig.model_validate(d["knobs"]),
                            tuple(d["interval"]) if d["interval"] else None)
    return ModelBundle(classifier, part)


def load_bundle(model_uri: str, *, tracking_uri: str | None = None) -> ModelBundle:
    """Load ``model_uri`` (``models:/name@alias``, ``models:/name/1``, ``models:/m-<id>``, ``runs:/<id>/model`` or
    a local folder) with ``mlflow.pyfunc.load_model``; anything but a raymia model is a :class:`UserError`."""
    with tempfile.TemporaryDirectory() as d, mlflow_store(tracking_uri):
        try:
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=d))
        except (MlflowException, OSError) as exc:
            where = f" in {tracking_uri}" if tracking_uri else ""
            raise UserError(f"cannot read model '{model_uri}'{where}: {str(exc).splitlines()[0]}",
                            field="model_uri") from None
        if not (local / "MLmodel").exists():
            old = " (raymia's pre-MLflow-model folder: run the audit again)" if (local / _SPEC).exists() else ""
            raise UserError(f"'{model_uri}' is not an MLflow model (no MLmodel file){old}", field="model_uri")
        if (Model.load(str(local)).metadata or {}).get(MODEL_FORMAT_KEY) is None:
            raise UserError(f"'{model_uri}' is an MLflow model but not one raymia logged (no '{MODEL_FORMAT_KEY}' in "
                            "its MLmodel metadata); raymia loads only the models its audits log", field="model_uri")
        bundle = mlflow.pyfunc.load_model(str(local)).unwrap_python_model().bundle
    return ModelBundle(replace(bundle.classifier, source=model_uri), bundle.diffence)


def fetch_state_dict(model_uri: str, dest: Path, *, tracking_uri: str | None = None, allow_pickle: bool = False,
                     field: str = "model_uri", warn=print) -> Path:  # noqa: ANN001 - a line printer
    """Download the weights behind ``model_uri`` to the safetensors file ``dest``: a model raymia logged, or a state
    dict logged with ``mlflow.pytorch.log_state_dict`` (read with ``weights_only=True``). A pickled
    ``mlflow.pytorch.log_model`` model is refused unless ``allow_pickle`` (then loaded, with a warning)."""
    from safetensors.torch import save_file

    from raymia.models.checkpoints import read_state_dict

    with tempfile.TemporaryDirectory() as d, mlflow_store(tracking_uri):
        try:
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=d))
        except (MlflowException, OSError) as exc:
            where = f" in {tracking_uri}" if tracking_uri else ""
            raise UserError(f"cannot read model '{model_uri}'{where}: {str(exc).splitlines()[0]}",
                            field=field) from None
        ours = sorted(local.rglob(_WEIGHTS))
        state_dicts = sorted(local.rglob("state_dict.pth"))
        if (local / "MLmodel").exists() and (Model.load(str(local)).metadata or {}).get(MODEL_FORMAT_KEY) and ours:
            state = load_file(str(ours[0]))
        elif state_dicts:
            state = read_state_dict(state_dicts[0], field=field)
        elif (local / "MLmodel").exists() and "pytorch" in (Model.load(str(local)).flavors or {}):
            if not allow_pickle:
                raise UserError(f"'{model_uri}' is a pickled PyTorch model (mlflow.pytorch.log_model): loading it "
                                "runs code stored with it. Log its weights instead with "
                                "mlflow.pytorch.log_state_dict(model.state_dict(), 'model') and name the "
                                "architecture in model:, or set allow_pickle: true for a model you trust",
                                field=field)
            warn(f"warning: {field}: unpickling '{model_uri}' (allow_pickle: true) runs the code it holds")
            from mlflow.pytorch import load_model as load_pickled

            state = load_pickled(str(local), map_location="cpu").state_dict()
        else:
            raise UserError(f"'{model_uri}' holds neither a raymia model nor a state_dict.pth "
                            "(mlflow.pytorch.log_state_dict); log the weights with one of them", field=field)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(dest)
    return dest


def load_model(model_uri: str, *, tracking_uri: str | None = None) -> LoadedModel:
    """The classifier of ``model_uri`` (see :func:`load_bundle`), in eval mode."""
    return load_bundle(model_uri, tracking_uri=tracking_uri).classifier


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


def _client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _origin(client: MlflowClient, model_uri: str) -> tuple[str, str]:
    """``(registry version or the URI itself, source run id)`` of a model URI."""
    ref = model_uri.removeprefix("models:/")
    if model_uri.startswith("runs:/"):
        return model_uri, ref.removeprefix("runs:/").split("/")[0]
    if model_uri.startswith("models:/m-"):
        return model_uri, client.get_logged_model(ref).source_run_id
    if model_uri.startswith("models:/"):
        name, sep, alias = ref.partition("@")
        v = client.get_model_version_by_alias(name, alias) if sep else client.get_model_version(*ref.rsplit("/", 1))
        return f"{v.name}/{v.version}", v.run_id
    raise UserError(f"'{model_uri}': expected models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id> or "
                    "runs:/<run id>/model", field="model_uri")


def load_champion(model_uri: str, *, tracking_uri: str | None = None) -> Champion:
    """The classifier behind ``model_uri`` and its calibrated DIFFENCE: the model's own for a ``+diffence``
    configuration, else that of its ``<name>+diffence`` sibling (same classifier) when the audit had one."""
    bundle = load_bundle(model_uri, tracking_uri=tracking_uri)
    client = _client(tracking_uri)
    version, run_id = _origin(client, model_uri)
    run = client.get_run(run_id)
    part = bundle.diffence
    if part is None and not run.info.run_name.endswith("+diffence"):
        parent = run.data.tags.get("mlflow.parentRunId", run_id)
        sibling = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                     f"attributes.run_name = '{run.info.run_name}+diffence'")
        if sibling:
            part = load_bundle(f"runs:/{sibling[0].info.run_id}/{MODEL_DIR}", tracking_uri=tracking_uri).diffence
    return Champion(bundle.classifier, version, run_id, run.data.params.get("dataset", "?"),
                    run.data.params.get("defense", "none"), part.unet if part else None,
                    part.schedule if part else DiffusionSpec(), part.interval if part else None)
