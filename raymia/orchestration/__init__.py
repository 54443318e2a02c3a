"""Ray layer: connect to (or start) a cluster, derive trial resources, fan training jobs out with Ray Tune."""
