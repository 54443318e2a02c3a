"""Device choice: CUDA when present (or demanded), CPU otherwise."""

from __future__ import annotations

import torch

from raymia.errors import UserError


def resolve_device(preference: str = "auto") -> torch.device:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N"`` to a torch device; ``auto`` picks CUDA if it is available."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA was requested but this process sees no GPU; use compute.device: auto or cpu",
                        field="compute.device")
    return torch.device(preference)
