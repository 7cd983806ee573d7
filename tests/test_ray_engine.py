"""score --engine ray: the local path's scores, shards resumed, faults absorbed.

A local Ray with 2 CPUs: decoding tasks and 2 scorer actors. One batch raises inside an
actor and one actor exits mid-run (RK_RAY_FAULTS); every row is still scored exactly once
and both failures are counted."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from rewardkit.cli import main
from rewardkit.io import write_png_atomic
from tests.models.test_social_reward import make_tiny_vtde

# Starts a local Ray cluster: about 35 s on 2 idle cores.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    rng = np.random.default_rng(0)
    for i in range(40):
        side = (40, 48) if i % 2 else (64, 36)
        write_png_atomic(root / "img" / f"{i:03d}.png", rng.integers(0, 255, (*side, 3), np.uint8))
    (root / "img" / "broken.png").write_bytes(b"not a png")
    return root, make_tiny_vtde(root / "model", pooling="mean")


def _summary(out: str) -> dict:
    """The CLI's JSON summary (Ray may print its own lines before it)."""
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_ray_scores_equal_local_with_faults_and_resume(folder, tmp_path, monkeypatch, capsys):
    root, model = folder
    common = [
        "score",
        "--scorer",
        "social-reward",
        "--model",
        str(model),
        "--input",
        str(root / "img"),
        "--prompt",
        "a red shoe",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    assert main([*common, "--out", str(tmp_path / "local.parquet")]) == 0
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("RK_RAY_FAULTS", str(faults))
    capsys.readouterr()
    out = tmp_path / "ray.parquet"
    assert main([*common, "--out", str(out), "--engine", "ray", "--actors", "2"]) == 0
    summary = _summary(capsys.readouterr().out)
    assert sorted(p.name for p in faults.iterdir()) == ["exited", "raised"]  # both happened
    assert summary["batch_failures"] == 1 and summary["actor_restarts"] >= 1
    assert summary["scored"] == 40 and summary["skipped"] == 1
    local, ray = pq.read_table(tmp_path / "local.parquet"), pq.read_table(out)
    assert ray["path"].to_pylist() == local["path"].to_pylist()  # each row once, input order
    np.testing.assert_allclose(ray["score"].to_numpy(), local["score"].to_numpy(), atol=1e-5)
    skipped = json.loads((tmp_path / "ray.skipped.json").read_text())["skipped"]
    assert [s["path"] for s in skipped] == ["broken.png"]
    # The same command again: every shard is finished, nothing is scored again.
    assert main([*common, "--out", str(out), "--engine", "ray"]) == 0
    again = _summary(capsys.readouterr().out)
    assert again["shards_resumed"] == again["shards"] >= 1 and again["scored"] == 40
