"""Architectures, the shared training loop and its defense seam."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raymia.errors import UserError
from raymia.models.classifiers import ModelSpec, build_model, check_model
from raymia.training.loop import TrainingPolicy, TrainRecipe, predict_logits, train_classifier


@pytest.mark.parametrize(("arch", "shape"), [("mlp", (1, 8, 8)), ("mlp", (600,)), ("cnn", (1, 8, 8)),
                                             ("cnn", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_architectures_map_inputs_to_logits(arch, shape):
    params = {"width": 8} if arch == "resnet18" else {}
    model = build_model(ModelSpec(arch=arch, params=params), shape, 7, seed=0)
    assert model(torch.zeros((3, *shape))).shape == (3, 7)


def test_resnet18_has_cifar_stem_and_standard_size():
    model = build_model(ModelSpec(arch="resnet18"), (3, 32, 32), 10)
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert 11.0e6 < sum(p.numel() for p in model.parameters()) < 11.3e6


def test_bad_model_specs_are_user_errors():
    with pytest.raises(UserError, match="targets.0.model: architecture 'cnn'"):
        check_model(ModelSpec(arch="cnn"), (600,), 10, field="targets.0.model")
    with pytest.raises(UserError, match="cannot be built with params"):
        build_model(ModelSpec(arch="mlp", params={"depth": 3}), (4,), 2)


def _data(digits, n=300):
    return torch.from_numpy(digits.x[:n]), torch.from_numpy(digits.y[:n])


def test_training_is_deterministic_under_a_seed(digits):
    x, y = _data(digits)
    recipe = TrainRecipe(epochs=3, batch_size=32)
    states = []
    for seed in (5, 5, 6):
        model = build_model(ModelSpec(params={"hidden": [32], "dropout": 0.1}), digits.input_shape, 10, seed=seed)
        train_classifier(model, x, y, recipe, seed=seed)
        states.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


def test_training_fits_the_data(digits):
    x, y = _data(digits)
    model = build_model(ModelSpec(params={"hidden": [128]}), digits.input_shape, 10, seed=0)
    result = train_classifier(model, x, y, TrainRecipe(epochs=40, batch_size=32, lr=3e-3, lr_schedule="cosine"), seed=0)
    assert result.epochs_run == 40
    assert (predict_logits(model, x).argmax(1) == y.numpy()).mean() > 0.99


def test_policy_seam_replaces_loss_and_stops_early(digits):
    x, y = _data(digits)

    class Recorder(TrainingPolicy):
        name = "recorder"

        def __init__(self):
            self.epochs_seen: set[int] = set()
            self.soft = False

        def loss(self, logits, targets, *, epoch):
            self.epochs_seen.add(epoch)
            soft = F.one_hot(targets, 10).float() * 0.9 + 0.01  # soft labels reach the same loss API
            return F.cross_entropy(logits, soft)

        def end_epoch(self, model, epoch):
            return epoch == 1

    policy = Recorder()
    model = build_model(ModelSpec(), digits.input_shape, 10, seed=0)
    result = train_classifier(model, x, y, TrainRecipe(epochs=10), seed=0, policy=policy)
    assert result.epochs_run == 2 and policy.epochs_seen == {0, 1}
    assert np.isfinite(result.final_loss)


def test_flip_crop_augmentation_keeps_shapes_and_pixels():
    from raymia.training.loop import augment_batch

    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    flipped = augment_batch(x, "flip")
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    cropped = augment_batch(x.repeat(50, 1, 1, 1), "flip_crop", padding=2)
    assert cropped.shape == (100, 3, 6, 6)
    assert (cropped == 0).any() and set(cropped.unique().tolist()) <= set(x.unique().tolist()) | {0.0}
    stacked = augment_batch(x[None].repeat(4, 1, 1, 1, 1), "flip_crop")  # [K, B, C, H, W] from the ensemble
    assert stacked.shape == (4, 2, 3, 6, 6)
    assert torch.equal(augment_batch(torch.ones(5, 600), "flip_crop"), torch.ones(5, 600))  # not images


def test_bf16_recipe_trains(digits):
    x, y = _data(digits)
    model = build_model(ModelSpec(arch="cnn"), digits.input_shape, 10, seed=0)
    result = train_classifier(model, x, y, TrainRecipe(epochs=2, precision="bf16", augment="flip"), seed=0)
    assert np.isfinite(result.final_loss)
