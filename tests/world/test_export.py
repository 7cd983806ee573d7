import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardkit.io import write_png_atomic
from rewardkit.world.export import (
    MANIFEST_COLUMNS,
    label_manifest,
    load_product_photo,
    render_world,
)
from rewardkit.world.sampler import parse_balance
from rewardkit.world.scene import CLASSES


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path):
    render_world(tmp_path / "a", 12, seed=4, size=64, progress=False)
    render_world(tmp_path / "b", 12, seed=4, size=64, progress=False)
    render_world(tmp_path / "c", 12, seed=5, size=64, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_layout_manifest_and_label_txt(tmp_path):
    table = render_world(tmp_path, 18, seed=1, size=64, progress=False)
    assert tuple(table.column_names) == MANIFEST_COLUMNS
    for sub in ("images", "products", "depth", "saliency"):
        assert len(list((tmp_path / sub).glob("*.png"))) == 18
    lines = (tmp_path / "label.txt").read_text().splitlines()
    assert len(lines) == 18
    path, cls = lines[0].split("\t")
    assert (tmp_path / path).exists() and cls in CLASSES
    assert pq.read_table(tmp_path / "manifest.parquet").equals(table)


def test_class_balance_is_configurable(tmp_path):
    table = render_world(
        tmp_path, 20, seed=2, size=64, balance="Available=1,Space Mismatch=1", progress=False
    )
    assert set(table.column("label").to_pylist()) == {"Available", "Space Mismatch"}
    with pytest.raises(ValueError, match="unknown class 'Floating'"):
        parse_balance("Floating=1")
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_balance("Available")


def test_spread_draws_defects_across_the_threshold_and_labels_by_oracle(tmp_path):
    balance = "Space Mismatch=1,Size Mismatch=1"
    table = render_world(tmp_path, 40, seed=3, size=64, balance=balance, progress=False, spread=1)
    labels = table.column("label").to_pylist()
    # Asked for defects only; drawn across the threshold, some come out Available.
    assert "Available" in labels and "Space Mismatch" in labels and "Size Mismatch" in labels
    judged, errors = label_manifest(tmp_path / "manifest.parquet", progress=False)
    assert errors == 0 and judged.column("oracle_label").to_pylist() == labels
    gaps = [r["severity"] for r in table.to_pylist() if r["defect"] in ("floating", "sunk")]
    assert min(gaps) < 0.07  # clear-cut renders never go below 0.07 of the frame
    plain = render_world(tmp_path / "plain", 40, seed=3, size=64, balance=balance, progress=False)
    assert set(plain.column("label").to_pylist()) == {"Space Mismatch", "Size Mismatch"}
    with pytest.raises(ValueError, match="--spread"):
        render_world(tmp_path / "bad", 2, seed=3, spread=1.5, progress=False)


def test_label_manifest_round_trip_and_bad_rows(tmp_path):
    render_world(tmp_path, 10, seed=3, size=64, progress=False)
    table, errors = label_manifest(
        tmp_path / "manifest.parquet", tmp_path / "o.parquet", progress=False
    )
    assert errors == 0 and table.num_rows == 10
    agree = sum(
        a == b
        for a, b in zip(table["label"].to_pylist(), table["oracle_label"].to_pylist(), strict=True)
    )
    assert agree >= 9
    # A user manifest: caption instead of height, one missing and one corrupt image.
    rows = (
        pq.read_table(tmp_path / "manifest.parquet")
        .select(["path", "product_path", "caption"])
        .to_pylist()
    )
    rows[1]["path"] = "images/missing.png"
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    rows[2]["path"] = "images/bad.png"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "user.parquet")
    training = tmp_path / "elsewhere" / "train.parquet"
    training.parent.mkdir()
    out, errors = label_manifest(
        tmp_path / "user.parquet", None, progress=False, training_out=training
    )
    assert errors == 2
    # The training manifest: the 8 judged rows, label = the oracle's, paths absolute.
    train = pq.read_table(training)
    judged = [i for i, v in enumerate(out["oracle_label"].to_pylist()) if v is not None]
    assert train.num_rows == 8 and judged == [0, *range(3, 10)]
    assert train["label"].to_pylist() == [out["oracle_label"][i].as_py() for i in judged]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in train["path"].to_pylist())
    assert train["caption"].to_pylist() == [rows[i]["caption"] for i in judged]
    errs = out["error"].to_pylist()
    assert "row 1" in errs[1] and "missing.png" in errs[1]
    assert "row 2" in errs[2] and "bad.png: not an image file" in errs[2]
    assert out["oracle_label"].to_pylist()[0] in CLASSES


def test_label_names_the_file_of_empty_paths_and_unjudgeable_images(tmp_path):
    render_world(tmp_path, 3, seed=3, size=64, progress=False)
    rows = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    write_png_atomic(tmp_path / "wide.png", np.full((64, 96, 3), 200, np.uint8))
    rows[0]["path"] = "wide.png"  # the oracle judges square images only
    rows[1]["product_path"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "user.parquet")
    out, errors = label_manifest(tmp_path / "user.parquet", None, progress=False)
    errs = out["error"].to_pylist()
    assert errors == 2 and errs[2] is None
    assert errs[0].startswith("row 0: ") and "wide.png: image must be square" in errs[0]
    assert "row 1" in errs[1] and "empty product_path" in errs[1]


def test_load_product_photo_cuts_out_white_or_keeps_an_opaque_photo(tmp_path):
    photo = np.full((40, 30, 3), 255, np.uint8)
    photo[10:30, 5:25] = (200, 30, 30)
    write_png_atomic(tmp_path / "on_white.png", photo)
    rgba = load_product_photo(tmp_path / "on_white.png")
    assert rgba.shape == (40, 30, 4)
    assert (rgba[10:30, 5:25, 3] == 255).all() and rgba[..., 3].sum() == 20 * 20 * 255
    write_png_atomic(tmp_path / "scene.png", np.full((40, 30, 3), 90, np.uint8))
    with pytest.raises(ValueError, match="scene.png: product photo has no alpha"):
        load_product_photo(tmp_path / "scene.png")
    opaque = load_product_photo(tmp_path / "scene.png", require_cutout=False)
    assert (opaque[..., 3] == 255).all() and (opaque[..., :3] == 90).all()
    # A large photo is decoded reduced toward the caller's size (shorter side >= 2 x target).
    big = np.full((1200, 900, 3), 255, np.uint8)
    big[300:900, 200:700] = (30, 30, 200)
    write_png_atomic(tmp_path / "big.png", big)
    small = load_product_photo(tmp_path / "big.png", target_side=64)
    assert small.shape == (172, 129, 4)  # reduced by 900 // 128 = 7, rounded up
    assert small[86, 64].tolist() == [30, 30, 200, 255] and small[2, 2, 3] == 0


def test_manifest_missing_columns_named(tmp_path):
    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['product_path'\]"):
        label_manifest(tmp_path / "m.parquet", None, progress=False)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        label_manifest(tmp_path / "nope.parquet", None, progress=False)
