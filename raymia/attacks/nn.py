"""Shadow-model neural-network attack (Shokri et al. 2017) in the black-box form of Nasr et al. (2018).

An attack network sees three views of one query — the softmax vector, the one-hot true label and the loss —
through separate branches that are concatenated and classified IN/OUT. It is trained on shadow models'
outputs on their own IN and OUT samples and then scores the target's outputs. Training reuses the platform's
one classifier loop (two-class cross-entropy); the score is the attack's log-odds of "member".
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raymia.attacks.outputs import ModelOutputs, ShadowOutputs
from raymia.training.loop import TrainRecipe, predict_logits, train_classifier


class NNAttackConfig(BaseModel):
    """Attack-network training knobs. ``width`` is the first layer of the softmax branch (Nasr et al.: 1024)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(512, ge=1)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(256, ge=8)
    seed: int = 0
    #: shadow (model, sample) rows the attack network trains on: a seeded sample of that many (None: all). 64
    #: reference models on a 21,000-sample pool give 1.3 M rows; the network does not need them all.
    max_rows: int | None = Field(50_000, ge=100)


class AttackNet(nn.Module):
    """``[B, 2C + 1]`` features (softmax, one-hot label, loss) -> ``[B, 2]`` logits (OUT, IN)."""

    def __init__(self, num_classes: int, width: int = 256):
        super().__init__()
        c = num_classes
        self.num_classes = c
        self.probs = nn.Sequential(nn.Linear(c, width), nn.ReLU(), nn.Linear(width, 64), nn.ReLU())
        self.label = nn.Sequential(nn.Linear(c, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.loss = nn.Sequential(nn.Linear(1, c), nn.ReLU(), nn.Linear(c, 64), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(192, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                  nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        c = self.num_classes
        h = torch.cat([self.probs(feats[:, :c]), self.label(feats[:, c:2 * c]), self.loss(feats[:, 2 * c:])], dim=1)
        return self.head(h)


def membership_features(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, 2C + 1]`` float32 from logits ``[B, C]``: softmax probabilities, one-hot label, cross-entropy (capped at
    30). Differentiable, so adversarial regularisation can train against the same view of a model's outputs."""
    logp = torch.log_softmax(logits.double(), dim=1)
    ce = (-logp.gather(1, labels[:, None])).clamp(max=30.0)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).to(logp.dtype)
    return torch.cat([logp.exp(), onehot, ce], dim=1).float()


def attack_features(out: ModelOutputs) -> torch.Tensor:
    """:func:`membership_features` of stored outputs."""
    return membership_features(torch.from_numpy(out.logits), torch.from_numpy(np.asarray(out.labels, dtype=np.int64)))


def nn_attack_scores(shadow: ShadowOutputs, targets: list[ModelOutputs], cfg: NNAttackConfig | None = None
                     ) -> list[np.ndarray]:
    """Train the attack network on ``shadow`` and return its member log-odds ``[n_i]`` for each of ``targets``."""
    cfg = cfg or NNAttackConfig()
    num_classes = shadow.outputs.logits.shape[1]
    torch.manual_seed(cfg.seed)
    net = AttackNet(num_classes, cfg.width)
    recipe = TrainRecipe(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr)
    rows = np.arange(len(shadow.is_member))
    if cfg.max_rows is not None and len(rows) > cfg.max_rows:
        rows = np.sort(np.random.default_rng([cfg.seed, 0x5A]).choice(len(rows), cfg.max_rows, replace=False))
    y = torch.from_numpy(shadow.is_member[rows].astype(np.int64))
    sample = ModelOutputs(shadow.outputs.logits[rows], np.asarray(shadow.outputs.labels)[rows])
    train_classifier(net, attack_features(sample), y, recipe, seed=cfg.seed)
    scores = []
    for t in targets:
        logits = predict_logits(net, attack_features(t)).astype(np.float64)
        scores.append(logits[:, 1] - logits[:, 0])
    return scores
