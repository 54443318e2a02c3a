"""Model outputs: query views, label-only views, and the Parquet round trip rescoring depends on."""

import numpy as np
import pytest

from raymia.config import TargetConfig, parse_config
from raymia.data.datasets import make_dataset
from raymia.data.queries import LabelOnlyConfig, shift
from raymia.errors import UserError
from raymia.models.classifiers import ModelSpec, build_model
from raymia.pipeline.factory import train_models
from raymia.pipeline.plan import TrainJob, plan_audit
from raymia.signals import PoolSignals, compute_signals
from raymia.training.loop import TrainRecipe, predict_logits


def test_query_views_and_label_only_views(digits):
    model = build_model(ModelSpec(arch="cnn"), digits.input_shape, 10, seed=0)
    x = digits.x[:50]
    (sig,) = compute_signals([model], x, ["identity", "hflip"], LabelOnlyConfig(kind="shift", shift=1))
    assert sig.logits.shape == (50, 2, 10) and sig.label_only.shape == (50, 18)
    np.testing.assert_allclose(sig.logits[:, 1], predict_logits(model, x[..., ::-1].copy()), rtol=1e-6)
    np.testing.assert_array_equal(sig.label_only[:, 4], predict_logits(model, x).argmax(1))  # shift (0, 0)
    assert np.array_equal(shift(x, 1, 0)[..., 1:], x[..., :-1]) and (shift(x, 1, 0)[..., 0] == 0).all()
    noisy = LabelOnlyConfig().views(x)  # auto: 8x8 images are too small to shift, so noise
    assert len(noisy) == 16 and not np.array_equal(noisy[0], x)


def test_label_only_views_are_queried_only_where_the_attack_reads_them(digits, tmp_path):
    model = build_model(ModelSpec(arch="cnn"), digits.input_shape, 10, seed=0)
    x, rows = digits.x[:60], np.arange(10, 40)
    cfg = LabelOnlyConfig(kind="shift", shift=1)
    (full,) = compute_signals([model], x, ["identity"], cfg)
    (part,) = compute_signals([model], x, ["identity"], cfg, label_rows=rows)
    np.testing.assert_array_equal(part.label_only[rows], full.label_only[rows])
    assert (np.delete(part.label_only, rows, axis=0) == -1).all() and np.array_equal(part.logits, full.logits)
    plan = plan_audit(parse_config({"targets": [{"name": "m"}], "output_dir": str(tmp_path)}), digits)
    assert np.array_equal(plan.scored_indices[plan.label_rows], plan.pool)  # the audited pool, nothing else
    off = plan_audit(parse_config({"targets": [{"name": "m"}], "attacks": {"enabled": ["loss"]}}), digits)
    assert len(off.label_rows) == 0 and off.views_id != plan.views_id


def test_hflip_queries_need_images(tmp_path):
    rng = np.random.default_rng(0)
    tabular = make_dataset("tab", rng.normal(size=(200, 12)), np.arange(200) % 4)
    cfg = parse_config({"targets": [{"name": "a"}], "attacks": {"queries": ["identity", "hflip"]}})
    with pytest.raises(UserError, match="attacks.queries: hflip needs image inputs"):
        plan_audit(cfg, tabular)


def test_conv_models_train_through_the_factory_loop(digits):
    target = TargetConfig(name="c", model=ModelSpec(arch="cnn", params={"channels": [8]}), train=TrainRecipe(epochs=1))
    jobs = [TrainJob(f"j{i}", target, "reference", i, np.arange(i, 300, 2), i, "fp") for i in range(2)]
    models, vmapped, _ = train_models(jobs, digits)
    assert vmapped == 0 and set(models) == {"j0", "j1"}  # convs on CPU: a loop, not vmap


def test_pool_parquet_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    m, n, a, c, v = 3, 40, 2, 5, 6
    pool = PoolSignals(
        indices=np.sort(rng.choice(1000, n, replace=False)), labels=rng.integers(0, c, n),
        roles=rng.choice(["target_members", "target_nonmembers", "population"], n),
        model_ids=np.array(["target", "ref-000", "ref-001"]), logits=rng.normal(size=(m, n, a, c)).astype(np.float32),
        keep=rng.random((m, n)) < 0.5, label_only=rng.integers(0, c, (m, n, v)).astype(np.int16),
        query_views=("identity", "hflip"))
    back = PoolSignals.from_parquet(pool.to_parquet(tmp_path / "pool.parquet"))
    for field in ("indices", "labels", "roles", "model_ids", "logits", "keep", "label_only"):
        np.testing.assert_array_equal(getattr(back, field), getattr(pool, field), err_msg=field)
    assert back.query_views == pool.query_views and list(back.reference_rows) == [1, 2]


def test_a_dropout_model_is_queried_in_eval_mode(digits):
    """Outputs are deterministic and equal the eval-mode forward, even right after training left it in train mode."""
    import torch

    model = build_model(ModelSpec(params={"hidden": [64], "dropout": 0.5}), digits.input_shape, 10, seed=0)
    model.train()
    x = digits.x[:40]
    first, second = (compute_signals([model], x, ["identity"], LabelOnlyConfig())[0] for _ in range(2))
    np.testing.assert_array_equal(first.logits, second.logits)
    with torch.no_grad():
        np.testing.assert_array_equal(first.logits[:, 0], model.eval()(torch.from_numpy(x)).numpy())
