"""DualMD and DistillMD (Tran et al., "Dual-Model Defense", arXiv 2410.16657): defenses for diffusion models.

Both split the members D into disjoint halves D1, D2 and train a teacher θ1 on D1 and θ2 on D2.

- DualMD deploys both and samples with them alternately (:func:`raymia.diffusion.sampling.sample` with two
  ε-functions), one network call per step; a white-box attacker of the deployed system queries
  :func:`parity_eps`, the ε-function that sampler uses at each timestep.
- DistillMD deploys only a student trained on member images whose regression target is the ε̂ of the teacher
  that did NOT train on the image: each batch comes from one half (D1 on even steps, D2 on odd steps) and the
  ground-truth noise is never used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from raymia.diffusion.sampling import EpsFn


def split_halves(members: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint halves (D1, D2) of ``members`` by a seeded permutation; D1 gets ⌊n/2⌋."""
    perm = np.random.default_rng(seed).permutation(len(members))
    half = len(members) // 2
    return np.sort(members[perm[:half]]), np.sort(members[perm[half:]])


def parity_eps(theta1: EpsFn, theta2: EpsFn) -> EpsFn:
    """DualMD's system as a white-box attacker queries it: ε̂ from θ2 where t is even, θ1 where t is odd (the
    model its DDPM sampler uses at that step). Each model is called only on its own rows."""
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        even = t % 2 == 0
        if even.all():
            return theta2(x, t)
        if not even.any():
            return theta1(x, t)
        out = torch.empty_like(x)
        out[even] = theta2(x[even], t[even])
        out[~even] = theta1(x[~even], t[~even])
        return out
    return eps


@dataclass
class DistillSchedule:
    """Batches and targets of DistillMD's student, over a training array whose rows ``halves[h]`` form D_{h+1}.

    ``batch_rows`` draws step s's batch from half s % 2; ``target`` answers it with the other half's teacher.
    Every (step, rows, half, teacher) is recorded in ``log`` when ``record`` is set.
    """

    halves: tuple[np.ndarray, np.ndarray]
    batch_size: int
    teachers: tuple[EpsFn, EpsFn] | None = None
    record: bool = False
    log: list[tuple[int, np.ndarray, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = max(int(h.max()) for h in self.halves) + 1
        self._half_of = np.full(n, -1)
        for h, rows in enumerate(self.halves):
            if (self._half_of[rows] >= 0).any():
                raise ValueError("the halves of DistillMD must be disjoint")
            self._half_of[rows] = h
        self._step = 0

    def batch_rows(self, step: int, gen: torch.Generator) -> torch.Tensor:
        """``[batch_size]`` rows, uniformly with replacement from half ``step % 2``."""
        half = self.halves[step % 2]
        self._step = step
        return torch.from_numpy(half)[torch.randint(0, len(half), (self.batch_size,), generator=gen)]

    def half_of(self, rows: torch.Tensor) -> int:
        """The one half all ``rows`` belong to (raises if they mix halves)."""
        halves = np.unique(self._half_of[rows.cpu().numpy()])
        if len(halves) != 1 or halves[0] < 0:
            raise ValueError(f"a DistillMD batch must come from one half, got halves {halves.tolist()}")
        return int(halves[0])

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """ε̂ of the teacher that did not train on ``rows``; ``noise`` (the ground truth) is ignored by design."""
        half = self.half_of(rows)
        teacher = 1 - half
        if self.record:
            self.log.append((self._step, rows.cpu().numpy().copy(), half, teacher))
        return self.teachers[teacher](x_t, t)
