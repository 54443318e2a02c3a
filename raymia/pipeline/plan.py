"""What an audit will train before anything trains: the split, the reference keep-mask and one job per model.

A :class:`TrainJob` is one classifier (a target or one of its reference models) with everything that determines
its weights, so its content key says when a cached model can be reused. The defended architecture of a target
configuration (:func:`defended_spec`) is worked out here once and read from the job everywhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import TypeAdapter
from torch import nn

import raymia
from raymia.config import AuditConfig, TargetConfig
from raymia.data.datasets import Dataset
from raymia.data.queries import is_image, views_fingerprint
from raymia.data.splits import SplitPlan, make_split_plan, reference_keep_mask
from raymia.defenses import DefenseConfig, make_defense
from raymia.errors import UserError
from raymia.data.rows import read_rows
from raymia.imports import is_import_path, load_callable
from raymia.models.checkpoints import file_digest, fit_state_dict, read_state_dict
from raymia.keys import content_key, derive_seed
from raymia.models.classifiers import (
    ModelSpec,
    build_model,
    check_model,
    resolve_builder,
)
from raymia.sweep import expand_sweep, variant_label


def defended_spec(target: TargetConfig) -> ModelSpec:
    """The architecture actually trained for ``target`` (its defense may change it, e.g. add dropout)."""
    return make_defense(target.defense).model_spec(target.model)


@dataclass(frozen=True, eq=False)
class DefenseRows:
    """Dataset rows a defense may use besides the protected ones: the defender-held calibration split
    (validation) and the defender's reference data (split role ``defender_reference``), both disjoint from every
    audited sample and from the attacker's population."""

    calibration: np.ndarray
    reference: np.ndarray


