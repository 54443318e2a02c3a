"""Datasets and split plans (science core: no Ray, no MLflow)."""
