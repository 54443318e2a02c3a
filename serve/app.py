"""The Serve application lives in the installed package (``raymia.serving``) so every node can import it;
this module re-exports it for ``serve run serve.app:app_builder``."""

from raymia.serving import DefendedClassifier, app_builder

__all__ = ["DefendedClassifier", "app_builder"]
