"""The one training loop every classifier uses, and the policy seam training-time defenses attach to."""

from raymia.training.device import resolve_device
from raymia.training.loop import (
    TrainingPolicy,
    TrainRecipe,
    TrainResult,
    predict_logits,
    train_classifier,
)

__all__ = ["TrainRecipe", "TrainResult", "TrainingPolicy", "predict_logits", "resolve_device", "train_classifier"]
