"""raymia: membership-inference audits of ML models and their defenses, on Ray, tracked in MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("raymia")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
