"""One audit as plain functions over the science core: plan the models, train them, attack the targets.

Runs without Ray (see :func:`raymia.pipeline.audit.train_all_locally`); orchestration fans the same
:func:`raymia.pipeline.audit.run_train_job` out as Ray Tune trials.
"""
