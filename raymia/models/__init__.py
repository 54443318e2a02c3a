"""Classifier architectures and the registry that builds them from a :class:`ModelSpec`."""

from raymia.models.classifiers import ARCHITECTURES, ModelSpec, build_model

__all__ = ["ARCHITECTURES", "ModelSpec", "build_model"]
