"""`rewardkit score` and `rewardkit curate`: JSON summaries, defaults, exit codes."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardkit.cli import main
from rewardkit.data.curation import SPLITS
from rewardkit.io import write_parquet_atomic
from rewardkit.world.community_io import write_community
from tests.data.small_community import small_community
from tests.models.test_social_reward import make_tiny_vtde
from tests.test_scoring import BAD, GOOD, make_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_vtde(tmp_path_factory.mktemp("model") / "m", pooling="mean")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    """A small simulated community: 20 prompts x 8 images, 1500 users."""
    return write_community(small_community(), tmp_path_factory.mktemp("logs"))


def test_score_folder_prints_a_json_summary(model, folder, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    argv = ["score", "--model", str(model), "--input", str(folder), "--out", str(out),
            "--batch-size", "4", "--prompt", "a red shoe", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    # Every entry that cannot be used is listed: the two bad images and notes.txt.
    assert summary["scored"] == len(GOOD) and summary["skipped"] == len(BAD) + 1
    assert summary["out"] == str(out) and summary["seconds"] >= 0
    for name in (*BAD, "notes.txt"):
        assert f"skipped: {name}" in captured.err
    table = pq.read_table(out)
    assert table.num_rows == len(GOOD) and set(table["prompt"].to_pylist()) == {"a red shoe"}


def test_score_uses_the_embedded_default_without_model(model, folder, tmp_path, monkeypatch,
                                                       capsys):  # fmt: skip
    import rewardkit.models.defaults as defaults

    asked: list[str] = []

    def fake_default(name: str) -> Path:
        asked.append(name)
        return model

    monkeypatch.setattr(defaults, "default_model_path", fake_default)
    argv = ["score", "--input", str(folder), "--out", str(tmp_path / "s.parquet"),
            "--scorer", "clip-score", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert asked == ["clip-score"] and json.loads(capsys.readouterr().out)["scored"] == len(GOOD)

    def missing(name: str) -> Path:
        raise FileNotFoundError(f"assets/models/{name}: the embedded default is missing")

    monkeypatch.setattr(defaults, "default_model_path", missing)
    assert main(argv) == 2
    assert "embedded default is missing" in capsys.readouterr().err


def test_score_errors_exit_2(model, folder, tmp_path, capsys):
    out = str(tmp_path / "o.parquet")
    assert main(["score", "--model", str(model), "--input", str(folder), "--out", out,
                 "--scorer", "imagereward"]) == 2  # fmt: skip
    assert "unknown scorer 'imagereward'; available: aesthetic" in capsys.readouterr().err
    # pickscore has no embedded default.
    assert main(["score", "--input", str(folder), "--out", out, "--scorer", "pickscore"]) == 2
    assert "no embedded default for scorer 'pickscore'" in capsys.readouterr().err
    assert main(["score", "--model", str(tmp_path / "nomodel"), "--input", str(folder),
                 "--out", out]) == 2  # fmt: skip
    assert "nomodel" in capsys.readouterr().err
    write_parquet_atomic(tmp_path / "m.parquet", pa.table({"file": ["a.png"]}))
    argv = ["score", "--model", str(model), "--input", str(tmp_path / "m.parquet"), "--out", out]
    assert main(argv) == 2
    assert "m.parquet: manifest is missing column 'path'" in capsys.readouterr().err
    argv = ["score", "--model", str(model), "--input", str(tmp_path / "none"), "--out", out]
    assert main(argv) == 2
    assert "none: input not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # argparse: bad --batch-size
        main(["score", "--input", str(folder), "--out", out, "--batch-size", "0"])
    assert err.value.code == 2
    assert not Path(out).exists()


def test_curate_with_the_default_config(logs, tmp_path, capsys):
    out = tmp_path / "pairs" / "pairs.parquet"
    assert main(["curate", "--events", str(logs), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["config"].endswith("curation_default.yaml")
    assert set(summary["pairs_per_split"]) == set(SPLITS)
    assert summary["pairs"] == sum(summary["pairs_per_split"].values()) > 0
    assert pq.read_table(out).num_rows == summary["pairs"]
    assert Path(summary["card"]).is_file() and Path(summary["card_md"]).is_file()
    assert json.loads(Path(summary["card"]).read_text())["pairs_after_caps"] == summary["pairs"]


def test_curate_with_a_config_file_and_errors(logs, tmp_path, capsys):
    config = tmp_path / "rules.yaml"
    config.write_text("margin: 0.0\nmax_pairs_per_prompt: 2\n")
    out = tmp_path / "pairs.parquet"
    assert main(["curate", "--events", str(logs), "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 < summary["pairs"] <= 2 * 20 and summary["config"] == str(config)
    config.write_text("margni: 0.1\n")
    assert main(["curate", "--events", str(logs), "--config", str(config), "--out", str(out)]) == 2
    assert "margni" in capsys.readouterr().err
    missing = ["curate", "--events", str(tmp_path / "nowhere"), "--out", str(out)]
    assert main(missing) == 2
    assert "nowhere: event log folder not found" in capsys.readouterr().err
    no_config = ["curate", "--events", str(logs), "--config", str(tmp_path / "x.yaml")]
    assert main([*no_config, "--out", str(out)]) == 2
    assert "x.yaml: curation config not found" in capsys.readouterr().err
