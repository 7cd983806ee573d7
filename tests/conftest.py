"""Shared fixtures: a small AdWorld world with tiny extractors (training and device tests)."""

import pytest

from rewardkit.models.modalities import (
    DepthEstimator,
    SaliencyEstimator,
    small_depth_config,
    small_saliency_config,
)
from rewardkit.world.export import render_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rf")
    render_world(root / "w", 40, seed=3, size=32, progress=False)
    DepthEstimator.from_config(small_depth_config(32)).save_pretrained(root / "depth")
    sal = SaliencyEstimator.from_config(small_saliency_config(), image_size=32)
    sal.save_pretrained(root / "saliency")
    return root
