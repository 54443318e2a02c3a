"""One audit as plain functions over the science core, without Ray or MLflow, one file per stage:

- :mod:`~raymia.pipeline.plan` — the split, the reference keep-mask, one job per model, the defended spec;
- :mod:`~raymia.pipeline.factory` — train or reuse models (``vmap`` groups) and produce their outputs;
- :mod:`~raymia.pipeline.evaluate` — assemble a target's pool, run the attacks, the target report;
- :mod:`~raymia.pipeline.diffence_audit` — DIFFENCE's diffusion model, calibration, outputs through DIFFENCE;
- :mod:`~raymia.pipeline.recipe` — audit ONE configuration end to end (every runner calls it);
- :mod:`~raymia.pipeline.diffusion_track` — the DDPM track's plan, training, attacks and samples.
"""
