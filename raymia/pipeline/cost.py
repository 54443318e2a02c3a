"""What an audit will cost before it starts: models to train and query, their counted FLOPs, and a wall-time
estimate on this machine from a short timed calibration (no Ray, no MLflow).

FLOPs are counted from the architecture (multiply-accumulates of the Linear and Conv2d layers, measured by
running one sample through the built network): a training sample-pass costs 6 x MACs (forward 2, backward 4),
a query 2 x MACs. Defense-internal networks count too (DMP's teacher, SELENA's sub-models); AdvReg's inference
model and DP-SGD's per-sample gradients are extra work these counts leave out, early stopping may stop sooner.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from raymia.config import TargetConfig
from raymia.defenses import make_defense
from raymia.pipeline.plan import AuditPlan, TrainJob, jobs_for_target
from raymia.signals import compute_signals
from raymia.training.ensemble import train_many


def forward_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on one sample (Linear and Conv2d layers)."""
    macs = 0

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(mod, nn.Linear):
            macs += mod.in_features * mod.out_features
        else:
            macs += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    model.train(was_training)
    for h in handles:
        h.remove()
    return macs


def sample_passes(target: TargetConfig, n_train: int, n_reference: int) -> tuple[int, float]:
    """Networks trained for one job of ``target`` and their training sample-passes (one sample forward and
    backward once), the defense's internal networks included."""
    return make_defense(target.defense).training_passes(target.train, n_train, n_reference)


@dataclass
class Cost:
    """An audit's planned work (see the module docstring)."""

    models: int = 0            # classifiers it trains: targets and reference models
    networks: int = 0          # networks trained, the defenses' internal ones included
    train_flops: float = 0.0
    groups: int = 0            # training groups (models trained together)
    queried: int = 0           # classifiers queried for the attacks
    query_flops: float = 0.0
    by_target: dict[str, float] = field(default_factory=dict)  # training FLOPs per configuration

    @property
    def flops(self) -> float:
        return self.train_flops + self.query_flops

    def __add__(self, other: "Cost") -> "Cost":
        by_target = dict(self.by_target)
        for k, v in other.by_target.items():
            by_target[k] = by_target.get(k, 0.0) + v
        return Cost(self.models + other.models, self.networks + other.networks, self.train_flops + other.train_flops,
                    self.groups + other.groups, self.queried + other.queried, self.query_flops + other.query_flops,
                    by_target)


def job_flops(job: TrainJob, plan: AuditPlan, macs: int) -> tuple[int, float]:
    """Networks and training FLOPs of one job."""
    networks, passes = sample_passes(job.target, len(job.train_indices), len(plan.split["defender_reference"]))
    return networks, 6.0 * macs * passes


def plan_cost(plan: AuditPlan, targets: Iterable[TargetConfig], *, skip: Sequence[str] = ()) -> Cost:
    """The work of auditing ``targets`` under ``plan``; jobs whose id is in ``skip`` (already cached) are free."""
    ds = plan.dataset
    label_rows = len(plan.scored_indices) if plan.label_rows is None else len(plan.label_rows)
    per_model = (len(plan.scored_indices) * len(plan.config.attacks.queries)
                 + label_rows * len(plan.config.attacks.label_only.views(ds.x[:1])))  # forward passes
    cost = Cost()
    for target in targets:
        jobs = jobs_for_target(plan, target)
        macs = forward_macs(jobs[0].build(ds), ds.input_shape)
        spent = 0.0
        cost.groups += len({j.group for j in jobs if j.job_id not in skip})
        for job in jobs:
            if job.job_id in skip:
                continue
            cost.queried += 1
            if job.given:  # brought by the user: queried, never trained
                cost.query_flops += 0.0 if job.target.endpoint is not None else 2.0 * macs * per_model
                continue
            networks, flops = job_flops(job, plan, macs)
            cost.models, cost.networks, spent = cost.models + 1, cost.networks + networks, spent + flops
            cost.query_flops += 2.0 * macs * per_model
        cost.train_flops += spent
        cost.by_target[target.name] = spent
    return cost


@dataclass(frozen=True)
class Rates:
    """What :func:`calibrate` measured: a training group's fixed cost (building the stacked ensemble, the first
    vmapped call), the marginal seconds per training FLOP, and seconds per query FLOP."""

    group_setup_s: float
    train_s_per_flop: float
    query_s_per_flop: float


