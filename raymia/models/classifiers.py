"""Classifier architectures: an MLP, a small CNN and a CIFAR-style ResNet-18, plus user plug-ins.

Every builder takes ``(input_shape, num_classes, **params)`` and returns an ``nn.Module`` mapping
``[B, *input_shape]`` float inputs to ``[B, num_classes]`` logits.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from raymia.errors import UserError
from raymia.imports import is_import_path, load_callable


class MLP(nn.Module):
    """Fully connected net on flattened inputs: ``[B, *shape] -> [B, num_classes]``."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256, 256),
                 dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[activation]
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), act()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two or more conv-ReLU-maxpool stages and one hidden FC layer: ``[B, C, H, W] -> [B, num_classes]``."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = (32, 64),
                 hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs image inputs [C, H, W], got input shape {input_shape}")
        c, h, w = input_shape
        stages: list[nn.Module] = []
        for out in channels:
            stages += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            if min(h, w) >= 2:
                stages.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(),
                                  nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool, widths 64-128-256-512): ``[B, C, H, W] -> [B, num_classes]``."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"resnet18 needs image inputs [C, H, W], got input shape {input_shape}")
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        c = width
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(_BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "resnet18": ResNet18}


class ModelSpec(BaseModel):
    """Which architecture to build: a registry name (``mlp``, ``cnn``, ``resnet18``) or ``module:function``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "mlp"
    params: dict[str, Any] = {}

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ARCHITECTURES and not is_import_path(v):
            raise ValueError(f"unknown architecture '{v}'; choose one of {sorted(ARCHITECTURES)} or give "
                             "'package.module:function' returning an nn.Module")
        return v


def resolve_builder(spec: ModelSpec, *, field: str = "model") -> Callable[..., nn.Module]:
    """The registry entry or user plug-in function that ``spec.arch`` names."""
    return ARCHITECTURES.get(spec.arch) or load_callable(spec.arch, field=f"{field}.arch")


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, *, seed: int | None = None,
                field: str = "model", builder: Callable[..., nn.Module] | None = None) -> nn.Module:
    """Instantiate ``spec`` for the data; with ``seed`` the initial weights are reproducible.

    ``builder`` short-cuts the lookup of ``spec.arch`` (a plug-in resolved elsewhere and shipped here).
    Raises :class:`UserError` naming ``field`` if the architecture rejects its params or the input shape.
    """
    builder = builder or resolve_builder(spec, field=field)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = builder(tuple(input_shape), num_classes, **spec.params)
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"architecture '{spec.arch}' cannot be built with params {spec.params} for inputs "
                        f"{tuple(input_shape)} and {num_classes} classes: {exc}", field=field) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"'{spec.arch}' returned {type(model).__name__}, not a torch.nn.Module", field=f"{field}.arch")
    return model


def check_model(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, *, field: str = "model") -> None:
    """Build ``spec`` and run one forward pass, so shape mismatches surface before any training starts."""
    model = build_model(spec, input_shape, num_classes, field=field).eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape)))
    except RuntimeError as exc:
        raise UserError(f"architecture '{spec.arch}' fails on inputs of shape {tuple(input_shape)}: {exc}",
                        field=field) from None
    if tuple(out.shape) != (2, num_classes):
        raise UserError(f"architecture '{spec.arch}' returns shape {tuple(out.shape)[1:]} per input; expected "
                        f"({num_classes},) logits", field=field)
