"""The audit configuration: one YAML file validated into typed objects before any work starts.

Unknown keys, wrong types and impossible values raise :class:`UserError` with the dotted path of the field
(``targets.1.train.epochs``) and, for misspelt keys, the closest valid key.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raymia.attacks.diffusion import DiffusionAttackConfig
from raymia.attacks.lira import LiRAConfig
from raymia.attacks.nn import NNAttackConfig
from raymia.attacks.rmia import RMIAConfig
from raymia.attacks.suite import ATTACK_NAMES, AttackKnobs
from raymia.data.datasets import Dataset, check_dataset_name, load_dataset
from raymia.data.queries import LabelOnlyConfig
from raymia.data.splits import ROLES
from raymia.defenses import DefenseConfig, NoDefenseConfig
from raymia.defenses.diffence import DiffenceConfig
from raymia.diffusion.model import DiffusionSpec
from raymia.diffusion.train import DiffusionRecipe
from raymia.endpoint import EndpointConfig
from raymia.errors import UserError
from raymia.models.classifiers import ModelSpec
from raymia.sweep import SweepConfig
from raymia.training.loop import TrainRecipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the samples come from. ``dataset``: ``digits`` | ``cifar10`` | ``cifar100`` | ``npz`` | ``module:function``."""

    dataset: str = "digits"
    data_root: Path | None = None
    download: bool = False
    path: Path | None = None
    params: dict[str, Any] = {}

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_dataset_name(v)

    def load(self) -> Dataset:
        """The dataset this section describes (a :class:`UserError` names what is missing or malformed)."""
        return load_dataset(self.dataset, data_root=self.data_root, download=self.download, path=self.path,
                            params=self.params)


class SplitConfig(_Strict):
    """Fraction of the dataset in each role (see :mod:`raymia.data.splits`); they sum to at most 1."""

    target_members: float = Field(0.25, gt=0, lt=1)
    target_nonmembers: float = Field(0.25, gt=0, lt=1)
    population: float = Field(0.35, gt=0, lt=1)
    calibration: float = Field(0.05, ge=0, lt=1)
    test: float = Field(0.10, gt=0, lt=1)
    calibration_members: float = Field(0.0, ge=0, lt=1)
    defender_reference: float = Field(0.0, ge=0, lt=1)
    members: Path | None = Field(None, description="row indices (.npy, .parquet, .csv) a model you bring was "
                                 "trained on; replaces target_members")
    nonmembers: Path | None = Field(None, description="row indices to audit as its non-members (default: drawn "
                                    "from the other rows at target_nonmembers)")

    @field_validator("members", "nonmembers")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser().resolve()  # Ray trials and jobs change the working directory

    @model_validator(mode="after")
    def _nonmembers_need_members(self) -> "SplitConfig":
        if self.nonmembers is not None and self.members is None:
            raise ValueError("nonmembers needs members: give split.members, the rows your model was trained on")
        return self

    @model_validator(mode="after")
    def _sums_to_at_most_one(self) -> "SplitConfig":
        total = sum(self.fractions().values())
        if total > 1 + 1e-9:
            raise ValueError(f"fractions sum to {total:.3f} > 1; lower some of {list(ROLES)}")
        return self

    def fractions(self) -> dict[str, float]:
        """Each role's fraction (``canaries`` are sized by ``audit.canaries``, see :func:`plan_audit`; with
        ``members`` the target members are those rows)."""
        out = {r: getattr(self, r, 0.0) for r in ROLES}
        if self.members is not None:
            out["target_members"] = 0.0
        if self.nonmembers is not None:
            out["target_nonmembers"] = 0.0
        return out


