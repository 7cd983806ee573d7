"""Labelled inspection samples: RF1M and AdWorld loaders, product splits, the batch loader."""

import collections
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rewardkit.data.samples import (
    SAMPLE_COLUMNS,
    SampleLoader,
    load_adworld_manifest,
    load_rf1m,
    split_by_product,
)
from rewardkit.world.export import render_world
from rewardkit.world.scene import CLASSES


def _rgba_product(seed: int, side: int = 16) -> np.ndarray:
    """A coloured square on a transparent canvas."""
    rng = np.random.default_rng(seed)
    im = np.zeros((side, side, 4), np.uint8)
    im[4:12, 5:11, :3] = rng.integers(0, 200, size=3)
    im[4:12, 5:11, 3] = 255
    return im


def _rgb(seed: int, side: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def rf1m_folder(root: Path) -> Path:
    """Three samples: a.png (RGBA product, maps), b.png (JPEG product on white, no alpha),
    c.png (RGBA product); label.txt mixes tab and space separators."""
    for i, name in enumerate(["a", "b", "c"]):
        _save(root / "images" / f"{name}.png", _rgb(i))
    _save(root / "products" / "a.png", _rgba_product(0))
    white = np.full((16, 16, 3), 255, np.uint8)
    white[3:13, 4:12] = (200, 30, 40)
    _save(root / "products" / "b.jpg", white)  # same stem, other extension, no alpha
    _save(root / "products" / "c.png", _rgba_product(2))
    _save(root / "depth" / "a.png", _rgb(5)[..., 0])
    _save(root / "saliency" / "a.png", _rgb(6)[..., 0])
    (root / "label.txt").write_text(
        "images/a.png\tAvailable\n"
        "\n"
        "images/b.png Space Mismatch\n"  # space variant: the class name has a space itself
        "images/c.png\tShape Hallucination\n"
    )
    (root / "captions.txt").write_text("images/a.png\tred mug, 10 cm\nimages/c.png\tlamp\n")
    return root


# -- RF1M ------------------------------------------------------------------------------


def test_load_rf1m_hand_made_folder(tmp_path):
    root = rf1m_folder(tmp_path / "rf1m")
    table = load_rf1m(root)
    assert tuple(table.column_names[: len(SAMPLE_COLUMNS)]) == SAMPLE_COLUMNS
    rows = table.to_pylist()
    assert [r["label"] for r in rows] == ["Available", "Space Mismatch", "Shape Hallucination"]
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows)
    assert rows[1]["product_path"] == str(root.absolute() / "products" / "b.jpg")
    assert [r["product_alpha"] for r in rows] == [True, False, True]  # b: white background
    assert rows[0]["depth_path"].endswith("depth/a.png") and rows[1]["depth_path"] is None
    assert [r["caption"] for r in rows] == ["red mug, 10 cm", "", "lamp"]
    assert len({r["product_key"] for r in rows}) == 3


def test_load_rf1m_errors_name_file_and_line(tmp_path):
    root = rf1m_folder(tmp_path / "rf1m")
    with open(root / "label.txt", "a") as f:
        f.write("images/d.png\tBroken Product\n")
    with pytest.raises(ValueError, match=r"label\.txt:5: unknown class 'Broken Product'"):
        load_rf1m(root)
    (root / "label.txt").write_text("images/a.png\tAvailable\nimages/a.png\tAvailable\n")
    with pytest.raises(ValueError, match=r"label\.txt:2: .*already labelled on line 1"):
        load_rf1m(root)
    (root / "label.txt").write_text("images/a.png\tAvailable\textra\n")
    with pytest.raises(ValueError, match=r"label\.txt:1: "):
        load_rf1m(root)
    with pytest.raises(FileNotFoundError, match="label.txt"):
        load_rf1m(tmp_path)


def test_load_rf1m_reads_captions_from_manifest_and_adworld_exports(tmp_path):
    out = tmp_path / "world"
    manifest = render_world(out, n=6, seed=3, size=32, progress=False)
    from_folder = load_rf1m(out)
    from_manifest = load_adworld_manifest(out / "manifest.parquet")
    for column in SAMPLE_COLUMNS:
        assert from_folder[column].to_pylist() == from_manifest[column].to_pylist(), column
    assert from_folder["caption"].to_pylist() == manifest["caption"].to_pylist()
    assert "prompt" in from_folder.column_names and "defect" in from_manifest.column_names


# -- AdWorld manifest ------------------------------------------------------------------


def test_load_adworld_manifest_paths_and_errors(tmp_path):
    root = rf1m_folder(tmp_path / "data")
    rows = [
        {"path": "images/a.png", "product_path": "products/a.png", "label": "Available",
         "caption": "mug", "depth_path": "depth/a.png", "saliency_path": None},
        {"path": str(root / "images/b.png"), "product_path": "products/b.jpg",
         "label": "Unsuitable", "caption": None, "depth_path": None, "saliency_path": ""},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), root / "m.parquet")
    table = load_adworld_manifest(root / "m.parquet")
    got = table.to_pylist()
    assert got[0]["path"] == str(root.absolute() / "images/a.png")
    assert got[1]["path"] == str(root / "images/b.png")
    assert got[0]["depth_path"].endswith("depth/a.png")
    assert got[1]["depth_path"] is None and got[1]["saliency_path"] is None
    assert [r["caption"] for r in got] == ["mug", ""]

    pq.write_table(pa.Table.from_pylist([{"path": "x.png", "label": "Available"}]), root / "n.pq")
    with pytest.raises(ValueError, match=r"n\.pq: missing column\(s\) \['product_path'\]"):
        load_adworld_manifest(root / "n.pq")
    rows[1]["label"] = "Floating"
    pq.write_table(pa.Table.from_pylist(rows), root / "m.parquet")
    with pytest.raises(ValueError, match=r"m\.parquet: row 1: label 'Floating'"):
        load_adworld_manifest(root / "m.parquet")
    with pytest.raises(FileNotFoundError):
        load_adworld_manifest(root / "none.parquet")


