"""Seeded split plans: which samples the target trains on, which it never sees, and who else may use what.

Roles (pairwise disjoint):

- ``target_members``     the target model's training set (the audited IN samples);
- ``target_nonmembers``  audited OUT samples, never trained on by the target;
- ``population``         the attacker's data: RMIA's population samples z (and, with ``reference.pool:
  audited_and_population``, reference-model training data); nothing the defender trains on;
- ``calibration``        held by the defender, never trained on, never audited (validation, known non-members);
- ``test``               utility evaluation only;
- ``calibration_members`` trained on by every target but never audited: the defender's known members (DIFFENCE
  calibrates on them); empty unless configured;
- ``defender_reference`` the defender's own public data, disjoint from everything the attacker uses: DMP's
  unlabeled reference set, AdvReg's non-members; empty unless configured;
- ``canaries``           one-run DP auditing (``audit.canaries``): each trained on by the target by a fair coin,
  IN or OUT for reference models like the audited samples, never audited by the ordinary attacks; empty unless
  configured.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from raymia.parquet_io import read_table, write_table

ROLES: tuple[str, ...] = ("target_members", "target_nonmembers", "population", "calibration", "test",
                          "calibration_members", "defender_reference", "canaries")


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """Index arrays into a dataset, one per role in :data:`ROLES`, plus the data fingerprint they refer to."""

    indices: dict[str, np.ndarray]
    seed: int
    data_fingerprint: str

    def __post_init__(self) -> None:
        self.check_disjoint()

    def __getitem__(self, role: str) -> np.ndarray:
        return self.indices[role]

    def sizes(self) -> dict[str, int]:
        return {role: int(len(self.indices[role])) for role in ROLES}

    def used_indices(self) -> np.ndarray:
        """Sorted union of all roles: the samples any model is ever asked about."""
        return np.sort(np.concatenate([self.indices[r] for r in ROLES]))

    def check_disjoint(self) -> None:
        """Raise ``AssertionError`` if any sample sits in two roles or twice in one role."""
        all_idx = np.concatenate([self.indices[r] for r in ROLES])
        uniq, counts = np.unique(all_idx, return_counts=True)
        if (counts > 1).any():
            raise AssertionError(f"split roles overlap on {int((counts > 1).sum())} samples, e.g. {uniq[counts > 1][:5]}")

    def content_hash(self) -> str:
        """SHA-256 over the data fingerprint and every role's index array (order included)."""
        h = hashlib.sha256(self.data_fingerprint.encode())
        for role in ROLES:
            h.update(role.encode())
            h.update(np.ascontiguousarray(self.indices[role], dtype=np.int64).tobytes())
        return h.hexdigest()

    def to_parquet(self, path: str | Path) -> Path:
        """Write ``(index, role)`` rows to Parquet atomically; the hash, seed and fingerprint go in metadata."""
        index = np.concatenate([self.indices[r] for r in ROLES]).astype(np.int64)
        role = np.concatenate([np.full(len(self.indices[r]), r) for r in ROLES])
        table = pa.table({"index": index, "role": pa.array(role).dictionary_encode()})
        return write_table(table, path, {"raymia.split_hash": self.content_hash(), "raymia.seed": str(self.seed),
                                         "raymia.data_fingerprint": self.data_fingerprint})

    @classmethod
    def from_parquet(cls, path: str | Path) -> "SplitPlan":
        """Read a plan written by :meth:`to_parquet`; raises ``ValueError`` if its recorded hash does not match."""
        table, meta = read_table(path)
        index = table.column("index").to_numpy()
        role = np.asarray(table.column("role").to_pylist())
        plan = cls({r: index[role == r] for r in ROLES}, int(meta["raymia.seed"]), meta["raymia.data_fingerprint"])
        if plan.content_hash() != meta["raymia.split_hash"]:
            raise ValueError(f"{path}: split content does not match its recorded hash (file altered or truncated)")
        return plan


def make_split_plan(n: int, fractions: dict[str, float], *, seed: int, data_fingerprint: str,
                    members: np.ndarray | None = None, nonmembers: np.ndarray | None = None) -> SplitPlan:
    """Partition ``range(n)`` into the roles at the given fractions (which sum to at most 1).

    Sizes are ``floor(fraction * n)``; samples left over are unused. The permutation comes from
    ``numpy.random.default_rng(seed)``, so the same ``(n, fractions, seed)`` always gives the same plan.

    ``members`` (and ``nonmembers``): rows a model the user brings was trained on (and rows to audit as its
    non-members), fixed instead of drawn. The other roles are drawn at their fractions from the remaining rows, in
    the permutation's order, so giving exactly the rows a seeded plan drew as its members reproduces that plan;
    ``calibration_members`` (known members) are then drawn from ``members``.
    """
    perm = np.random.default_rng(seed).permutation(n)
    sizes = {r: int(np.floor(fractions.get(r, 0.0) * n)) for r in ROLES}
    out: dict[str, np.ndarray] = {}
    if members is not None:
        known = sizes.pop("calibration_members")
        if known >= len(members):
            raise ValueError(f"calibration_members ({known}) must be fewer than the {len(members)} given members")
        chosen = np.random.default_rng([seed, 0xCA1]).choice(members, size=known, replace=False)
        out["calibration_members"] = np.sort(chosen).astype(np.int64)
        out["target_members"] = np.setdiff1d(members, chosen).astype(np.int64)
        sizes.pop("target_members")
        taken = members
        if nonmembers is not None:
            out["target_nonmembers"] = np.sort(nonmembers).astype(np.int64)
            sizes.pop("target_nonmembers")
            taken = np.union1d(members, nonmembers)
        perm = perm[~np.isin(perm, taken)]
    if sum(sizes.values()) > len(perm):
        raise ValueError(f"split sizes {sizes} exceed the {len(perm)} samples available")
    start = 0
    for role in ROLES:
        if role in sizes:
            out[role] = np.sort(perm[start:start + sizes[role]]).astype(np.int64)
            start += sizes[role]
    return SplitPlan({r: out[r] for r in ROLES}, seed, data_fingerprint)


def reference_keep_mask(pool_size: int, n_models: int, *, fraction: float, seed: int) -> np.ndarray:
    """Bool ``[n_models, pool_size]``: row ``k`` marks the pool samples reference model ``k`` trains on.

    With ``fraction == 0.5`` and an even number of models, models come in complementary pairs (a random
    half and the other half of the pool), so every sample is IN for exactly half of the models and OUT for the
    other half, and every model trains on ``pool_size // 2`` or ``(pool_size + 1) // 2`` samples. Otherwise
    each model independently draws exactly ``round(fraction * pool_size)`` samples.
    """
    rng = np.random.default_rng([seed, 0x5AD0])
    keep = np.zeros((n_models, pool_size), dtype=bool)
    if fraction == 0.5 and n_models % 2 == 0:
        for k in range(0, n_models, 2):
            first = rng.permutation(pool_size)[: pool_size // 2]
            keep[k, first] = True
            keep[k + 1] = ~keep[k]
        return keep
    n_in = int(round(fraction * pool_size))
    for k in range(n_models):
        keep[k, rng.choice(pool_size, size=n_in, replace=False)] = True
    return keep
