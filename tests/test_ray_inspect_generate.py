"""inspect and generate with --engine ray: the local run's outputs, faults absorbed, resumed.

One local Ray with 2 CPUs for the module (started here, so the runs reuse it). The inspector
and the generator are the embedded defaults; the inputs are the small AdWorld world of
tests/conftest.py. Images painted by Ray actors may differ from the local run's by 1/255 in
a few pixels: a shard's batches hold other products than the local run's batches, and the
convolutions' float sums depend on the batch; the noise itself is drawn per (seed, product,
attempt), so it does not."""

import filecmp
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardkit.cli import main
from rewardkit.io import read_image_rgb

# Ray starts once (~8 s); then 20-40 s for inspect, 12-25 s for each generate test on 2 cores.


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _summary(out: str) -> dict:
    """The CLI's JSON summary (Ray may print its own lines before it)."""
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_ray_options_need_the_ray_engine(tmp_path, capsys):
    for argv in (
        ["inspect", "--input", "x", "--out", str(tmp_path / "v.parquet"), "--actors", "2"],
        ["generate", "--products", "x", "--out", str(tmp_path / "g"), "--ray-address", "a:1"],
        ["score", "--input", "x", "--out", str(tmp_path / "s.parquet"), "--gpus-per-actor", "1"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "only used with --engine ray" in err


def test_inspect_on_ray_equals_local_with_faults_and_resume(
    world, local_ray, tmp_path, monkeypatch, capsys
):
    src = pq.read_table(world / "w" / "manifest.parquet")
    n = src.num_rows
    # Two rows that cannot be inspected: a missing image and an empty path.
    extra = pa.table({
        "path": [str(world / "w" / "images" / "missing.png"), None],
        "product_path": src["product_path"].to_pylist()[:2],
        "caption": src["caption"].to_pylist()[:2],
        "label": src["label"].to_pylist()[:2],
    })  # fmt: skip
    rows = pa.concat_tables([src.select(extra.column_names), extra.cast(
        src.select(extra.column_names).schema)])  # fmt: skip
    manifest = world / "w" / "ray_manifest.parquet"
    pq.write_table(rows, manifest)
    common = ["inspect", "--input", str(manifest), "--batch-size", "4", "--no-progress"]
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
    assert summary["inspected"] == n and summary["skipped"] == 2
    local, ray = pq.read_table(tmp_path / "local.parquet"), pq.read_table(out)
    assert ray.column_names == local.column_names
    for c in ("path", "product_path", "caption", "verdict", "label"):  # each row once, in order
        assert ray[c].to_pylist() == local[c].to_pylist(), c
    probs = [c for c in local.column_names if c.startswith("p_")]
    assert len(probs) == 6
    for c in probs:
        assert ray.schema.field(c).type == pa.float32()
        np.testing.assert_allclose(ray[c].to_numpy(), local[c].to_numpy(), atol=1e-5)
    assert json.loads((tmp_path / "ray.skipped.json").read_text()) == json.loads(
        (tmp_path / "local.skipped.json").read_text()
    )
    # The same command again: every shard is finished, nothing is inspected again.
    monkeypatch.delenv("RK_RAY_FAULTS")
    assert main([*common, "--out", str(out), "--engine", "ray"]) == 0
    again = _summary(capsys.readouterr().out)
    assert again["shards_resumed"] == again["shards"] >= 1 and again["inspected"] == n
    assert pq.read_table(out).equals(ray)


def _score_tolerance(local, ray, table) -> np.ndarray:
    """Per row: 1e-5 where both runs saved the same image, byte for byte; 1e-3 where a pixel
    differs by 1/255 (the judge scores the saved image, and a one-level change in one
    pixel moves the shipped inspector's P(Available) by up to ~6e-5, measured)."""
    same = [
        np.array_equal(read_image_rgb(local / p), read_image_rgb(ray / p))
        for p in table["path"].to_pylist()
    ]
    return np.where(same, 1e-5, 1e-3)


def _compare_generate(local, ray) -> None:
    """The Ray run wrote the local run's files: the same names, the same manifests and
    stats but for timings, batch counts and judge scores (1e-5 for identical images, 1e-3
    for images 1/255 apart in a pixel), images within 1/255."""
    for name in ("attempts.parquet", "manifest.parquet"):
        a, b = pq.read_table(local / name), pq.read_table(ray / name)
        assert a.schema == b.schema and a.num_rows == b.num_rows, name
        for c in a.column_names:
            if c == "score" and a[c].null_count == 0:
                gap = np.abs(b[c].to_numpy() - a[c].to_numpy())
                assert (gap <= _score_tolerance(local, ray, a)).all(), (name, gap.max())
            else:
                assert a[c].to_pylist() == b[c].to_pylist(), (name, c)
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (local, ray))
    assert sa.keys() == sb.keys()
    timings = {"seconds", "accepted_per_second", "batches"}
    assert {k: v for k, v in sa.items() if k not in timings} == {
        k: v for k, v in sb.items() if k not in timings
    }
    for folder in ("images", "attempts", "products"):
        names = sorted(p.name for p in (local / folder).iterdir())
        assert names == sorted(p.name for p in (ray / folder).iterdir()) and names
        for name in names:
            a = read_image_rgb(local / folder / name).astype(int)
            b = read_image_rgb(ray / folder / name).astype(int)
            assert np.abs(a - b).max() <= 1, (folder, name)
        if folder == "products":  # the photos as given: byte for byte
            assert all(filecmp.cmp(local / folder / x, ray / folder / x, False) for x in names)


@pytest.mark.parametrize("until_accepted", [False, True], ids=["plain", "until-accepted"])
def test_generate_on_ray_equals_local(
    world, local_ray, tmp_path, monkeypatch, capsys, until_accepted
):
    import rewardkit.ray_engine as engine

    monkeypatch.setattr(engine, "GENERATE_SHARD_BATCHES", 1)  # 2 products a shard: 3 shards
    common = ["generate", "--products", str(world / "w"), "--limit", "5", "--steps", "1",
              "--guidance", "1", "--batch-size", "2", "--seed", "7", "--no-progress"]  # fmt: skip
    if until_accepted:
        common += ["--until-accepted", "--max-attempts", "3"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    out = tmp_path / "ray"
    assert main([*common, "--out", str(out), "--engine", "ray"]) == 0
    summary = _summary(capsys.readouterr().out)
    assert summary["ray"]["shards"] == 3 and summary["ray"]["shards_resumed"] == 0
    _compare_generate(tmp_path / "local", out)
    if until_accepted:
        # Retries happened, so the attempts log interleaves products as the local queue did.
        assert summary["judge"] == "inspector" and summary["images_generated"] > 5
        assert max(pq.read_table(out / "attempts.parquet")["attempt"].to_pylist()) >= 2
        return
    # The same command again: the shards are reused and the files written again the same.
    attempts = (out / "attempts.parquet").read_bytes()
    assert main([*common, "--out", str(out), "--engine", "ray"]) == 0
    again = _summary(capsys.readouterr().out)
    assert again["ray"]["shards_resumed"] == 3
    assert (out / "attempts.parquet").read_bytes() == attempts