class TargetConfig(_Strict):
    """One target configuration to audit: an architecture, the recipe that trains it and its training-time
    defense (``defense: {name: relaxloss, alpha: 0.5}``; see :mod:`raymia.defenses`)."""

    name: str
    model: ModelSpec = ModelSpec()
    train: TrainRecipe = TrainRecipe()
    defense: DefenseConfig = NoDefenseConfig()
    # a model you bring (at most one of the three); raymia never retrains it, and trains its reference models with
    # ``train`` (or ``train.fn``) and ``defense`` on as many samples as ``split.members`` holds
    weights: Path | None = Field(None, description="safetensors file, or a PyTorch state dict (.pt/.pth, "
                                 "loaded with weights_only=True), for the architecture ``model``")
    model_uri: str | None = Field(None, description="models:/name@alias, models:/name/version or runs:/id/path: "
                                  "a raymia model or a state dict logged with mlflow.pytorch.log_state_dict")
    allow_pickle: bool = Field(False, description="load a pickled MLflow PyTorch model (runs its code: only "
                               "for models you trust)")
    endpoint: EndpointConfig | None = None

    @property
    def given(self) -> bool:
        """The target is a model the user brings, not one raymia trains."""
        return self.weights is not None or self.model_uri is not None or self.endpoint is not None

    @field_validator("weights")
    @classmethod
    def _absolute_weights(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser().resolve()

    @model_validator(mode="after")
    def _one_source(self) -> "TargetConfig":
        given = [k for k in ("weights", "model_uri", "endpoint") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of weights, model_uri and endpoint (got {', '.join(given)})")
        if self.model_uri is not None and not self.model_uri.startswith(("models:/", "runs:/")):
            raise ValueError(f"model_uri {self.model_uri!r}: expected models:/name@alias, models:/name/version or "
                             "runs:/<run id>/<path>")
        if self.train.fn is not None and self.defense.name != "none":
            raise ValueError(f"train.fn replaces raymia's training loop, so the {self.defense.name} defense cannot "
                             "plug into it; drop the defense (or train.fn)")
        return self

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=,()+-]{0,127}", v):
            raise ValueError("use 1-128 letters, digits or _ - . = , ( ) +, starting with a letter or digit")
        return v


class ReferenceConfig(_Strict):
    """Reference (shadow) models: ``count`` per target, each trained with the target's exact recipe on a random
    ``pkeep`` fraction of the pool, plus the defender's known members (``split.calibration_members``, which every
    target trains on too).

    ``pool: audited`` (default) is LiRA's layout: the pool is the audited members and non-members.
    ``pool: audited_and_population`` adds the population samples (more diverse reference training sets).
    ``pkeep: auto`` (default) draws as many pool samples as the target has members, so every reference model
    trains on exactly as many samples as the target — the target is distributed like a reference model, which
    LiRA and RMIA assume; with the audited pool and equal members / non-members that is one half, in
    complementary pairs (every audited sample IN for exactly half of the models). A number sets the fraction
    yourself; the audit then says how far the sizes differ.

    ``group_size``: a target configuration's models (the target first, then its reference models in order) are
    trained in fixed groups of at most this many (as few near-equal groups as that allows), together with ``vmap`` where that is faster (``strategy: auto``: MLPs on
    CPU, small nets on GPU; ``vmap`` forces it, ``loop`` never uses it). Groups are a fact of the plan, not of
    the cluster, so every model's weights are the same on one process or a hundred nodes (randomness inside a
    network, such as dropout, is drawn per group). ``models_per_trial``: about how many models one Ray Tune
    trial trains (whole groups); ``null`` spreads each target's groups evenly over the cluster's trial slots.
    """

    count: int = Field(16, ge=2)
    pkeep: float | Literal["auto"] = "auto"
    pool: Literal["audited", "audited_and_population"] = "audited"
    strategy: Literal["auto", "vmap", "loop"] = "auto"
    group_size: int = Field(8, ge=1)

    @field_validator("pkeep")
    @classmethod
    def _fraction(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 < v < 1:
            raise ValueError("pkeep must be auto or a fraction strictly between 0 and 1")
        return v
    models_per_trial: int | None = Field(None, ge=1)


class AttackConfig(_Strict):
    """Which attacks run, how the attacker queries (``queries``: views LiRA/RMIA average over), and each
    attack's knobs. ``loo_targets``: also evaluate that many reference models as targets (LiRA's
    leave-one-out layout) and log the averaged metrics as ``loo.*``."""

    enabled: list[str] = list(ATTACK_NAMES)
    queries: list[Literal["identity", "hflip"]] = ["identity"]
    nn: NNAttackConfig = NNAttackConfig()
    lira: LiRAConfig = LiRAConfig()
    rmia: RMIAConfig = RMIAConfig()
    label_only: LabelOnlyConfig = LabelOnlyConfig()
    loo_targets: int = Field(0, ge=0)

    def knobs(self) -> AttackKnobs:
        return AttackKnobs(nn=self.nn, lira=self.lira, rmia=self.rmia, label_only=self.label_only)

    @field_validator("queries")
    @classmethod
    def _identity_first(cls, v: list[str]) -> list[str]:
        if not v or v[0] != "identity" or len(set(v)) != len(v):
            raise ValueError("list distinct views starting with identity, e.g. [identity, hflip]")
        return v

    @field_validator("enabled")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [a for a in v if a not in ATTACK_NAMES]
        if unknown:
            raise ValueError(f"unknown attack(s) {unknown}; choose from {list(ATTACK_NAMES)}")
        if not v:
            raise ValueError("enable at least one attack")
        return list(dict.fromkeys(v))


class ComputeConfig(_Strict):
    """Per-trial resources. ``gpus_per_trial: null`` derives a fraction from the cluster (0 without GPUs)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float | None = Field(None, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)


class CacheConfig(_Strict):
    """Content-addressed model cache: a local path or a ``pyarrow.fs`` URI (``s3://...``) that every node of the
    cluster can reach. ``null``: ``<output_dir>/cache``. ``reuse: false`` retrains and overwrites everything."""

    uri: str | None = None
    reuse: bool = True


class RayConfig(_Strict):
    """Which Ray to use. ``RAY_ADDRESS`` (set by ``ray job submit``) overrides ``address``; none starts a local one."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    storage_path: str | None = None


class TrackingConfig(_Strict):
    """MLflow. ``MLFLOW_TRACKING_URI`` overrides ``uri``; the default is ``sqlite:///<cwd>/mlflow.db``."""

    uri: str | None = None
    experiment: str = "raymia"


class FrontierConfig(_Strict):
    """Privacy-utility frontier: leakage = ``leakage`` metric of ``attack`` (``best``: the strongest attack, i.e.
    the maximum over attacks), against test accuracy."""

    leakage: Literal["tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr", "tpr_at_0.01pct_fpr", "auc", "eps_estimate",
                     "eps_lower_bound", "vulnerable_tpr_at_1pct_fpr", "vulnerable_tpr_at_0.1pct_fpr"
                     ] = "tpr_at_0.1pct_fpr"
    attack: str = "best"

    @field_validator("attack")
    @classmethod
    def _known_attack(cls, v: str) -> str:
        if v != "best" and v not in ATTACK_NAMES:
            raise ValueError(f"unknown attack '{v}'; use best or one of {list(ATTACK_NAMES)}")
        return v


class PrivacyAuditConfig(_Strict):
    """Privacy auditing on top of the attacks (reference: ``docs/dp-auditing.md``).

    - ``eps``: every attack's empirical ε lower bound (``dp.<attack>.eps_estimate``), its threshold chosen on a
      reference model; an *estimate* (the samples of one model are not independent trials).
    - ``mode: one_run`` (Steinke, Nasr & Jagielski 2023): ``canaries`` rows, each included in the target's
      training by a fair coin; ``attack`` scores them with reference models that never depended on the coins,
      the ``guesses`` highest are guessed IN and the ``guesses`` lowest OUT; the correct guesses certify
      ``dp.eps_lower_bound`` with confidence 1 − ``beta``. ``canary_kind: mislabelled`` relabels each canary to
      another class (for the target and every reference model), the stronger canary.
    - ``vulnerable``: rank the audited samples by leave-one-out LiRA on half of the reference models and measure
      the attack on the ``vulnerable`` most vulnerable ones with the other half (Aerni et al. 2024).
    - ``delta``: δ of every bound (default: the DP-SGD target's δ, else 1e-5); ``alpha``: 1 − confidence of the
      ε estimates.
    """

    eps: bool = True
    mode: Literal["none", "one_run"] = "none"
    canaries: int = Field(0, ge=0)
    canary_kind: Literal["natural", "mislabelled"] = "mislabelled"
    guesses: int | list[int] | None = None
    attack: str = "lira_online"
    beta: float = Field(0.05, gt=0, lt=1)
    vulnerable: int = Field(100, ge=0)
    delta: float | None = Field(None, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)

    @field_validator("attack")
    @classmethod
    def _known_attack(cls, v: str) -> str:
        if v not in ATTACK_NAMES:
            raise ValueError(f"unknown attack '{v}'; use one of {list(ATTACK_NAMES)}")
        return v

    @model_validator(mode="after")
    def _canaries_for_one_run(self) -> "PrivacyAuditConfig":
        if self.mode == "one_run" and self.canaries < 2:
            raise ValueError("mode one_run needs canaries (e.g. canaries: 500): rows the target trains on by a coin")
        if self.mode == "one_run" and (bad := [k for k in self.ks() if not 1 <= k <= self.canaries // 2]):
            raise ValueError(f"guesses {bad} top + bottom exceed the {self.canaries} canaries (or are < 1)")
        return self

    def ks(self) -> list[int]:
        """The guesses per side to try: ``guesses`` (a list is a search, paid for by β / len), else a tenth of the
        canaries."""
        g = self.guesses if self.guesses is not None else max(1, self.canaries // 10)
        return sorted(set(g)) if isinstance(g, list) else [g]


class ChampionConfig(_Strict):
    """Which configuration to ship, registered in the MLflow Model Registry as ``registry_name@champion``.

    - ``rule: max_accuracy``: the highest test accuracy among configurations whose leakage is at most
      ``max_leakage`` (leakage as defined by ``frontier``);
    - ``rule: min_leakage``: the lowest leakage among configurations whose test accuracy is at most
      ``max_accuracy_drop`` below the undefended configuration's (or the best one's, without an undefended one).
    """

    rule: Literal["max_accuracy", "min_leakage"] = "max_accuracy"
    max_leakage: float | None = Field(None, ge=0)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    registry_name: str = Field("raymia-champion", min_length=1)

    @model_validator(mode="after")
    def _needs_bound(self) -> "ChampionConfig":
        if self.rule == "max_accuracy" and self.max_leakage is None:
            raise ValueError("rule max_accuracy needs max_leakage (e.g. 0.55 for AUC)")
        return self


class DiffenceAuditConfig(DiffenceConfig):
    """DIFFENCE in an audit: every configuration is audited without and with it (``<name>+diffence``).

    The diffusion model (``model``, trained with ``train``) learns from the target's training data
    (``train_data: members``, the paper's default) or from the population split (``population``: public
    data). Scenarios 1 and 2 calibrate on the defender's known members (``split.calibration_members``) and known
    non-members (``split.calibration``). The attacker is adaptive: reference models are queried through the same
    DIFFENCE (same diffusion model, knobs and interval), and so is RMIA's population z — the same z as the plain
    report (``attacks.rmia.num_z`` subsamples it for both).
    """

    model: DiffusionSpec = DiffusionSpec()
    train: DiffusionRecipe = DiffusionRecipe()
    train_data: Literal["members", "population"] = "members"
    interval: tuple[float, float] | None = Field(None, description="an endpoint target's deployed interval [a, b] "
                                                 "(scenarios 1, 2): its reference models are queried with it")


class RunConfig(_Strict):
    """What every audit has: a name, a seed, data, and where it computes, tracks and caches."""

    name: str = "audit"
    seed: int = 0
    data: DataConfig = DataConfig()
    compute: ComputeConfig = ComputeConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    cache: CacheConfig = CacheConfig()
    output_dir: Path = Path("runs")


class AuditConfig(RunConfig):
    """A whole privacy audit: data, split, target configurations (or a defense sweep), reference models, attacks,
    frontier and champion rule, compute, tracking.

    ``seeds: [s1, s2, ...]`` (or ``raymia audit --repeat N``: the N seeds from ``seed`` on) audits every
    configuration once per seed — split, keep-mask and every model retrained — and reports each metric's mean and
    sd across seeds next to the first seed's numbers and their within-run intervals; ``seed`` becomes ``s1``.
    """

    seeds: list[int] = []

    split: SplitConfig = SplitConfig()
    targets: list[TargetConfig] = []
    sweep: SweepConfig | None = None
    frontier: FrontierConfig = FrontierConfig()
    champion: ChampionConfig | None = None
    diffence: DiffenceAuditConfig | None = None
    reference: ReferenceConfig = ReferenceConfig()
    attacks: AttackConfig = AttackConfig()
    audit: PrivacyAuditConfig = PrivacyAuditConfig()

    @model_validator(mode="before")
    @classmethod
    def _first_seed_is_the_seed(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("seeds"):
            return {**raw, "seed": raw["seeds"][0]}
        return raw

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("targets")
    @classmethod
    def _unique_names(cls, v: list[TargetConfig]) -> list[TargetConfig]:
        names = [t.name for t in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique; repeated: {dupes}")
        return v

    @model_validator(mode="after")
    def _targets_or_sweep(self) -> "AuditConfig":
        if bool(self.targets) == (self.sweep is not None):
            raise ValueError("give either targets (a list of configurations to audit) or sweep (a defense sweep)")
        return self

    @model_validator(mode="after")
    def _given_targets_fit(self) -> "AuditConfig":
        for i, t in enumerate(self.targets):
            if t.given and t.endpoint is None and self.split.members is None:
                raise ValueError(f"targets.{i} ({t.name}) is a model you bring: give split.members, the file of "
                                 "row indices it was trained on (.npy, .parquet or .csv)")
            d = self.diffence
            if t.endpoint is not None and d is not None and d.n > 0 and d.scenario != 3 and d.interval is None:
                raise ValueError(f"targets.{i} ({t.name}) is an endpoint behind DIFFENCE scenario {d.scenario}: set "
                                 "diffence.interval to the deployment's [a, b] (raymia's GET /v1/model reports it "
                                 "as inference_defense.interval) so the reference models are queried with it")
            if t.given and self.audit.mode == "one_run":
                raise ValueError(f"targets.{i} ({t.name}) is already trained, but one-run auditing "
                                 "(audit.mode: one_run) must train the target with its canaries; use audit.mode: none")
        return self

    @model_validator(mode="after")
    def _diffence_needs_known_samples(self) -> "AuditConfig":
        d = self.diffence
        if d is not None and d.n > 0 and d.scenario in (1, 2) and self.split.calibration_members == 0:
            raise ValueError(f"diffence scenario {d.scenario} calibrates on known members: set "
                             "split.calibration_members > 0 (e.g. 0.05), or use diffence.scenario: 3")
        if d is not None and d.n > 0 and d.scenario == 1 and self.split.calibration == 0:
            raise ValueError("diffence scenario 1 calibrates on known non-members: set split.calibration > 0")
        if d is not None and self.sweep is not None and self.sweep.objective == "utility":
            raise ValueError("diffence does not change accuracy; drop it from a utility-only sweep")
        return self

    @model_validator(mode="after")
    def _privacy_audit_fits(self) -> "AuditConfig":
        a, leak = self.audit, self.frontier.leakage
        if a.mode == "one_run" and a.attack not in self.attacks.enabled:
            raise ValueError(f"audit.attack {a.attack} is not in attacks.enabled")
        if leak == "eps_lower_bound" and a.mode != "one_run":
            raise ValueError("frontier.leakage eps_lower_bound needs audit.mode: one_run (and audit.canaries)")
        if leak == "eps_estimate" and not a.eps:
            raise ValueError("frontier.leakage eps_estimate needs audit.eps: true")
        if leak.startswith("vulnerable") and (a.vulnerable == 0 or self.reference.count < 8):
            raise ValueError("frontier.leakage on the vulnerable subset needs audit.vulnerable > 0 and "
                             "reference.count >= 8 (half rank, half measure)")
        return self


# ------------------------------------------------------------------------------------ diffusion-model audit


class DiffusionSplitConfig(_Strict):
    """Fractions of the dataset: ``members`` train the diffusion models (DualMD/DistillMD split them in halves),
    ``nonmembers`` are audited OUT samples, ``heldout`` is the real data FID compares samples against (and trains
    the ``fid_proxy`` feature extractor). Pairwise disjoint; no model ever trains on non-members or held-out data."""

    members: float = Field(0.2, gt=0, lt=1)
    nonmembers: float = Field(0.2, gt=0, lt=1)
    heldout: float = Field(0.3, gt=0, lt=1)

    @model_validator(mode="after")
    def _fits(self) -> "DiffusionSplitConfig":
        total = self.members + self.nonmembers + self.heldout
        if total > 1 + 1e-9:
            raise ValueError(f"split fractions sum to {total:.3f} > 1; lower members, nonmembers or heldout")
        return self


class DiffusionDefensesConfig(_Strict):
    """Which systems are audited. ``student``: DistillMD's student recipe (default: the ``train`` recipe).
    ``teacher_weights``: which weights of the two teachers DualMD deploys (samples and is attacked with) and
    DistillMD's student learns from — ``ema`` (default: the weights a DDPM is normally sampled with) or ``raw``
    (the last training weights, as the official DualMD/DistillMD code loads them); logged with every run."""

    enabled: list[Literal["undefended", "dualmd", "distillmd"]] = ["undefended", "dualmd", "distillmd"]
    student: DiffusionRecipe | None = None
    teacher_weights: Literal["ema", "raw"] = "ema"

    @field_validator("enabled")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("list each of undefended, dualmd, distillmd at most once, and at least one")
        return v


class SamplingConfig(_Strict):
    """Samples for FID and the sample grid: ``ddim`` with ``steps`` steps, or ``ddpm`` ancestral over all T."""

    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(100, ge=2)
    n_samples: int = Field(500, ge=10)
    batch_size: int = Field(500, ge=1)


class FIDConfig(_Strict):
    """``inception_weights``: a local torchvision inception_v3 state dict for real FID; unset: ``fid_proxy``."""

    inception_weights: Path | None = None
    proxy_epochs: int = Field(40, ge=1)


class DiffusionAuditConfig(RunConfig):
    """A privacy audit of diffusion models: undefended / DualMD / DistillMD DDPMs trained on the members, attacked
    white-box (loss, SecMI, PIA, PIAN), with FID for utility."""

    name: str = "diffusion-audit"
    tracking: TrackingConfig = TrackingConfig(experiment="raymia-diffusion")
    split: DiffusionSplitConfig = DiffusionSplitConfig()
    model: DiffusionSpec = DiffusionSpec()
    train: DiffusionRecipe = DiffusionRecipe()
    defenses: DiffusionDefensesConfig = DiffusionDefensesConfig()
    attacks: DiffusionAttackConfig = DiffusionAttackConfig()
    sampling: SamplingConfig = SamplingConfig()
    fid: FIDConfig = FIDConfig()


# ----------------------------------------------------------------------------------------------- loading


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (sub := _submodel(arg)) is not None:
                return sub
    return None


def _valid_keys(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _submodel(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _describe(err: dict[str, Any], root: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        keys = _valid_keys(loc[:-1], root)
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{where}: unknown key; {hint}valid keys here: {', '.join(keys)}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if err["type"] == "missing" or isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{where}: {msg}{shown}"


Schema = typing.TypeVar("Schema", bound=BaseModel)


def parse_config(raw: Any, *, source: str = "config", schema: type[Schema] = AuditConfig) -> Schema:
    """Validate a mapping into ``schema`` (an :class:`AuditConfig` by default); raise :class:`UserError` listing
    every bad field."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of keys to values at the top level, got {type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e, schema)}" for e in exc.errors())
        raise UserError(f"{source} is invalid:\n{lines}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set '{item}': write overrides as dotted.key=value, e.g. reference.count=4")
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set '{item}': '{part}' is not an index of the list at this level")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        parsed = yaml.safe_load(value) if value else None
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = parsed
        elif isinstance(node, dict):
            node[last] = parsed
        else:
            raise UserError(f"--set '{item}': cannot set '{last}' here")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None, *,
                schema: type[Schema] = AuditConfig) -> Schema:
    """Read, override and validate a YAML config file into ``schema``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}; pass the path of a YAML file such as "
                        "configs/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    raw = {} if raw is None else raw
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path), schema=schema)
