"""Export AdWorld renders in an RF1M-like layout, and run the oracle over any manifest.

Layout written by ``render_world(out_dir, ...)``::

    images/000000.png      the ad image (RGB)
    products/000000.png    the product photo (RGBA, alpha = mask)
    depth/000000.png       ground-truth depth (8-bit, 255 = nearest)
    saliency/000000.png    ground-truth saliency (8-bit)
    label.txt              "<image path>\\t<RF1M class name>" per line
    manifest.parquet       one row per image (columns in MANIFEST_COLUMNS)
    world.json             parameters and per-class counts

Paths in the manifest are relative to the manifest's folder. Same seed, same bytes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from rewardkit.data.keys import product_key, prompt_key
from rewardkit.io import (
    read_image,
    write_json_atomic,
    write_parquet_atomic,
    write_png_atomic,
    write_text_atomic,
)
from rewardkit.world.oracle import MEASUREMENTS, TARGET_COLUMN_PREFIX, TARGET_KINDS, label
from rewardkit.world.placement import DEFAULT_FILL, white_background_to_rgba
from rewardkit.world.sampler import (
    Item,
    class_for_index,
    parse_balance,
    sample_item,
    spread_for_index,
)
from rewardkit.world.scene import CLASSES

MANIFEST_COLUMNS = (
    "image_id",
    "path",
    "product_path",
    "depth_path",
    "saliency_path",
    "caption",
    "prompt",
    "label",
    "defect",
    "severity",
    "category",
    "product_height_cm",
    "product_width_cm",
    "size",
    "fill",
    "x0",
    "y0",
    "x1",
    "y1",
    "product_key",
    "prompt_key",
)
LABEL_INPUT_COLUMNS = ("path", "product_path")  # plus product_height_cm or a caption with "N cm"
# The oracle judges images of up to 2 x 512 px on the shorter side as they are (every AdWorld
# render); larger files are decoded reduced to 1024-2047 px, so a 12000 x 12000 image costs a
# 1091 px judgement instead of gigabytes of float arrays.
ORACLE_TARGET_SIDE = 512
# Product photos likewise, wherever they are read (generation, the oracle, product keys): the
# same pixels everywhere, enough for placement at SD 1.5's 512 px; AdWorld cutouts are 192 px.
PRODUCT_TARGET_SIDE = 512


def item_row(item: Item, image_id: str, paths: dict[str, str], fill: float) -> dict:
    """The manifest row of one rendered item."""
    r = item.render
    p = r.placement
    return {
        "image_id": image_id,
        **paths,
        "caption": item.product.caption,
        "prompt": r.prompt,
        "label": item.label,
        "defect": item.defect,
        "severity": float(item.severity),
        "category": item.product.category,
        "product_height_cm": item.product.height_cm,
        "product_width_cm": item.product.width_cm,
        "size": p.size,
        "fill": fill,
        "x0": p.x0,
        "y0": p.y0,
        "x1": p.x1,
        "y1": p.y1,
        # content identities (rewardkit.data.keys): renders of one seed share products
        "product_key": product_key(item.cutout, item.product.height_cm),
        "prompt_key": prompt_key(r.prompt),
    }


def render_world(
    out_dir: str | Path,
    n: int,
    seed: int,
    size: int = 64,
    balance: str | dict[str, float] | None = None,
    fill: float = DEFAULT_FILL,
    progress: bool = True,
    spread: float = 0.0,
) -> pa.Table:
    """Render ``n`` AdWorld samples into ``out_dir`` (layout in the module docstring).

    ``spread``: the share of items labelled by the oracle's verdict instead of the class
    asked for; among them, Space and Size Mismatch scenes have their defect strength drawn
    across the oracle's threshold (so some come out Available). Which items is a pure
    function of (seed, index), like everything else.

    Items already on disk from an interrupted run are rendered again only if a file is
    missing; every file is written atomically, and the manifest last.
    """
    if n <= 0:
        raise ValueError(f"--n must be positive, got {n}")
    if size < 32 or size > 1024:
        raise ValueError(f"--size must be in [32, 1024] px, got {size}")
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"--spread must be in [0, 1], got {spread}")
    weights = parse_balance(balance)
    out = Path(out_dir)
    rows = []
    for i in tqdm(range(n), desc="render", disable=not progress, unit="img"):
        cls = class_for_index(seed, i, weights)
        spread_i = spread_for_index(seed, i, spread)
        item = sample_item(seed, i, size, cls, fill, spread=spread_i)
        image_id = f"{i:06d}"
        paths = {
            "path": f"images/{image_id}.png",
            "product_path": f"products/{image_id}.png",
            "depth_path": f"depth/{image_id}.png",
            "saliency_path": f"saliency/{image_id}.png",
        }
        write_png_atomic(out / paths["path"], item.render.image)
        write_png_atomic(out / paths["product_path"], item.cutout)
        write_png_atomic(out / paths["depth_path"], item.render.depth)
        write_png_atomic(out / paths["saliency_path"], item.render.saliency)
        rows.append(item_row(item, image_id, paths, fill))
    table = pa.Table.from_pylist(rows)
    write_text_atomic(out / "label.txt", "".join(f"{r['path']}\t{r['label']}\n" for r in rows))
    counts = Counter(r["label"] for r in rows)
    write_json_atomic(
        out / "world.json",
        {
            "n": n,
            "seed": seed,
            "size": size,
            "fill": fill,
            "spread": spread,
            "balance": weights,
            "counts": {c: counts.get(c, 0) for c in CLASSES},
        },
    )
    write_parquet_atomic(out / "manifest.parquet", table)
    return table


_CM = re.compile(r"(\d+(?:\.\d+)?)\s*cm\b")


def _height_cm(row: dict, i: int, manifest: Path) -> float:
    if row.get("product_height_cm") is not None:
        return float(row["product_height_cm"])
    m = _CM.search(row.get("caption") or "")
    if not m:
        raise ValueError(
            f"{manifest}: row {i}: need product_height_cm, or a caption with the size "
            f"such as '..., 10 cm'"
        )
    return float(m.group(1))


def read_manifest(path: str | Path, required: Iterable[str] = LABEL_INPUT_COLUMNS) -> pa.Table:
    """Read a manifest (Parquet), checking the required columns with a clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable Parquet manifest ({e})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; have {table.column_names}")
    return table


