"""Fan an audit's training jobs (targets and shadow models) out across the Ray cluster as Tune trials.

Each trial trains one :class:`~raymia.pipeline.audit.TrainJob` with the pipeline's own function and returns its
weights (safetensors) and logits as a Tune checkpoint, so results live in ``storage_path`` (a local path or a
``pyarrow.fs`` URI shared by the cluster). FIFO scheduling: every model must finish, none is stopped early.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ray import cloudpickle, tune
from safetensors.torch import load_file, save_file

from raymia.imports import is_import_path
from raymia.models.classifiers import resolve_builder
from raymia.pipeline.audit import AuditPlan, TrainedModel, TrainJob, run_train_job
from raymia.training.device import resolve_device


class TrainingFailed(RuntimeError):
    """One or more training trials raised; the message carries the first trial's error."""


def _train_trial(config: dict[str, Any], *, jobs: dict[str, TrainJob], dataset: Any, scored: np.ndarray,
                 device: str, builders: dict[str, Callable[..., Any]]) -> None:
    job = jobs[config["job_id"]]
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    out = run_train_job(job, dataset, scored, device=resolve_device(device), builders=builders)
    with tempfile.TemporaryDirectory() as d:
        save_file(out.state, str(Path(d) / "model.safetensors"))
        np.save(Path(d) / "logits.npy", out.logits)
        tune.report({"job_id": job.job_id, "epochs_run": out.epochs_run, "final_loss": out.final_loss,
                     "seconds": out.seconds}, checkpoint=tune.Checkpoint.from_directory(d))


class _Progress(tune.Callback):
    """One line per finished model on stderr: ``[ 3/18] overfit/shadow-001  loss 0.0001  2.1 s``."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.done, self.echo = total, 0, echo

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.done += 1
        self.echo(f"[{self.done:>{len(str(self.total))}}/{self.total}] {result['job_id']:<28} "
                  f"loss {result['final_loss']:.4f}  {result['seconds']:.1f} s")


def _plugin_builders(plan: AuditPlan) -> dict[str, Callable[..., Any]]:
    """Resolve user architectures here and ship their modules by value, so workers need not import them."""
    builders = {}
    for i, t in enumerate(plan.config.targets):
        if is_import_path(t.model.arch):
            fn = resolve_builder(t.model, field=f"targets.{i}.model")
            module = sys.modules[fn.__module__]
            if module.__name__.split(".")[0] != "raymia":
                cloudpickle.register_pickle_by_value(module)
            builders[t.model.arch] = fn
    return builders


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train_on_ray(plan: AuditPlan, resources: dict[str, float], *, storage_path: str, experiment_name: str,
                 device: str = "auto", max_concurrent_trials: int | None = None,
                 echo: Callable[[str], None] = _stderr) -> dict[str, TrainedModel]:
    """Train every job of ``plan`` as one Tune trial each and return the models keyed by job id.

    ``resources`` is the per-trial request from :func:`raymia.orchestration.cluster.trial_resources`.
    """
    jobs = {j.job_id: j for j in plan.jobs}
    trainable = tune.with_resources(
        tune.with_parameters(_train_trial, jobs=jobs, dataset=plan.dataset, scored=plan.scored_indices,
                             device=device, builders=_plugin_builders(plan)),
        resources,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"job_id": tune.grid_search(list(jobs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(name=experiment_name, storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  callbacks=[_Progress(len(jobs), echo)]),
    )
    grid = tuner.fit()
    if grid.errors:
        raise TrainingFailed(f"{len(grid.errors)} of {len(jobs)} training trials failed; first error:\n"
                             f"{grid.errors[0]}")
    models: dict[str, TrainedModel] = {}
    for result in grid:
        m = result.metrics
        with result.checkpoint.as_directory() as d:
            models[m["job_id"]] = TrainedModel(m["job_id"], np.load(Path(d) / "logits.npy"),
                                               load_file(str(Path(d) / "model.safetensors")),
                                               int(m["epochs_run"]), float(m["final_loss"]), float(m["seconds"]))
    missing = set(jobs) - set(models)
    if missing:
        raise TrainingFailed(f"no result for {sorted(missing)}")
    return models
