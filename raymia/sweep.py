"""Defense sweeps in the YAML: each defense entry names fixed values and search dimensions.

    sweep:
      base: {model: {...}, train: {...}}      # architecture and recipe shared by every configuration
      defenses:
        - {name: none}
        - {name: relaxloss, alpha: {grid: [0.01, 0.02, 0.05]}}
        - {name: regularization, weight_decay: {loguniform: [1.0e-4, 1.0e-2]}, samples: 2}

A dimension is ``{grid: [...]}`` (every value), ``{choice: [...]}``, ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}`` (``samples`` draws per entry). Orchestration turns the
concrete configurations, drawn here with a seeded generator (:func:`expand_sweep`), into one
Ray Tune trial (or one local audit) each; this module validates them up front — every entry is checked with a
representative value of each dimension, so a typo fails before any trial starts — and names configurations.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from raymia.defenses import DefenseConfig
from raymia.models.classifiers import ModelSpec
from raymia.training.loop import TrainRecipe

DIMENSIONS = ("grid", "choice", "uniform", "loguniform", "randint")
_DEFENSE = TypeAdapter(DefenseConfig)


def is_dimension(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DIMENSIONS


def check_dimension(value: dict[str, Any]) -> Any:
    """Validate one dimension and return a representative value from it (``ValueError`` if malformed)."""
    kind, arg = next(iter(value.items()))
    if not isinstance(arg, list) or not arg:
        raise ValueError(f"{kind} needs a non-empty list")
    if kind in ("grid", "choice"):
        return arg[0]
    if len(arg) != 2 or not all(isinstance(a, (int, float)) for a in arg) or not arg[0] < arg[1]:
        raise ValueError(f"{kind} needs [low, high] with low < high, got {arg}")
    if kind == "loguniform" and arg[0] <= 0:
        raise ValueError("loguniform needs low > 0")
    if kind == "randint" and not all(isinstance(a, int) for a in arg):
        raise ValueError("randint needs integer bounds")
    return arg[0]


def is_sampled(entry: dict[str, Any]) -> bool:
    return any(is_dimension(v) and next(iter(v)) != "grid" for v in entry.values())


def resolve_representative(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with each dimension replaced by a representative value (``samples`` dropped)."""
    return {k: check_dimension(v) if is_dimension(v) else v for k, v in entry.items() if k != "samples"}


class SweepBase(BaseModel):
    """The architecture and recipe every swept configuration shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSpec = ModelSpec()
    train: TrainRecipe = TrainRecipe()


class SweepConfig(BaseModel):
    """A sweep over defenses and their hyper-parameters; each configuration is audited in its own Tune trial.

    ``objective: audit`` (default) trains the defended target and its reference pool and runs every attack in
    each trial, under FIFO scheduling (every audit must finish). ``objective: utility`` only trains the target
    and reports validation accuracy per epoch; only then may ``scheduler: asha`` stop poor trials early.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: SweepBase = SweepBase()
    defenses: list[dict[str, Any]] = Field(min_length=1)
    objective: Literal["audit", "utility"] = "audit"
    scheduler: Literal["fifo", "asha"] = "fifo"

    @field_validator("defenses")
    @classmethod
    def _entries_valid(cls, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, entry in enumerate(entries):
            if "name" not in entry:
                raise ValueError(f"entry {i} needs a defense name, e.g. {{name: relaxloss, alpha: {{grid: [0.1]}}}}")
            samples = entry.get("samples", 1)
            if not isinstance(samples, int) or samples < 1:
                raise ValueError(f"entry {i} ({entry['name']}): samples must be a positive integer")
            try:
                resolved = resolve_representative(entry)
            except ValueError as exc:
                raise ValueError(f"entry {i} ({entry['name']}): {exc}") from None
            try:
                _DEFENSE.validate_python(resolved)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"][1:]) or "name"
                raise ValueError(f"entry {i} ({entry['name']}): {where}: {err['msg']}") from None
        return entries

    @model_validator(mode="after")
    def _asha_only_for_utility(self) -> "SweepConfig":
        if self.scheduler == "asha" and self.objective != "utility":
            raise ValueError("asha stops trials early, which would drop audits; use scheduler: fifo, or "
                             "objective: utility for accuracy-only tuning")
        return self


def variant_label(defense: BaseModel) -> str:
    """A readable name for one configuration: the defense and the settings that differ from its defaults,
    e.g. ``relaxloss(alpha=0.02)``."""
    defaults = {k: f.default for k, f in type(defense).model_fields.items()}
    changed = {k: v for k, v in defense.model_dump().items() if k != "name" and v != defaults.get(k)}
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    inner = ",".join(f"{k}={fmt(v)}" for k, v in changed.items())
    return f"{defense.name}({inner})" if inner else defense.name


def _draw(kind: str, arg: list[Any], rng: np.random.Generator) -> Any:
    if kind == "choice":
        return arg[int(rng.integers(len(arg)))]
    if kind == "uniform":
        return float(rng.uniform(arg[0], arg[1]))
    if kind == "loguniform":
        return float(np.exp(rng.uniform(np.log(arg[0]), np.log(arg[1]))))
    return int(rng.integers(arg[0], arg[1]))  # randint: upper bound excluded, as in Ray Tune


def expand_sweep(sweep: SweepConfig, seed: int) -> list[tuple[int, dict[str, Any]]]:
    """Every concrete defense configuration of the sweep as ``(entry index, settings)``, in order: per entry,
    ``samples`` repeats of the cartesian product of its grids, each with its sampled dimensions drawn afresh from
    a generator seeded by ``(seed, entry index)`` — so every runner (local or Ray Tune) audits the same
    configurations."""
    out: list[tuple[int, dict[str, Any]]] = []
    for i, entry in enumerate(sweep.defenses):
        rng = np.random.default_rng([seed, i])
        body = {k: v for k, v in entry.items() if k != "samples"}
        grids = {k: v["grid"] for k, v in body.items() if is_dimension(v) and "grid" in v}
        repeats = entry.get("samples", 1) if is_sampled(entry) else 1
        for _ in range(repeats):
            for combo in itertools.product(*grids.values()):
                point = dict(zip(grids, combo))
                resolved = {}
                for k, v in body.items():
                    if k in point:
                        resolved[k] = point[k]
                    elif is_dimension(v):
                        kind, arg = next(iter(v.items()))
                        resolved[k] = _draw(kind, arg, rng)
                    else:
                        resolved[k] = v
                out.append((i, resolved))
    return out

