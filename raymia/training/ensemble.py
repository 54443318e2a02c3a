"""Train many same-architecture models at once with ``torch.func`` (stacked weights + ``vmap``).

Each model keeps its own initial weights (built from its seed), its own training indices and its own batch
order (:func:`~raymia.training.loop.epoch_orders` with its seed), so the result equals training the models one
by one with :func:`~raymia.training.loop.train_classifier`, up to float rounding of batched kernels. Randomness
inside the network (dropout) is drawn per model but not from the same stream as one-by-one training.

Where ``vmap`` pays off: small MLPs on CPU (measured on 2 cores, 8 models: 7x for 64-256-10, 1.1-1.4x around
80k parameters, 0.8x for the 102k-parameter 784-128-10 Fashion-MNIST MLP (16 models, benchmarks/reference_pool.py),
0.6x for 64-512-512-10, where batched matmuls lose to plain ones) and small nets on GPU.
Convolutions on CPU lower to grouped convolutions and run slower than a loop (0.6x), and BatchNorm's in-place
running statistics do not vmap; :func:`prefers_vmap` encodes this and callers fall back to a loop of
:func:`train_classifier`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from raymia.training.loop import (
    TrainingPolicy,
    TrainRecipe,
    TrainResult,
    augment_batch,
    epoch_orders,
    make_lr_schedule,
    make_optimizer,
    train_classifier,
)

#: Above this many parameters per model, batched matmuls on CPU are slower than a loop of plain ones.
CPU_VMAP_MAX_PARAMS = 90_000


def prefers_vmap(model: nn.Module, policy: TrainingPolicy | None, device: torch.device | str) -> bool:
    """True where training a stack of copies of ``model`` with ``vmap`` is supported and faster than a loop."""
    if policy is not None and not policy.vmappable:
        return False
    mods = list(model.modules())
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods):
        return False
    if torch.device(device).type == "cuda":
        return True
    small = sum(p.numel() for p in model.parameters()) <= CPU_VMAP_MAX_PARAMS
    return small and not any(isinstance(m, nn.modules.conv._ConvNd) for m in mods)


def train_ensemble(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor,
                   index_sets: Sequence[np.ndarray | torch.Tensor], recipe: TrainRecipe, seeds: Sequence[int], *,
                   policy: TrainingPolicy | None = None, device: torch.device | str = "cpu") -> list[TrainResult]:
    """Train ``models[k]`` in place on rows ``index_sets[k]`` of ``x [n, *shape]`` / ``y [n]`` with ``seeds[k]``.

    All models share the architecture and ``recipe``; every index set has the same length.
    """
    k_models = len(models)
    if not (k_models == len(index_sets) == len(seeds)) or k_models == 0:
        raise ValueError("need one index set and one seed per model")
    sizes = {len(s) for s in index_sets}
    if len(sizes) != 1:
        raise ValueError(f"every model must train on the same number of samples, got sizes {sorted(sizes)}")
    n = sizes.pop()
    policy = policy or TrainingPolicy()
    device = torch.device(device)
    for m in models:
        m.to(device).train()
    params, buffers = stack_module_state(list(models))  # {name: [K, ...]} leaves / tensors
    base = copy.deepcopy(models[0]).to("meta")
    x, y = x.to(device), y.to(device)
    rows_of = torch.stack([torch.as_tensor(np.asarray(s), dtype=torch.long) for s in index_sets]).to(device)

    optimizer = make_optimizer(params.values(), recipe)
    steps_per_epoch = max(1, -(-n // recipe.batch_size))
    scheduler = make_lr_schedule(optimizer, recipe, steps_per_epoch)
    orders = [epoch_orders(n, s) for s in seeds]
    torch.manual_seed(seeds[0])

    epoch_loss = torch.full((k_models,), float("nan"))
    for epoch in range(recipe.epochs):
        def one_model_loss(p, b, xb, yb):
            with recipe.autocast(device):
                logits = functional_call(base, (p, b), (xb,))
            return policy.loss(logits.float(), yb, epoch=epoch)

        batched_loss = vmap(one_model_loss, randomness="different")
        perm = torch.stack([next(o) for o in orders]).to(device)  # [K, n]
        total = torch.zeros(k_models, device=device)
        for start in range(0, n, recipe.batch_size):
            rows = rows_of.gather(1, perm[:, start:start + recipe.batch_size])  # [K, B]
            xb = augment_batch(x[rows], recipe.augment, recipe.crop_padding)  # [K, B, ...]
            losses = batched_loss(params, buffers, xb, y[rows])  # [K]
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += losses.detach()
        epoch_loss = (total / steps_per_epoch).cpu()

    with torch.no_grad():
        for k, m in enumerate(models):
            m.load_state_dict({**{name: p[k] for name, p in params.items()},
                               **{name: b[k] for name, b in buffers.items()}})
            m.eval()
    return [TrainResult(epochs_run=recipe.epochs, final_loss=float(epoch_loss[k])) for k in range(k_models)]


def train_many(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, index_sets: Sequence[np.ndarray],
               recipe: TrainRecipe, seeds: Sequence[int], *,
               make_policy: Callable[[int, int], TrainingPolicy | None] = lambda n, seed: None, strategy: str = "auto",
               device: torch.device | str = "cpu", on_epoch: Callable[[int, nn.Module], None] | None = None
               ) -> tuple[int, list[dict[str, float]]]:
    """Train ``models[k]`` in place on rows ``index_sets[k]`` of ``x``/``y`` with ``seeds[k]``.

    Same-size groups train together with ``vmap`` where :func:`prefers_vmap` (or ``strategy="vmap"``) allows,
    the rest one by one. ``make_policy(n, seed)`` builds a fresh training policy for a model trained on n samples;
    ``on_epoch`` is passed to :func:`~raymia.training.loop.train_classifier` for models trained one by one.
    Returns how many models were trained inside a ``vmap`` ensemble and each model's policy extras.
    """
    by_size: dict[int, list[int]] = {}
    for k, rows in enumerate(index_sets):
        by_size.setdefault(len(rows), []).append(k)
    vmapped, extras = 0, [{} for _ in models]
    for n, ks in by_size.items():
        probe = make_policy(n, seeds[ks[0]])
        if len(ks) > 1 and strategy != "loop" and (strategy == "vmap" or prefers_vmap(models[ks[0]], probe, device)):
            train_ensemble([models[k] for k in ks], x, y, [index_sets[k] for k in ks], recipe, [seeds[k] for k in ks],
                           policy=probe, device=device)
            vmapped += len(ks)
            continue
        for k in ks:
            policy = make_policy(n, seeds[k])
            rows = torch.as_tensor(np.asarray(index_sets[k]), dtype=torch.long)
            train_classifier(models[k], x[rows], y[rows], recipe, seed=seeds[k], policy=policy, device=device,
                             on_epoch=on_epoch)
            extras[k] = dict(policy.extra) if policy is not None else {}
    return vmapped, extras
