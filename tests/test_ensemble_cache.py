"""The many-models trainer equals one-by-one training; the cache is content-addressed and checksummed."""

import numpy as np
import torch

from raymia.cache import ModelCache
from raymia.keys import content_key
from raymia.models.classifiers import ModelSpec, build_model
from raymia.signals import ModelSignals
from raymia.training.ensemble import prefers_vmap, train_ensemble
from raymia.training.loop import TrainRecipe, predict_logits, train_classifier


def test_vmap_ensemble_equals_one_by_one_training(digits):
    x, y = torch.from_numpy(digits.x), torch.from_numpy(digits.y)
    rng = np.random.default_rng(0)
    sets = [np.sort(rng.choice(len(digits), 300, replace=False)) for _ in range(4)]
    seeds = [11, 12, 13, 14]
    spec = ModelSpec(params={"hidden": [64, 32]})
    recipe = TrainRecipe(epochs=4, batch_size=32, optimizer="sgd", lr=0.05, weight_decay=1e-4, lr_schedule="cosine")
    alone = []
    for s, idx in zip(seeds, sets):
        m = build_model(spec, digits.input_shape, 10, seed=s)
        train_classifier(m, x[idx], y[idx], recipe, seed=s)
        alone.append(m)
    together = [build_model(spec, digits.input_shape, 10, seed=s) for s in seeds]
    assert prefers_vmap(together[0], None, "cpu")
    train_ensemble(together, x, y, sets, recipe, seeds)
    for a, b in zip(alone, together):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)
        np.testing.assert_allclose(predict_logits(a, digits.x), predict_logits(b, digits.x), rtol=1e-3, atol=1e-4)


def test_vmap_is_not_preferred_where_it_is_slower():
    assert not prefers_vmap(build_model(ModelSpec(arch="cnn"), (1, 8, 8), 10), None, "cpu")
    assert not prefers_vmap(build_model(ModelSpec(params={"hidden": [512, 512]}), (1, 8, 8), 10), None, "cpu")
    # the Fashion-MNIST MLP 784-128-10: vmap measured 0.8x a loop on 2 cores (benchmarks/reference_pool.py)
    assert not prefers_vmap(build_model(ModelSpec(params={"hidden": [128]}), (1, 28, 28), 10), None, "cpu")
    assert not prefers_vmap(build_model(ModelSpec(arch="resnet18", params={"width": 8}), (3, 32, 32), 10), None, "cuda")


def test_content_key_changes_with_any_ingredient():
    base = {"indices": np.arange(10), "seed": 1, "recipe": {"lr": 0.1}}
    assert content_key(base) == content_key(dict(base))
    assert content_key({**base, "indices": np.arange(1, 11)}) != content_key(base)
    assert content_key({**base, "seed": 2}) != content_key(base)


def test_cache_round_trip_and_corruption_is_a_miss(tmp_path):
    cache = ModelCache(tmp_path / "cache")
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    cache.save_model("ab" * 32, state, {"dp_epsilon": 2.5})
    assert cache.has_model("ab" * 32)
    weights, extra = cache.load_model("ab" * 32)
    torch.testing.assert_close(weights["w"], state["w"])
    assert extra == {"dp_epsilon": 2.5}
    signals = ModelSignals(np.ones((3, 1, 2), np.float32), np.zeros((3, 4), np.int16), {"x": 1.0})
    cache.save_signals("cd" * 32, "v1", signals)
    back = cache.load_signals("cd" * 32, "v1")
    np.testing.assert_array_equal(back.logits, signals.logits)
    assert back.extra == {"x": 1.0}
    assert cache.load_signals("cd" * 32, "v2") is None

    files = list((tmp_path / "cache" / "models").rglob("*.safetensors"))
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # truncated
    assert cache.load_model("ab" * 32) is None
    files[0].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    assert cache.load_model("ab" * 32) is None


def test_cache_accepts_a_uri(tmp_path):
    cache = ModelCache(f"file://{tmp_path}/uri-cache")
    cache.save_model("ef" * 32, {"w": torch.ones(2)})
    assert (tmp_path / "uri-cache" / "models" / "ef").is_dir()
    assert cache.load_model("ef" * 32)[0]["w"].sum() == 2
