"""Config validation: every mistake is caught before work starts, with the field's dotted path."""

from pathlib import Path

import pytest
import yaml

from raymia.attacks import ATTACK_NAMES
from raymia.config import DiffusionAuditConfig, load_config, parse_config
from raymia.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_valid():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        if path.name.startswith("diffusion-"):
            cfg = load_config(path, schema=DiffusionAuditConfig)
            assert cfg.defenses.enabled
        else:
            cfg = load_config(path)
            assert cfg.targets or cfg.sweep


def test_quickstart_audits_two_targets_with_enough_reference_models():
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert len(cfg.targets) >= 2 and cfg.reference.count >= 16
    assert set(cfg.attacks.enabled) == set(ATTACK_NAMES)


def _error(raw) -> str:
    with pytest.raises(UserError) as info:
        parse_config(raw)
    return str(info.value)


@pytest.mark.parametrize(("patch", "expected"), [
    ({"reference": {"cuont": 4}}, "reference.cuont: unknown key; did you mean 'count'?"),
    ({"attacks": {"queries": ["hflip"]}}, "attacks.queries: list distinct views starting with identity"),
    ({"attacks": {"rmia": {"a": 2}}}, "attacks.rmia.a"),
    ({"targets": [{"name": "a", "train": {"epochs": "many"}}]}, "targets.0.train.epochs"),
    ({"targets": [{"name": "a", "train": {"epochs": 0}}]}, "targets.0.train.epochs: Input should be greater than or equal to 1"),
    ({"data": {"dataset": "mnist"}}, "data.dataset: unknown dataset 'mnist'"),
    ({"targets": [{"name": "a", "model": {"arch": "vgg"}}]}, "targets.0.model.arch: unknown architecture 'vgg'"),
    ({"attacks": {"enabled": ["loss", "lira2"]}}, "attacks.enabled: unknown attack(s) ['lira2']"),
    ({"split": {"population": 0.9}}, "split: fractions sum to"),
    ({"targets": [{"name": "a"}, {"name": "a"}]}, "target names must be unique"),
    ({"targets": []}, "give either targets (a list of configurations to audit) or sweep"),
    ({"sweep": {"defenses": [{"name": "relaxloss", "alpah": 0.1}]}}, "entry 0 (relaxloss): alpah: Extra inputs"),
    ({"sweep": {"defenses": [{"name": "relaxloss", "alpha": {"loguniform": [0, 1]}}]}}, "loguniform needs low > 0"),
    ({"sweep": {"defenses": [{"name": "dp_sgd", "delta": {"grid": [1e-5]}}]}}, "give exactly one of noise_multiplier"),
    ({"sweep": {"defenses": [{"name": "none"}], "scheduler": "asha"}}, "asha stops trials early"),
    ({"targets": [{"name": "a", "defense": {"name": "relaxloss", "alpha": -1}}]}, "targets.0.defense.relaxloss.alpha"),
    ({"targets": [{"name": "a", "defense": {"name": "magic"}}]}, "targets.0.defense: Input tag 'magic'"),
    ({"champion": {"rule": "max_accuracy"}}, "champion: rule max_accuracy needs max_leakage"),
    ({"compute": {"device": "tpu"}}, "compute.device"),
])
def test_bad_fields_are_named(patch, expected):
    raw = {"targets": [{"name": "a"}]}
    raw.update(patch)
    if "sweep" in patch:
        del raw["targets"]
    assert expected in _error(raw)


def test_missing_targets_is_reported():
    assert "give either targets" in _error({})


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets:\n  - name: a\n   model: [\n")
    with pytest.raises(UserError, match=r"malformed YAML at line \d+"):
        load_config(bad)


def test_overrides_apply_and_validate(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"targets": [{"name": "a"}]}))
    cfg = load_config(path, ["reference.count=3", "targets.0.train.epochs=7", "attacks.enabled=[loss]"])
    assert cfg.reference.count == 3 and cfg.targets[0].train.epochs == 7 and cfg.attacks.enabled == ["loss"]
    with pytest.raises(UserError, match="reference.count"):
        load_config(path, ["reference.count=1"])
    with pytest.raises(UserError, match="dotted.key=value"):
        load_config(path, ["reference.count"])
