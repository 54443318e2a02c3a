"""The code of every MLflow model raymia logs (MLflow *models from code*: this file is copied into the model).

MLflow runs this file when it loads the model, and the model is the object passed to ``set_model`` below; the
weights are the model's artifacts in the format :mod:`raymia.registry` writes (safetensors and JSON), so loading
a raymia model unpickles nothing. ``raymia`` must be importable where the model is loaded.

``predict(x)``: images ``[B, *input_shape]`` (float32 in [0, 1]) -> a DataFrame with ``label`` and one column
``p<k>`` per class. A model logged for a ``+diffence`` configuration answers through DIFFENCE with the knobs and
interval the audit used; ``params={"seed": s}`` draws its noise (the Serve app seeds each query from its bytes).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

#: The artifact key under which the model's folder is logged (``context.artifacts[ARTIFACT_KEY]``).
ARTIFACT_KEY = "raymia"


class RaymiaModel(PythonModel):
    """A raymia classifier, optionally behind DIFFENCE; ``bundle`` is what :func:`raymia.registry.read_folder`
    read (the classifier as an ``nn.Module`` and the DIFFENCE part)."""

    bundle: Any = None

    # predict carries no type hints: MLflow would read them as a schema; the logged signature is the schema
    def load_context(self, context: Any) -> None:
        from raymia.registry import read_folder

        self.bundle = read_folder(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        logits = self.bundle.logits(np.asarray(model_input, dtype=np.float32), seed=int((params or {}).get("seed", 0)))
        z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return pd.DataFrame({"label": p.argmax(axis=1).astype(np.int64),
                             **{f"p{k}": p[:, k].astype(np.float32) for k in range(p.shape[1])}})


mlflow.models.set_model(RaymiaModel())
