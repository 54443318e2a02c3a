"""Ray layer: connect to (or start) a cluster, size trial requests, fan the pipeline's pieces out as Ray Tune
trials (:mod:`~raymia.orchestration.fanout`) and run defense sweeps (:mod:`~raymia.orchestration.tune_sweep`)."""