def load_product_photo(
    path: str | Path, target_side: int | None = PRODUCT_TARGET_SIDE, require_cutout: bool = True
) -> np.ndarray:
    """A product photo as RGBA uint8 (H, W, 4): the one product-photo loader of every
    command (generation, the oracle, inspection and RFNet training).

    The file is read by :func:`rewardkit.io.read_image` (any format, depth and orientation;
    reduced toward ``target_side`` when much larger). A photo without alpha is cut out from
    its white background (pixels with all channels >= 245 become transparent).

    Args:
        path: The photo.
        target_side: The side the caller will scale the photo to (None: full size). The
            default is what generation, the oracle and product keys use, so they agree.
        require_cutout: Raise when the photo has neither alpha nor a white background
            (the generator and the oracle need the product's outline); False returns it
            opaque.

    Raises:
        FileNotFoundError / ValueError: Unreadable file, or no outline (both name the file).
    """
    rgba = read_image(path, "RGBA", target_side)
    if (rgba[..., 3] == 255).all():
        cut = white_background_to_rgba(np.ascontiguousarray(rgba[..., :3]))
        if (cut[..., 3] == 255).all():
            if require_cutout:
                raise ValueError(f"{path}: product photo has no alpha and no white background")
            return rgba
        rgba = cut
    return rgba


def judge_row(
    row: dict, i: int, manifest: str | Path, image: np.ndarray | None = None
) -> tuple[str, dict[str, float | str]]:
    """The oracle's (class, measurements) for row ``i`` of a manifest (paths relative to the
    manifest's folder, or absolute). ``image`` (RGB uint8) replaces the row's image file, e.g.
    a degraded copy of it.

    Raises:
        OSError: Unreadable image or product photo.
        ValueError: No product size, or an image the oracle cannot judge (named row).
    """
    base = Path(manifest).parent
    for column in ("path", "product_path") if image is None else ("product_path",):
        if not row.get(column):
            raise ValueError(f"{manifest}: row {i}: empty {column}")
    source = base / row["path"] if image is None else None
    if source is not None:
        image = read_image(source, "RGB", ORACLE_TARGET_SIDE)
    cutout = load_product_photo(base / row["product_path"])
    fill = float(row.get("fill") or DEFAULT_FILL)
    height = _height_cm(row, i, Path(manifest))
    try:
        return label(cutout, image, height, fill=fill)
    except ValueError as e:  # e.g. a non-square image: name the file
        raise ValueError(f"{source}: {e}" if source is not None else str(e)) from None


