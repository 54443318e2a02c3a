"""Correctness of the CUDA paths on a GPU machine (run there by hand; the CI machine has no GPU).

    python benchmarks/cuda_checks.py

DIFFENCE with the GPU defaults (bf16, torch.compile, NHWC): released labels equal the undefended labels, a fixed
seed gives identical output, per-query seeds make a query's output independent of its batch, chunking does not
change the output. Diffusion sampling and attacks run on the device.
"""

from __future__ import annotations

import numpy as np
import torch


def main() -> None:
    from raymia.attacks.diffusion import DiffusionAttackConfig, attack_scores
    from raymia.defenses.diffence import Diffence, DiffenceConfig
    from raymia.diffusion.model import DiffusionSpec, build_unet, make_noise_schedule
    from raymia.diffusion.sampling import sample, unet_eps
    from raymia.machine import describe_machine
    from raymia.models.classifiers import ModelSpec, build_model

    assert torch.cuda.is_available(), "needs a GPU"
    print(describe_machine())
    spec = DiffusionSpec(preset="ddpm_cifar")
    shape = (3, 32, 32)
    unet, clf = build_unet(spec, shape, seed=0), build_model(ModelSpec(arch="resnet18"), shape, 10, seed=0)
    abar = make_noise_schedule(spec).alphas_cumprod
    x = np.random.default_rng(0).random((48, *shape), dtype=np.float32)
    d = Diffence(clf, unet, abar, DiffenceConfig(n=8, scenario=3), device="cuda")
    plain = d.candidates(torch.from_numpy(x))[:, -1]
    a, b = d(x, seed=3), d(x, seed=3)
    assert (a.argmax(1) == plain.argmax(1)).all(), "released labels differ from the undefended labels"
    assert np.array_equal(a, b), "fixed seed is not reproducible on CUDA"
    together = d(x[:6], seeds=list(range(6)))
    alone = np.concatenate([d(x[i:i + 1], seeds=[i]) for i in range(6)])
    print("per-query seeds, max |batched - alone|:", float(np.abs(together - alone).max()))
    small = Diffence(clf, unet, abar, DiffenceConfig(n=8, scenario=3, chunk=7), device="cuda")
    print("chunk 7 vs auto, max |diff|:", float(np.abs(small(x, seed=3) - a).max()))
    eps = unet_eps(unet.cuda())
    imgs = sample([eps, eps], make_noise_schedule(spec).betas, 8, shape, steps=10, device="cuda")
    scores = attack_scores("secmi", eps, imgs.cuda() * 2 - 1, abar.cuda(), DiffusionAttackConfig())
    assert imgs.shape == (8, *shape) and torch.isfinite(scores).all()
    print("CUDA checks passed")


if __name__ == "__main__":
    main()
