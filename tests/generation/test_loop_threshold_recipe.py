"""recipes/choose_loop_threshold.py: from a run that painted every attempt and its labels,
the loop threshold is chosen, replayed beside the operating point, and stored in the model."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardkit.models.rfnet import RFNet, RFNetConfig
from tests.recipes import load_recipe


def test_recipe_chooses_and_writes_the_loop_threshold(tmp_path, capsys):
    tiny = dict(width=32, heads=2, n_fusion=1, resolution=32, modalities=("generated",),
                accept_threshold=0.5,
                backbone={"embedding_size": 8, "hidden_sizes": [8], "depths": [1]})  # fmt: skip
    model = tmp_path / "m"
    RFNet(RFNetConfig(**tiny)).save_pretrained(model)
    weights = (model / "model.safetensors").read_bytes()
    # Two products; at the operating point 0.5 each returns its first (defective) attempt.
    run = tmp_path / "run"
    run.mkdir()
    attempts = {"product_id": ["a", "a", "b", "b", "c"], "attempt": [1, 2, 1, 2, 1],
                "score": [0.6, 0.9, 0.7, 0.8, 0.5]}  # fmt: skip
    pq.write_table(pa.table(attempts), run / "attempts.parquet")
    labels = ["Size Mismatch", "Available", "Space Mismatch", "Available", "Available"]
    pq.write_table(pa.table({"oracle_label": labels}), tmp_path / "labels.parquet")
    recipe = load_recipe("choose_loop_threshold")
    argv = ["--model", str(model), "--run", str(run), "--labels", str(tmp_path / "labels.parquet"),
            "--max-attempts", "2"]  # fmt: skip
    assert recipe.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["loop_threshold"] == pytest.approx(0.75) and out["left_out"] == 1
    assert out["replay"]["operating point"]["available_rate"] == 0.0
    assert out["replay"]["chosen"]["available_rate"] == 1.0 and out["ceiling"] == 1.0
    assert "written" not in out and RFNetConfig.from_folder(model).loop_threshold is None
    assert recipe.main([*argv, "--write"]) == 0
    saved = RFNetConfig.from_folder(model)
    assert saved.loop_threshold == pytest.approx(0.75) and saved.accept_threshold == 0.5
    assert (model / "model.safetensors").read_bytes() == weights
    RFNet.from_pretrained(model)  # still loads strictly
    pq.write_table(pa.table({"oracle_label": labels[:3]}), tmp_path / "short.parquet")
    with pytest.raises(SystemExit, match="one row per attempt"):
        recipe.main([*argv[:4], "--labels", str(tmp_path / "short.parquet")])
    assert np.isfinite(out["mean_attempts"])
