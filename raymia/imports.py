"""Resolve user plug-ins given as ``"package.module:function"`` import paths."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from raymia.errors import UserError


def is_import_path(name: str) -> bool:
    """True for ``"module:attr"`` strings, which name user code rather than a built-in registry entry."""
    return ":" in name


def load_callable(path: str, *, field: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the callable.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UserError(f"'{path}' is not an import path; write it as 'package.module:function'", field=field)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"cannot import module '{module_name}' ({exc}); make sure it is on PYTHONPATH "
            "or installed in the environment that runs raymia",
            field=field,
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"module '{module_name}' has no attribute '{attr}'", field=field)
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"'{path}' is not callable", field=field)
    return obj