def label_manifest(
    manifest: str | Path,
    out: str | Path | None = None,
    progress: bool = True,
    training_out: str | Path | None = None,
) -> tuple[pa.Table, int]:
    """Run the oracle over every image of a manifest.

    Bad rows (missing or unreadable image or product photo, no size) are kept with an
    ``error`` message and a null label, and counted, instead of stopping the run.

    Args:
        training_out: Also write a training manifest there (``train rfnet --manifest``): the
            manifest's rows the oracle judged, paths made absolute, ``label`` = its verdict
            (the annotators' role in the data loop: generate, label, train the inspector).

    Returns:
        (table, n_errors); the table is also written to ``out`` if given.
    """
    manifest = Path(manifest)
    table = read_manifest(manifest)
    if "product_height_cm" not in table.column_names and "caption" not in table.column_names:
        raise ValueError(f"{manifest}: need a product_height_cm or caption column")
    rows_out = []
    errors = 0
    for i, row in enumerate(tqdm(table.to_pylist(), desc="label", disable=not progress)):
        rec: dict = {"path": row["path"], "oracle_label": None, "error": None}
        rec.update({k: None for k in MEASUREMENTS})
        if "label" in row:
            rec["label"] = row["label"]
        try:
            cls, m = judge_row(row, i, manifest)
            rec["oracle_label"] = cls
            rec.update(m)
        except (OSError, ValueError) as e:
            errors += 1
            rec["error"] = f"row {i}: {e}"
        rows_out.append(rec)
    schema_fields = [("path", pa.string()), ("oracle_label", pa.string()), ("error", pa.string())]
    schema_fields += [(k, pa.string() if k == "prop_kind" else pa.float64()) for k in MEASUREMENTS]
    if "label" in table.column_names:
        schema_fields.append(("label", pa.string()))
    result = pa.Table.from_pylist(rows_out, schema=pa.schema(schema_fields))
    if out is not None:
        write_parquet_atomic(out, result)
    if training_out is not None:
        write_parquet_atomic(training_out, oracle_training_manifest(manifest, table, result))
    return result, errors


def oracle_training_manifest(manifest: Path, table: pa.Table, labels: pa.Table) -> pa.Table:
    """``table`` (read from ``manifest``) with ``label`` = the oracle's verdict in ``labels``
    (:func:`label_manifest`) and ``oracle_<name>`` = its measurements (``oracle.TARGET_KINDS``),
    the rows it could not judge left out, and ``path`` and ``product_path`` absolute."""
    keep = [i for i, v in enumerate(labels["oracle_label"].to_pylist()) if v is not None]
    kept = table.take(keep)
    root = Path(manifest).parent.absolute()
    for name in ("path", "product_path", "depth_path", "saliency_path"):
        if name in kept.column_names:
            values = [v if not v or Path(v).is_absolute() else str(root / v)
                      for v in kept[name].to_pylist()]  # fmt: skip
            kept = kept.set_column(
                kept.column_names.index(name), name, pa.array(values, pa.string())
            )
    verdicts = pa.array([labels["oracle_label"][i].as_py() for i in keep], pa.string())
    if "label" in kept.column_names:
        kept = kept.drop_columns(["label"])
    # The measurements behind each verdict, as ``train rfnet``'s measurement heads read them.
    for name in TARGET_KINDS:
        column = TARGET_COLUMN_PREFIX + name
        if column in kept.column_names:
            kept = kept.drop_columns([column])
        kept = kept.append_column(column, labels[name].take(keep).cast(pa.float64()))
    return kept.append_column("label", verdicts)