# -- split -----------------------------------------------------------------------------


def _table_with_duplicates(root: Path, n_products: int = 30) -> pa.Table:
    """Each product photo is saved under two or three file names (identical bytes)."""
    rows = []
    for p in range(n_products):
        for copy in range(2 + p % 2):
            path = root / f"p{p}_{copy}.png"
            _save(path, _rgba_product(p))
            rows.append({"path": str(root / f"img{p}_{copy}.png"), "product_path": str(path),
                         "label": CLASSES[p % len(CLASSES)], "caption": ""})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return load_adworld_manifest(root / "manifest.parquet")


def test_split_by_product_keeps_duplicated_photos_together(tmp_path):
    table = _table_with_duplicates(tmp_path)
    assert len(set(table["product_key"].to_pylist())) == 30  # same bytes, same key
    split = split_by_product(table, seed=1)
    where = collections.defaultdict(set)
    for key, s in zip(table["product_key"].to_pylist(), split["split"].to_pylist(), strict=True):
        where[key].add(s)
    assert all(len(s) == 1 for s in where.values())
    counts = collections.Counter(split["split"].to_pylist())
    assert set(counts) == {"train", "val", "test"}
    assert 0.65 < counts["train"] / table.num_rows < 0.9
    # Deterministic, independent of row order; a seed changes it; "split" is replaced.
    again = split_by_product(split.take(np.arange(table.num_rows)[::-1]), seed=1)
    assert again["split"].to_pylist()[::-1] == split["split"].to_pylist()
    assert split_by_product(table, seed=2)["split"].to_pylist() != split["split"].to_pylist()


def test_split_by_product_groups_unreadable_photos_by_path_and_validates(tmp_path):
    # A file name is not an identity (two folders both hold 000000.png): product_id is not
    # used; photos that cannot be read are grouped by their path.
    paths = [str(tmp_path / f"{i}.png") for i in range(12)]
    product_paths = [str(tmp_path / f"p{i // 4}.png") for i in range(12)]  # missing files
    table = pa.table({"path": paths, "product_path": product_paths,
                      "product_id": [0] * 12})  # fmt: skip
    split = split_by_product(table, {"a": 0.5, "b": 0.25, "c": 0.25})["split"].to_pylist()
    assert all(len(set(split[i : i + 4])) == 1 for i in range(0, 12, 4))
    assert sorted(set(split)) == ["a", "b", "c"]  # three products, three splits
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_product(table, {"train": 0.8, "test": 0.1})
    with pytest.raises(ValueError, match="positive"):
        split_by_product(table, {"train": 1.1, "test": -0.1})


# -- loader ----------------------------------------------------------------------------


def test_sample_loader_batches_skips_corrupt_files_and_caches(tmp_path):
    root = rf1m_folder(tmp_path / "rf1m")
    (root / "images" / "c.png").write_bytes(b"not a png")
    table = load_rf1m(root)
    loader = SampleLoader(table, size=24, batch_size=2, maps=False)
    batches = list(loader)
    assert [len(b) for b in batches] == [2]  # c.png skipped, batch refilled
    b = batches[0]
    assert b.product.shape == (2, 3, 24, 24) and b.generated.shape == (2, 3, 24, 24)
    assert b.product.dtype == torch.float32 and 0 <= b.product.min() and b.product.max() <= 1
    assert b.depth is None and b.saliency is None
    assert b.product[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # transparent -> white
    assert b.captions == ["red mug, 10 cm", ""] and b.labels.tolist() == [0, 1]
    assert loader.n_skipped == 1
    assert loader.skipped[0][0].endswith("c.png") and "c.png" in loader.skipped[0][1]
    list(loader)
    assert loader.n_skipped == 1  # counted once

    # Maps: the table has depth for a.png only, so b.png is skipped for lack of one.
    with_maps = SampleLoader(table, size=16, batch_size=4)
    (only,) = list(with_maps)
    assert only.depth.shape == (1, 1, 16, 16) and only.saliency.shape == (1, 1, 16, 16)
    assert any("no depth_path" in reason for _, reason in with_maps.skipped)

    cached = SampleLoader(table, size=16, batch_size=4, maps=False, cache=True)
    first = next(iter(cached))
    (root / "images" / "a.png").unlink()
    second = next(iter(cached))
    assert torch.equal(first.generated, second.generated) and cached.n_skipped == 1


def test_sample_loader_shuffles_deterministically(tmp_path):
    table = _table_with_duplicates(tmp_path, n_products=5)
    for i, path in enumerate(table["path"].to_pylist()):
        _save(Path(path), _rgb(i, side=8))

    def orders(seed: int) -> list[list[int]]:
        loader = SampleLoader(table, size=8, batch_size=4, shuffle=True, seed=seed)
        return [sum((b.rows for b in loader), []) for _ in range(2)]

    a, b = orders(0), orders(0)
    assert a == b and a[0] != a[1] and sorted(a[0]) == list(range(table.num_rows))
    assert orders(1) != a
    with pytest.raises(ValueError, match="label 'Nope'"):
        SampleLoader(table.set_column(5, "label", pa.array(["Nope"] * table.num_rows)))