NO_ROWS = DefenseRows(np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass(frozen=True, eq=False)
class TrainJob:
    """A target or one of its reference models, and its content-addressed cache key.

    The key covers architecture, recipe, defense (and the rows it uses), data fingerprint, the exact training
    indices, the seed, the models it trains together with, and the raymia version: change any of them and the
    model is retrained.
    """

    job_id: str
    target: TargetConfig
    role: Literal["target", "reference"]
    index: int
    train_indices: np.ndarray
    seed: int
    data_fingerprint: str
    defense_rows: DefenseRows = NO_ROWS
    group: int = 0  # the fixed training group (``reference.group_size``) this model trains in
    group_seeds: tuple[int, ...] = ()  # the seeds of that group's models, in order (they share vmap randomness)


    @property
    def spec(self) -> ModelSpec:
        """The defended architecture this job trains."""
        return defended_spec(self.target)

    @property
    def given(self) -> bool:
        """A target the user brings (weights or an endpoint): loaded or queried, never trained."""
        return self.role == "target" and self.target.given

    @property
    def key(self) -> str:
        if self.given:
            t = self.target
            source = ({"endpoint": t.endpoint.model_dump(mode="json", exclude={"headers"})} if t.endpoint is not None
                      else {"weights": file_digest(t.weights), "model": t.model.model_dump(mode="json")})
            return content_key({"given": source, "data": self.data_fingerprint,
                                "indices": np.asarray(self.train_indices, dtype=np.int64), "code": raymia.__version__})
        uses_rows = make_defense(self.target.defense).uses_context_rows
        return content_key({
            "model": self.target.model.model_dump(mode="json"),
            "train": self.target.train.model_dump(mode="json"),
            "defense": self.target.defense.model_dump(mode="json"),
            "defense_rows": [self.defense_rows.calibration, self.defense_rows.reference] if uses_rows else None,
            "data": self.data_fingerprint,
            "indices": np.asarray(self.train_indices, dtype=np.int64),
            "seed": self.seed,
            "group": list(self.group_seeds),
            "train_fn": train_fn_digest(self.target.train.fn),
            "code": raymia.__version__,
        })

    def build(self, dataset: Dataset, *, seed: int | None = None,
              builders: dict[str, Callable[..., nn.Module]] | None = None) -> nn.Module:
        """A fresh network of this job's defended architecture for ``dataset``."""
        spec = self.spec
        return build_model(spec, dataset.input_shape, dataset.num_classes, seed=seed,
                           builder=(builders or {}).get(spec.arch))


@dataclass(frozen=True, eq=False)
class AuditPlan:
    """Everything decided before training: data, split, reference pool and keep-mask, the models to train.

    A reference model k trains on ``pool[keep[k]]`` plus the defender's known members (which every target trains
    on too), so with ``reference.pkeep: auto`` its training set is exactly as large as the target's.
    """

    config: AuditConfig
    dataset: Dataset
    split: SplitPlan
    pool: np.ndarray  # sorted dataset rows reference models sample their training sets from
    keep: np.ndarray  # bool [K, |pool|]
    jobs: list[TrainJob]
    scored_indices: np.ndarray  # sorted dataset rows every model is queried on
    views_id: str
    canary_in: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # canaries whose coin
    # came up heads: the target trains on them (one-run auditing, ``audit.canaries``)
    label_rows: np.ndarray | None = None  # positions in scored_indices queried in the label-only views (the pool
    # and the audited samples, where the label-only attack reads them; none when it is not enabled)

    @property
    def target_rows(self) -> np.ndarray:
        """What every target trains on: the members, the defender's known members and the canaries drawn IN."""
        return np.union1d(np.union1d(self.split["target_members"], self.split["calibration_members"]),
                          self.canary_in)

    def reference_rows(self, k: int) -> np.ndarray:
        """What reference model ``k`` trains on."""
        return np.union1d(self.pool[self.keep[k]], self.split["calibration_members"])

    def size_mismatch(self) -> str | None:
        """A sentence if some reference model's training set differs from the target's by more than one sample."""
        n, sizes = len(self.target_rows), [len(self.reference_rows(k)) for k in range(len(self.keep))]
        coin_slack = abs(len(self.canary_in) - len(self.split["canaries"]) / 2)  # the coins' deviation from m/2
        if max(abs(s - n) for s in sizes) <= 1 + coin_slack:
            return None
        return (f"reference models train on {min(sizes)}-{max(sizes)} samples, the target on {n}: LiRA and RMIA "
                "assume the target is distributed like a reference model; use reference.pkeep: auto")

    def target_jobs(self, target: str) -> list[TrainJob]:
        """The target first, then its reference models in order."""
        return [j for j in self.jobs if j.target.name == target]


def train_fn_digest(path: str | None) -> str | None:
    """``"package.module:fit"`` and a hash of its module's source: a changed training function retrains."""
    if path is None:
        return None
    fn = load_callable(path, field="train.fn")
    try:
        source = inspect.getsource(inspect.getmodule(fn))
    except (OSError, TypeError):
        source = getattr(fn, "__qualname__", path)
    return f"{path}@{hashlib.sha256(source.encode()).hexdigest()[:16]}"


#: TargetConfig fields that say where a given target comes from, not how models like it are trained.
SOURCE_FIELDS = {"name", "weights", "model_uri", "allow_pickle", "endpoint"}


def check_target(target: TargetConfig, dataset: Dataset, *, field: str) -> None:
    """Build the target's (defended) architecture and run it once, so bad plug-ins or incompatible defenses fail
    before training; a given target's weights must fit it."""
    if target.train.fn is not None:
        load_callable(target.train.fn, field=f"{field}.train.fn")
    if target.weights is not None:
        model = build_model(defended_spec(target), dataset.input_shape, dataset.num_classes)
        fit_state_dict(model, read_state_dict(target.weights, field=f"{field}.weights"),
                       num_classes=dataset.num_classes, field=f"{field}.weights",
                       source=target.model_uri or str(target.weights))
    spec = defended_spec(target)
    check_model(spec, dataset.input_shape, dataset.num_classes, field=f"{field}.model")
    make_defense(target.defense).check(build_model(spec, dataset.input_shape, dataset.num_classes),
                                       field=f"{field}.defense")


def plan_audit(cfg: AuditConfig, dataset: Dataset) -> AuditPlan:
    """Split the data, draw the reference keep-mask and list one job per target and reference model.

    The reference pool holds the audited samples (members and non-members; plus the population if configured),
    so every audited sample is IN for about ``pkeep * K`` reference models (LiRA/RMIA online need IN models).
    A sweep's configurations get their jobs when they are audited (:func:`jobs_for_target`).
    """
    for i, t in enumerate(cfg.targets):
        check_target(t, dataset, field=f"targets.{i}")
    if "hflip" in cfg.attacks.queries and not is_image(dataset.input_shape):
        raise UserError(f"hflip needs image inputs; {dataset.name} has feature vectors of shape "
                        f"{dataset.input_shape}; use [identity]", field="attacks.queries")
    split = _split(cfg, dataset)
    m = len(split["canaries"])
    coins = np.random.default_rng([cfg.seed, 0xC0_1A]).random(m) < 0.5  # one fair coin per canary
    if m and cfg.audit.canary_kind == "mislabelled":
        dataset = mislabelled(dataset, split["canaries"], seed=cfg.seed)
    ref = cfg.reference
    pool_roles = ["target_members", "target_nonmembers"] + (["population"] if ref.pool != "audited" else [])
    pool = np.sort(np.concatenate([split[r] for r in pool_roles + ["canaries"]]))
    # auto: reference models train on as many samples as the target expects to (members + half the canaries);
    # never on the coins themselves, so the one-run bound's guesses are independent of them
    pkeep = (len(split["target_members"]) + m / 2) / len(pool) if ref.pkeep == "auto" else ref.pkeep
    keep = reference_keep_mask(len(pool), ref.count, fraction=pkeep, seed=cfg.seed)
    scored = split.used_indices()
    label_rows = (np.flatnonzero(np.isin(scored, pool)) if "label_only_aug" in cfg.attacks.enabled
                  else np.zeros(0, np.int64))
    views_id = views_fingerprint(list(cfg.attacks.queries), cfg.attacks.label_only, label_rows)
    plan = AuditPlan(cfg, dataset, split, pool, keep, [], scored, views_id, split["canaries"][coins], label_rows)
    return dataclasses.replace(plan, jobs=[j for t in cfg.targets for j in jobs_for_target(plan, t)])


def _split(cfg: AuditConfig, dataset: Dataset) -> SplitPlan:
    """The seeded split, with ``audit.canaries`` rows carved out for one-run auditing."""
    fractions = cfg.split.fractions()
    m = cfg.audit.canaries if cfg.audit.mode == "one_run" else 0
    fractions["canaries"] = (m + 0.5) / len(dataset) if m else 0.0
    members, nonmembers = given_membership(cfg, len(dataset))
    try:
        split = make_split_plan(len(dataset), fractions, seed=cfg.seed, data_fingerprint=dataset.fingerprint(),
                                members=members, nonmembers=nonmembers)
    except ValueError as exc:
        if members is not None:
            raise UserError(f"{exc}: beside the {len(members)} given members"
                            + (f" and {len(nonmembers)} non-members" if nonmembers is not None else "")
                            + f", the other roles' fractions of the {len(dataset)} samples do not fit; lower them",
                            field="split") from None
        raise UserError(f"{m} canaries do not fit beside the split fractions in {len(dataset)} samples; lower "
                        "audit.canaries or the split fractions", field="audit.canaries") from None
    return split


def given_membership(cfg: AuditConfig, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The rows of ``split.members`` and ``split.nonmembers`` (checked: in range, distinct, disjoint)."""
    if cfg.split.members is None:
        return None, None
    members = read_rows(cfg.split.members, n, field="split.members")
    if cfg.split.nonmembers is None:
        return members, None
    nonmembers = read_rows(cfg.split.nonmembers, n, field="split.nonmembers")
    both = np.intersect1d(members, nonmembers)
    if len(both):
        raise UserError(f"{len(both)} rows are both members and non-members, e.g. {int(both[0])}; a non-member must "
                        "be a row the model never trained on", field="split.nonmembers")
    return members, nonmembers


def mislabelled(dataset: Dataset, rows: np.ndarray, *, seed: int) -> Dataset:
    """``dataset`` with each of ``rows`` relabelled to a different class drawn at random (seeded): the strong
    canaries of one-run auditing and of Aerni et al.'s evaluation. Its fingerprint differs from the original's."""
    y = dataset.y.copy()
    shift = np.random.default_rng([seed, 0x1AB]).integers(1, dataset.num_classes, len(rows))
    y[rows] = (y[rows] + shift) % dataset.num_classes
    return dataclasses.replace(dataset, y=y, meta={**dataset.meta, "mislabelled_rows": len(rows)})


def jobs_for_target(plan: AuditPlan, target: TargetConfig) -> list[TrainJob]:
    """The target's job (trained on the members and the defender's known members) and one job per reference model
    (its keep-mask row plus the known members)."""
    cfg, split, fp = plan.config, plan.split, plan.dataset.fingerprint()  # relabelled canaries change it
    rows = DefenseRows(split["calibration"], split["defender_reference"])
    # seeds follow what is trained, not the configuration's name: a renamed configuration (e.g. "<name>+diffence")
    # maps to the same models in the cache
    trained = target.model_dump(mode="json", exclude=SOURCE_FIELDS)
    if trained["train"].get("fn") is None:
        trained["train"].pop("fn", None)  # seeds of configs without train.fn are what they always were
    recipe = json.dumps(trained, sort_keys=True)
    seeds = [derive_seed(cfg.seed, recipe, "target")]
    seeds += [derive_seed(cfg.seed, recipe, "reference", k) for k in range(cfg.reference.count)]
    # fixed training groups: the models in order, in as few near-equal groups as group_size allows
    n_groups = -(-len(seeds) // cfg.reference.group_size)
    group_of = np.concatenate([np.full(len(c), g) for g, c in enumerate(np.array_split(np.arange(len(seeds)), n_groups))])
    members_of = {g: tuple(s for s, h in zip(seeds, group_of) if h == g) for g in range(n_groups)}
    jobs = [TrainJob(f"{target.name}/target", target, "target", 0, plan.target_rows, seeds[0], fp, rows, 0,
                     members_of[0])]
    for k in range(cfg.reference.count):
        g = int(group_of[k + 1])
        jobs.append(TrainJob(f"{target.name}/ref-{k:03d}", target, "reference", k, plan.reference_rows(k),
                             seeds[k + 1], fp, rows, g, members_of[g]))
    return jobs


def plugin_builders(cfg: AuditConfig) -> dict[str, Callable[..., nn.Module]]:
    """The user architectures (``module:function``) and training functions (``train.fn``) the config names,
    resolved once here (by their import paths)."""
    specs = [(f"targets.{i}.model", t.model) for i, t in enumerate(cfg.targets)]
    if cfg.sweep is not None:
        specs.append(("sweep.base.model", cfg.sweep.base.model))
    out = {spec.arch: resolve_builder(spec, field=field) for field, spec in specs if is_import_path(spec.arch)}
    recipes = [(f"targets.{i}.train.fn", t.train) for i, t in enumerate(cfg.targets)]
    if cfg.sweep is not None:
        recipes.append(("sweep.base.train.fn", cfg.sweep.base.train))
    out.update({r.fn: load_callable(r.fn, field=field) for field, r in recipes if r.fn is not None})
    return out


_DEFENSE = TypeAdapter(DefenseConfig)


def sweep_targets(cfg: AuditConfig, dataset: Dataset) -> list[TargetConfig]:
    """The sweep's concrete configurations (:func:`~raymia.sweep.expand_sweep`), each named by its settings and
    checked (built and run once) before anything trains."""
    sweep = cfg.sweep
    targets = []
    for i, defense in expand_sweep(sweep, cfg.seed):
        d = _DEFENSE.validate_python(defense)
        target = TargetConfig(name=variant_label(d), model=sweep.base.model, train=sweep.base.train, defense=d)
        check_target(target, dataset, field=f"sweep.defenses.{i}")
        targets.append(target)
    return targets
