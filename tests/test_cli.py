import json

import pyarrow.parquet as pq

from rewardkit.cli import main


def test_world_render_and_label(tmp_path, capsys):
    assert (
        main(
            [
                "world",
                "render",
                "--n",
                "8",
                "--seed",
                "1",
                "--size",
                "64",
                "--out",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 8
    assert (
        main(
            [
                "world",
                "label",
                "--manifest",
                str(tmp_path / "w" / "manifest.parquet"),
                "--out",
                str(tmp_path / "labels.parquet"),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == 8 and summary["skipped"] == 0
    assert pq.read_table(tmp_path / "labels.parquet").num_rows == 8


def test_bad_parameters_exit_2_with_a_message(tmp_path, capsys):
    assert main(["world", "render", "--n", "4", "--size", "16", "--out", str(tmp_path)]) == 2
    assert "--size must be in [32, 1024]" in capsys.readouterr().err
    assert (
        main(
            [
                "world",
                "label",
                "--manifest",
                str(tmp_path / "x.parquet"),
                "--out",
                str(tmp_path / "o.parquet"),
            ]
        )
        == 2
    )
    assert "manifest not found" in capsys.readouterr().err
    assert (
        main(["world", "render", "--n", "4", "--balance", "Bogus=1", "--out", str(tmp_path)]) == 2
    )
    assert "unknown class 'Bogus'" in capsys.readouterr().err
