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
    assert "its loop threshold" not in out["replay"]  # the model has none yet
    assert recipe.main([*argv, "--write"]) == 0
    capsys.readouterr()
    assert recipe.main(argv) == 0  # a test run is read at the threshold the model carries
    fixed = json.loads(capsys.readouterr().out)["replay"]["its loop threshold"]
    assert fixed["threshold"] == pytest.approx(0.75) and fixed["available_rate"] == 1.0
    saved = RFNetConfig.from_folder(model)
    assert saved.loop_threshold == pytest.approx(0.75) and saved.accept_threshold == 0.5
    assert (model / "model.safetensors").read_bytes() == weights
    RFNet.from_pretrained(model)  # still loads strictly
    pq.write_table(pa.table({"oracle_label": labels[:3]}), tmp_path / "short.parquet")
    with pytest.raises(SystemExit, match="one row per attempt"):
        recipe.main([*argv[:4], "--labels", str(tmp_path / "short.parquet")])
    assert np.isfinite(out["mean_attempts"])


def test_recipe_replays_another_judges_verdicts(tmp_path, capsys):
    """--verdicts: an `inspect` output of the run's attempts replaces the run's own scores,
    matched by path (relative to the run, or absolute); an attempt it lacks leaves its
    product out."""
    model = tmp_path / "m"
    tiny = dict(width=32, heads=2, n_fusion=1, resolution=32, modalities=("generated",),
                backbone={"embedding_size": 8, "hidden_sizes": [8], "depths": [1]})  # fmt: skip
    RFNet(RFNetConfig(**tiny)).save_pretrained(model)
    run = tmp_path / "run"
    run.mkdir()
    names = ["a1.png", "a2.png", "b1.png", "b2.png"]
    # The run's own judge prefers each product's defective attempt; the other judge does not.
    attempts = {"product_id": ["a", "a", "b", "b"], "attempt": [1, 2, 1, 2],
                "score": [0.9, 0.1, 0.9, 0.1],
                "path": [f"attempts/{n}" for n in names]}  # fmt: skip
    pq.write_table(pa.table(attempts), run / "attempts.parquet")
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"oracle_label": ["Size Mismatch", "Available"] * 2}), labels)
    verdicts = tmp_path / "v.parquet"
    absolute = [str(run / "attempts" / n) for n in names]
    pq.write_table(pa.table({"path": absolute, "p_available": [0.2, 0.8, 0.3, 0.7]}), verdicts)
    recipe = load_recipe("choose_loop_threshold")
    argv = [
        "--model",
        str(model),
        "--run",
        str(run),
        "--labels",
        str(labels),
        "--max-attempts",
        "2",
    ]
    assert recipe.main(argv) == 0
    own = json.loads(capsys.readouterr().out)
    assert own["available_rate"] == 0.0  # the run's judge returns the defective attempts
    assert recipe.main([*argv, "--verdicts", str(verdicts)]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["available_rate"] == 1.0 and other["left_out"] == 0
    pq.write_table(pa.table({"path": absolute[:3], "p_available": [0.2, 0.8, 0.3]}), verdicts)
    assert recipe.main([*argv, "--verdicts", str(verdicts)]) == 0
    partial = json.loads(capsys.readouterr().out)
    assert partial["products"] == 1 and partial["left_out"] == 1
    pq.write_table(pa.table({"path": absolute, "score": [0.5] * 4}), verdicts)
    with pytest.raises(SystemExit, match="p_available"):
        recipe.main([*argv, "--verdicts", str(verdicts)])
    pq.write_table(pa.table({"path": ["/elsewhere.png"], "p_available": [0.5]}), verdicts)
    with pytest.raises(SystemExit, match="no row matches"):
        recipe.main([*argv, "--verdicts", str(verdicts)])
