"""Fréchet distance between feature distributions of generated and held-out real images.

``fid`` uses torchvision's Inception-v3 with ImageNet weights from a local file the user names (nothing is
downloaded; values follow torchvision's network, not the TF-Inception port of pytorch-fid, so compare them with
each other rather than with published FIDs). Without that file the features come from a small CNN trained here
on the held-out real images' labels, and the metric is named ``fid_proxy``: useful to rank models trained on
the same data, never comparable with published FID.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from raymia.errors import UserError

Features = Callable[[torch.Tensor], np.ndarray]  # images [n, C, H, W] in [0, 1] -> features [n, d]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||μ_a - μ_b||² + Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½) of features ``a [n, d]`` and ``b [m, d]``."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # dead feature units make the product singular; sqrtm is still right
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():  # near-singular product: regularise as pytorch-fid does
            eps = np.eye(len(cov_a)) * 1e-6
            root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


class _ProxyNet(nn.Module):
    def __init__(self, channels: int, classes: int, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width // 2, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def proxy_features(x01: torch.Tensor, labels: np.ndarray, *, seed: int = 0, epochs: int = 40,
                   device: torch.device | str = "cpu") -> tuple[Features, float]:
    """Train a small CNN classifier on real images ``[n, C, H, W]`` and their labels; return its penultimate
    features (64-d) and its training accuracy (a feature extractor that cannot classify the data is useless)."""
    torch.manual_seed(seed)
    net = _ProxyNet(x01.shape[1], int(labels.max()) + 1).to(device)
    x, y = x01.to(device), torch.as_tensor(labels, device=device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(net(x[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())

    def features(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([net.body(images[i:i + 512].to(device)) for i in range(0, len(images), 512)]).cpu().numpy()
    return features, acc


def inception_features(weights: Path, *, device: torch.device | str = "cpu") -> Features:
    """2048-d pool features of torchvision's Inception-v3 loaded (tensors only) from ``weights``."""
    from torchvision.models import inception_v3

    if not Path(weights).is_file():
        raise UserError(f"Inception weights not found: {weights}; give the path of torchvision's inception_v3 "
                        "ImageNet state dict, or leave fid.inception_weights empty for fid_proxy",
                        field="fid.inception_weights")
    # torchvision's ImageNet weights (ported from TensorFlow) expect inputs scaled to [-1, 1]; with
    # transform_input=True, as torchvision builds them, the network maps ImageNet-normalised inputs to that scale
    net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    try:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - torch.load raises UnpicklingError, RuntimeError, EOFError, ...
        raise UserError(f"{weights} is not a torchvision inception_v3 state dict: {str(exc)[:300]}",
                        field="fid.inception_weights") from None
    net.fc = nn.Identity()
    net.eval().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def features(images: torch.Tensor) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 128):
                x = images[i:i + 128].to(device)
                x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                out.append(net((x - mean) / std).cpu())
        return torch.cat(out).numpy()
    return features
