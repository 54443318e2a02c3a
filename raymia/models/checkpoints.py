"""Weights a user brings: read a state dict safely and fit it to the architecture the config names.

Safetensors files are read as tensors only; PyTorch files (``.pt``, ``.pth``, ``.bin``) with
``torch.load(weights_only=True)``, which refuses pickled code. Prefixes that wrappers add (``module.`` from
DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``) are stripped. A state dict that does not fit — missing or
unexpected keys, a shape mismatch, another number of classes — is a :class:`UserError` listing what differs.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch import nn

from raymia.errors import UserError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@functools.lru_cache(maxsize=64)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (memoised on its path, modification time and size)."""
    st = path.stat()
    return _digest(str(path), st.st_mtime_ns, st.st_size)


def read_state_dict(path: Path, *, field: str) -> dict[str, torch.Tensor]:
    """The tensors in a safetensors or PyTorch state-dict file (no pickled code is ever run)."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}", field=field)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors / the unpickler raise many types for foreign bytes
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path} as a state dict ({first}); save weights with "
                        "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') or "
                        "torch.save(model.state_dict(), 'model.pt') — a whole pickled model is not loaded",
                        field=field) from None
    for inner in ("state_dict", "model_state_dict", "model"):  # a training checkpoint {"model": ..., "epoch": ...}
        if isinstance(state, dict) and isinstance(state.get(inner), dict):
            state = state[inner]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict (a mapping of parameter names to tensors); save "
                        "model.state_dict()", field=field)
    return {_unwrapped(k): v for k, v in state.items()}


def _unwrapped(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, num_classes: int, field: str,
                   source: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly (eval mode), or raise a :class:`UserError` saying what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, list(state[k].shape), list(v.shape)) for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        last = [k for k in own if own[k].dim() >= 1][-1] if own else None
        if last is not None and any(k == last for k, _, _ in shapes):
            got = dict((k, s) for k, s, _ in shapes)[last][0]
            raise UserError(f"{source} predicts {got} classes (its {last} has shape {list(state[last].shape)}) but "
                            f"the dataset has {num_classes}; audit it on the data it was trained for", field=field)
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}"
                         + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        parts += [f"{k}: checkpoint {a} vs architecture {b}" for k, a, b in shapes[:5]]
        raise UserError(f"{source} does not fit the architecture in model: — " + "; ".join(parts)
                        + ". Name the architecture the weights were saved from (model.arch and model.params, or "
                        "your own 'package.module:function')", field=field)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.eval()
