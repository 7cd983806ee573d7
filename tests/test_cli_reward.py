"""`rewardkit curate -> train -> eval` on a small simulated community, through main(argv)."""

import json

import pytest

from rewardkit.cli import main
from rewardkit.world.simulate import simulate_pool
from tests.models.test_social_reward import make_tiny_clip


@pytest.fixture(scope="module")
def community(tmp_path_factory):
    root = tmp_path_factory.mktemp("community")
    simulate_pool(root / "c", 3000, seed=5, prompts=20, images_per_prompt=5, progress=False)
    assert main(["curate", "--events", str(root / "c"), "--out", str(root / "pairs.parquet")]) == 0
    return root


def test_train_then_eval(community, tmp_path, capsys):
    tiny = make_tiny_clip(tmp_path / "tiny")
    capsys.readouterr()
    pairs = str(community / "pairs.parquet")
    run = str(tmp_path / "run")
    args = ["train", "reward", "--pairs", pairs, "--out", run, "--model", str(tiny)]
    assert main([*args, "--max-steps", "3", "--batch-size", "4", "--preset", "all"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["resumed_from"] == 0
    model = tmp_path / "run" / "model"
    out = tmp_path / "eval.json"
    argv = ["eval", "reward", "--community", str(community / "c"), "--pairs", pairs,
            "--model", str(model), "--scorer", f"clip-score={tiny}", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "social-reward" in table and "clip-score (tiny)" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["scorer"] for r in rows] == ["social-reward (model)", "clip-score (tiny)"]
    assert all(0 <= r["truth_acc"] <= 1 and r["truth_pairs_n"] > 0 for r in rows)
    assert out.with_suffix(".md").is_file()


def test_eval_defaults_use_the_shipped_models(community, capsys):
    pairs = str(community / "pairs.parquet")
    argv = ["eval", "reward", "--community", str(community / "c"), "--pairs", pairs]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for name in ("social-reward", "clip-score", "aesthetic"):
        assert f"| {name}" in table or f"| **{name}" in table or name in table


def test_eval_and_train_errors_name_the_problem(community, tmp_path, capsys):
    assert main(["eval", "reward", "--community", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nbogus: 2\n")
    argv = ["train", "reward", "--pairs", str(community / "pairs.parquet"),
            "--out", str(tmp_path / "r"), "--config", str(bad)]  # fmt: skip
    assert main(argv) == 2
    assert "bad.yaml: unknown key" in capsys.readouterr().err
