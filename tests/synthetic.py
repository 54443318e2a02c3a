"""Synthetic attack inputs with a controllable membership signal (no training), for fast attack tests."""

from __future__ import annotations

import numpy as np

from raymia.attacks.suite import AttackInputs


def synthetic_inputs(rng: np.random.Generator, *, n: int = 4000, k: int = 16, m: int = 1000, c: int = 10,
                     views: int = 2, lo_views: int = 8, margin: float = 0.0) -> AttackInputs:
    """``n`` audited examples (half members), ``k`` reference models (each example IN for about half), ``m``
    population samples. Every example has its own difficulty shared by all models; training on it raises the
    true-class logit by ``margin`` (0 = members and non-members identically distributed)."""
    labels, z_labels = rng.integers(0, c, n), rng.integers(0, c, m)
    difficulty, z_difficulty = rng.normal(2.5, 1.5, n), rng.normal(2.5, 1.5, m)
    is_member = rng.permutation(np.arange(n) < n // 2)
    ref_in = rng.random((k, n)) < 0.5

    def logits(models: int, diff: np.ndarray, lab: np.ndarray, trained: np.ndarray) -> np.ndarray:
        out = rng.normal(0, 1, (models, len(lab), views, c))
        boost = diff[None, :] + margin * trained + rng.normal(0, 0.5, trained.shape)
        out[:, np.arange(len(lab)), :, lab] += boost.T[:, :, None]  # advanced indices first: [n, models, views]
        return out.astype(np.float32)

    def label_only(diff: np.ndarray, lab: np.ndarray, trained: np.ndarray) -> np.ndarray:
        p_right = 1 / (1 + np.exp(-(diff + margin * trained - 2.0)))
        right = rng.random((len(lab), lo_views)) < p_right[:, None]
        return np.where(right, lab[:, None], (lab[:, None] + 1) % c).astype(np.int16)

    refs = logits(k, difficulty, labels, ref_in)
    return AttackInputs(
        target=logits(1, difficulty, labels, is_member[None])[0], labels=labels, is_member=is_member,
        refs=refs, ref_in=ref_in, target_label_only=label_only(difficulty, labels, is_member),
        shadow_logits=refs.reshape(-1, views, c), shadow_labels=np.tile(labels, k), shadow_in=ref_in.reshape(-1),
        shadow_label_only=np.concatenate([label_only(difficulty, labels, ref_in[j]) for j in range(k)]),
        z_target=logits(1, z_difficulty, z_labels, np.zeros((1, m), bool))[0],
        z_refs=logits(k, z_difficulty, z_labels, np.zeros((k, m), bool)), z_ref_in=np.zeros((k, m), bool),
        z_labels=z_labels,
    )