def calibrate(plan: AuditPlan, target: TargetConfig, *, device: torch.device | str = "cpu") -> Rates:
    """Time the audit's own way of working on this machine: ``target``'s first training group (its models trained
    together, vmapped where that pays) on their real rows for one and for three epochs — the difference is the
    marginal cost, the rest the group's fixed cost — then one model queried on up to 4,096 scored rows in every
    view."""
    jobs = jobs_for_target(plan, target)
    group = [j for j in jobs if j.group == jobs[0].group]
    ds = plan.dataset
    macs = forward_macs(group[0].build(ds), ds.input_shape)
    x, y = torch.from_numpy(ds.x), torch.from_numpy(ds.y)
    strategy = plan.config.reference.strategy

    n = min(len(group[0].train_indices), 4096)  # a slice of each model's rows keeps the calibration short

    def run(epochs: int) -> float:
        models = [j.build(ds, seed=j.seed) for j in group]
        recipe = target.train.model_copy(update={"epochs": epochs})
        start = time.perf_counter()
        train_many(models, x, y, [j.train_indices[:n] for j in group], recipe, [j.seed for j in group],
                   strategy=strategy, device=device)
        return time.perf_counter() - start

    run(1)  # warm-up: imports, kernels
    one, three = run(1), run(3)
    per_epoch = max((three - one) / 2, 1e-9)
    epoch_flops = 6.0 * macs * n * len(group)
    rows = plan.scored_indices[:4096]
    cfg = plan.config.attacks
    model = group[0].build(ds)
    start = time.perf_counter()
    compute_signals([model], ds.x[rows], list(cfg.queries), cfg.label_only, device=device)
    views = len(cfg.queries) + len(cfg.label_only.views(ds.x[:1]))
    query_s = (time.perf_counter() - start) / (2.0 * macs * len(rows) * views)
    return Rates(max(one - per_epoch, 0.0), per_epoch / epoch_flops, query_s)


def estimate_seconds(cost: Cost, rates: Rates) -> float:
    """Wall-time estimate of ``cost`` at the measured ``rates`` in one process (attacks and tracking excluded)."""
    return (cost.groups * rates.group_setup_s + cost.train_flops * rates.train_s_per_flop
            + cost.query_flops * rates.query_s_per_flop)


@dataclass
class Progress:
    """Models done out of the plan's total and an ETA: the planned FLOPs still to come, at the time per FLOP the
    audit has achieved so far on what it actually trained (everything else included). Cached models count as
    done but cost nothing, so the ETA is an upper bound when the cache still holds some of the rest."""

    cost: Cost  # of every seed's plan
    runs: int = 1  # seeds (a configuration's planned FLOPs are its share of one seed's)
    started: float = field(default_factory=time.perf_counter)
    done_models: int = 0
    planned_done: float = 0.0
    trained_flops: float = 0.0

    def advance(self, models: int, planned_flops: float, trained_flops: float) -> str:
        """Count ``models`` more as done: ``planned_flops`` of the plan, ``trained_flops`` of them actually
        trained (the rest came from the cache)."""
        self.done_models += models
        self.planned_done += planned_flops
        self.trained_flops += trained_flops
        line = f"models {self.done_models}/{self.cost.models}"
        left = self.cost.train_flops - self.planned_done
        if self.trained_flops > 0 and left > 0:
            line += f", ETA {format_seconds(left * (time.perf_counter() - self.started) / self.trained_flops)}"
        return line


def format_seconds(s: float) -> str:
    """``42 s``, ``3.5 min`` or ``1.2 h``."""
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def describe_cost(cost: Cost, seconds: float | None = None) -> str:
    """One line: models, networks, counted FLOPs (and the estimate, when known)."""
    line = (f"{cost.models} models to train ({cost.networks} networks with the defenses' own), "
            f"{cost.train_flops / 1e12:.3g} TFLOP of training; {cost.queried} models queried, "
            f"{cost.query_flops / 1e12:.3g} TFLOP")
    if seconds is not None:
        line += f"; about {format_seconds(seconds)} in one process on this machine"
    return line
