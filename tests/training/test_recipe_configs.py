"""Every YAML in recipes/configs loads as what its name says it is: a training schedule
(``--config``, RFNetTrainConfig fields) or an architecture (``--model-config``, RFNetConfig
fields over the small preset), so a command MODELS.md quotes with it does not fail on it."""

from pathlib import Path

import pytest

from rewardkit.commands.rfnet import _model_config
from rewardkit.models.rfnet import RFNet, RFNetConfig
from rewardkit.training.rfnet import RFNetTrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
ARCHITECTURES = {"rfnet-aligned-w48.yaml"}


def test_configs_are_named():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert ARCHITECTURES <= names and len(names - ARCHITECTURES) >= 2


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_loads(path):
    if path.name in ARCHITECTURES:
        config = _model_config(path)
        aligned = RFNetConfig.aligned()
        # Only the fields the file sets differ from the shipped early-fusion architecture.
        differ = {k for k, v in config.to_dict().items() if aligned.to_dict()[k] != v}
        assert differ == {"width"} and config.width == 48
        RFNet(config)  # builds
    else:
        config = RFNetTrainConfig.from_yaml(path)
        assert config.epochs > 0 and config.lr > 0
