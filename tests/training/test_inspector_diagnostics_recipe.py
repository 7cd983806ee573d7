"""recipes/inspector_diagnostics.py: the margin past each oracle threshold, the oracle's
agreement with itself under a mirror, and the heads reports' refusal of a model without
heads."""

import json

import numpy as np
import pytest

from rewardkit.models.rfnet import RFNet, RFNetConfig
from rewardkit.world.export import render_world
from rewardkit.world.oracle import Thresholds, measurement_target
from tests.recipes import load_recipe


def test_defect_margin_is_positive_exactly_past_the_threshold():
    recipe = load_recipe("inspector_diagnostics")
    t = Thresholds()
    cases = {  # name: (raw values, which the oracle calls a defect)
        "contact_gap": ([0.0, 0.02, 0.05, -0.05], [False, False, True, True]),
        "contrast": ([0.1, 0.3, 0.5], [True, False, False]),
        "clutter": ([0.1, 0.3], [False, True]),
        "hallucinated_area": ([0.0, 0.1, 0.4], [False, False, True]),
        "scale_error": ([0.2, -0.6, 0.6], [False, True, True]),
    }
    for name, (values, defect) in cases.items():
        target = measurement_target(np.array(values), name, t)
        assert list(recipe.defect_margin(target, name) > 0) == defect, name


def test_mirror_agreement_counts_every_row(tmp_path, capsys):
    render_world(tmp_path / "w", n=6, seed=2, size=64,
                 balance="Available=0.5,Space Mismatch=0.5", progress=False)  # fmt: skip
    recipe = load_recipe("inspector_diagnostics")
    assert recipe.main(["mirror", "--manifest", str(tmp_path / "w" / "manifest.parquet")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 6
    assert out["same_label"] + sum(out["flips"].values()) == 6
    assert out["rate"] == pytest.approx(out["same_label"] / 6)


def test_heads_reports_need_heads(tmp_path):
    model = tmp_path / "m"
    RFNet(RFNetConfig.aligned()).save_pretrained(model)
    recipe = load_recipe("inspector_diagnostics")
    with pytest.raises(SystemExit, match="measurement heads"):
        recipe.heads_report(RFNet.from_pretrained(model), [])
