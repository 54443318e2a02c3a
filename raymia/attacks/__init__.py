"""Membership-inference attacks: pure functions of model outputs (no Ray, no MLflow)."""

from raymia.attacks.metric import METRIC_ATTACKS, class_thresholds
from raymia.attacks.nn import NNAttackConfig, nn_attack_scores
from raymia.attacks.outputs import ModelOutputs, ShadowOutputs
from raymia.attacks.suite import ATTACK_NAMES, AttackResult, run_attacks

__all__ = ["ATTACK_NAMES", "METRIC_ATTACKS", "AttackResult", "ModelOutputs", "NNAttackConfig", "ShadowOutputs",
           "class_thresholds", "nn_attack_scores", "run_attacks"]
