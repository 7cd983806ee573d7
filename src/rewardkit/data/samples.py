"""Labelled inspection samples: load them, split them by product, batch them as tensors.

A *sample table* (``pa.Table``) has one row per generated ad image, with the columns of
:data:`SAMPLE_COLUMNS`:

=================  ======================================================================
path               the generated image (absolute path)
product_path       the product photo (absolute; RGBA with alpha = mask, or on white)
depth_path         depth map of the generated image (absolute), null when absent
saliency_path      saliency map (absolute), null when absent
caption            the product caption/title ("" when the source has none)
label              the class name (one of ``rewardkit.world.scene.CLASSES`` by default)
product_key        which product the row shows: the content key of its photo and height
                   (``rewardkit.data.keys.product_key``: identical products under other
                   names stay together, two ``000000.png`` of different products do not),
                   ``path:<product_path>`` when the file cannot be read
=================  ======================================================================

Paths are made absolute at load time (relative ones are taken from the manifest's folder or
the RF1M root), so a table can be passed around without its root. Columns a source has
beyond these (``prompt``, ``category``, ``product_id``, ``product_alpha``, ...) follow them.

- :func:`load_adworld_manifest`: an AdWorld ``manifest.parquet`` (``rewardkit.world.export``).
- :func:`load_rf1m`: an RF1M-layout folder (``label.txt``, ``images/``, ``products/``, ...).
- :func:`split_by_product`: a ``split`` column, no product in two splits.
- :class:`SampleLoader`: batches of float tensors for RFNet, skipping unreadable files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from rewardkit.data.keys import height_from_row, product_keys_of_paths
from rewardkit.io import IMAGE_SUFFIXES, DecodedImage, decode_image, probe_image
from rewardkit.world.export import load_product_photo
from rewardkit.world.scene import CLASSES

__all__ = [
    "SAMPLE_COLUMNS",
    "SampleBatch",
    "SampleLoader",
    "load_adworld_manifest",
    "load_product_rgb",
    "fit_square",
    "load_resized",
    "load_rf1m",
    "product_keys",
    "split_by_product",
]

SAMPLE_COLUMNS = (
    "path",
    "product_path",
    "depth_path",
    "saliency_path",
    "caption",
    "label",
    "product_key",
)
REQUIRED_MANIFEST_COLUMNS = ("path", "product_path", "label")
RF1M_EXTRA_COLUMNS = ("prompt", "category", "product_id")  # taken from manifest.parquet
IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # the reader's formats
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _absolute(root: Path, value: object) -> str | None:
    """An absolute path string for ``value`` (relative to ``root``); None for null or ""."""
    if value is None or str(value) == "":
        return None
    p = Path(str(value))
    return str(p if p.is_absolute() else root / p)


def _check_labels(labels: Sequence[object], classes: Sequence[str], where: str) -> None:
    for i, lab in enumerate(labels):
        if lab not in classes:
            raise ValueError(f"{where}: row {i}: label {lab!r} is not one of {tuple(classes)}")


def product_keys(table: pa.Table) -> list[str]:
    """The product key of each row (see the module docstring): the content key of its product
    photo and height (``rewardkit.data.keys``; each distinct file read once), or
    ``path:<product_path>`` when the photo cannot be read."""
    n = table.num_rows
    paths = table["product_path"].to_pylist()
    cols = [c for c in ("product_height_cm", "caption") if c in table.column_names]
    rows = table.select(cols).to_pylist() if cols else [{}] * n
    keys = product_keys_of_paths(paths, [height_from_row(r) for r in rows])
    return [k if k is not None else f"path:{p}" for k, p in zip(keys, paths, strict=True)]


def _assemble(columns: dict[str, list], extras: dict[str, pa.ChunkedArray | list]) -> pa.Table:
    """The sample table: SAMPLE_COLUMNS (typed, product_key computed) then the extras."""
    table = pa.table(
        {name: pa.array(columns[name], type=pa.string()) for name in SAMPLE_COLUMNS[:-1]}
    )
    for name, values in extras.items():
        if name not in SAMPLE_COLUMNS:
            table = table.append_column(name, values if isinstance(values, pa.ChunkedArray)
                                        else pa.array(values))  # fmt: skip
    keys = pa.array(product_keys(table), pa.string())
    return table.add_column(len(SAMPLE_COLUMNS) - 1, "product_key", keys)


# ---------------------------------------------------------------------------------------
# Loaders


def load_adworld_manifest(path: str | Path, classes: Sequence[str] = CLASSES) -> pa.Table:
    """Read an AdWorld manifest (``rewardkit.world.export``) as a sample table.

    Args:
        path: ``manifest.parquet``; relative paths in it are relative to its folder.
        classes: The allowed label names.

    Returns:
        The sample table (module docstring), with absolute paths; the manifest's other
        columns (prompt, category, defect, ...) follow the sample columns.

    Raises:
        FileNotFoundError: No such manifest.
        ValueError: Unreadable Parquet, a missing required column (named), or a label
            outside ``classes`` (naming the row and the label).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for bad files
        raise ValueError(f"{path}: not a readable Parquet manifest ({err})") from None
    missing = [c for c in REQUIRED_MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; required {list(REQUIRED_MANIFEST_COLUMNS)}, "
            f"have {table.column_names}"
        )
    labels = table["label"].to_pylist()
    _check_labels(labels, classes, str(path))
    root = path.parent.absolute()
    n = table.num_rows

    def column(name: str) -> list:
        return table[name].to_pylist() if name in table.column_names else [None] * n

    for name in ("path", "product_path"):
        empty = [i for i, v in enumerate(column(name)) if not v]
        if empty:
            raise ValueError(f"{path}: row {empty[0]}: empty {name}")
    columns = {
        name: [_absolute(root, v) for v in column(name)]
        for name in ("path", "product_path", "depth_path", "saliency_path")
    }
    columns["caption"] = ["" if c is None else str(c) for c in column("caption")]
    columns["label"] = labels
    extras = {c: table[c] for c in table.column_names if c not in SAMPLE_COLUMNS}
    return _assemble(columns, extras)


def _find_same_name(folder: Path, name: str) -> Path | None:
    """``folder/name``, or a file in ``folder`` with the same stem and an image extension."""
    exact = folder / name
    if exact.is_file():
        return exact
    stem = Path(name).stem
    for ext in IMAGE_EXTENSIONS:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _has_alpha(path: Path | None) -> bool | None:
    """Whether the image file has an alpha channel (header only); None if unreadable."""
    if path is None:
        return None
    try:
        return probe_image(path).has_alpha
    except (OSError, ValueError):
        return None


def _read_pairs(file: Path) -> dict[str, str]:
    """``<image path>\\t<text>`` lines -> {image path: text}; errors name file and line."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, text = line.partition("\t")
        if not sep:
            raise ValueError(f"{file}:{lineno}: expected '<image path><TAB><text>'; got {line!r}")
        out[key.strip()] = text.strip()
    return out


def _parse_label_line(line: str, file: Path, lineno: int, classes: Sequence[str]) -> tuple:
    """``<path>\\t<class>``, or ``<path> <class>`` when the path has no spaces."""
    if "\t" in line:
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(
                f"{file}:{lineno}: expected '<image path><TAB><class>'; got {len(parts)} fields"
            )
        image, label = parts[0].strip(), parts[1].strip()
    else:
        image, _, label = line.strip().partition(" ")
        label = label.strip()
    if not image or not label:
        raise ValueError(f"{file}:{lineno}: expected '<image path><TAB><class>'; got {line!r}")
    if label not in classes:
        raise ValueError(
            f"{file}:{lineno}: unknown class {label!r} for {image}; expected one of "
            f"{tuple(classes)}"
        )
    return image, label


def load_rf1m(root: str | Path, classes: Sequence[str] = CLASSES) -> pa.Table:
    """Read a folder in the RF1M layout as a sample table.

    Layout (only ``label.txt`` and the files it names are required)::

        label.txt           "<image path>\\t<class name>" per line (or "<path> <class name>"
                            when the path has no spaces); blank and "#" lines are skipped
        images/...          the generated images (paths relative to ``root`` or absolute)
        products/<name>     the product photo, same file name as the image (any image
                            extension with the same stem is accepted). RGBA with alpha =
                            mask; a photo without alpha is allowed (its white background is
                            cut out when pixels are loaded); ``product_alpha`` records which
        depth/<name>        optional depth maps; saliency/<name> optional saliency maps
        manifest.parquet    optional: caption, prompt, category, product_id by ``path``
        captions.txt        optional "<image path>\\t<caption>" (or titles.txt, same format)

    Caption sources, first found: ``manifest.parquet``, ``captions.txt``, ``titles.txt``;
    rows without one get "". Files are not opened here except product headers (alpha) and
    product bytes (the product key); unreadable files surface in :class:`SampleLoader`.

    Raises:
        FileNotFoundError: No ``label.txt``.
        ValueError: A malformed line, an unknown class or a duplicated image (naming the
            file and line number), or an empty ``label.txt``.
    """
    root = Path(root).absolute()
    label_file = root / "label.txt"
    if not label_file.is_file():
        raise FileNotFoundError(f"{root}: no label.txt (not an RF1M-layout folder)")
    images: list[str] = []
    labels: list[str] = []
    seen: dict[str, int] = {}
    text = label_file.read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        image, label = _parse_label_line(line, label_file, lineno, classes)
        if image in seen:
            raise ValueError(
                f"{label_file}:{lineno}: {image} already labelled on line {seen[image]}"
            )
        seen[image] = lineno
        images.append(image)
        labels.append(label)
    if not images:
        raise ValueError(f"{label_file}: no labelled images")

    manifest: dict[str, dict] = {}
    manifest_file = root / "manifest.parquet"
    if manifest_file.is_file():
        try:
            rows = pq.read_table(manifest_file).to_pylist()
        except Exception as err:
            raise ValueError(f"{manifest_file}: not a readable Parquet manifest ({err})") from None
        manifest = {str(r.get("path")): r for r in rows if r.get("path") is not None}
    captions: dict[str, str] = {}
    if not any("caption" in r for r in manifest.values()):
        for name in ("captions.txt", "titles.txt"):
            if (root / name).is_file():
                captions = _read_pairs(root / name)
                break

    columns: dict[str, list] = {c: [] for c in SAMPLE_COLUMNS[:-1]}
    extras: dict[str, list] = {"product_alpha": []}
    extra_names = [c for c in RF1M_EXTRA_COLUMNS if any(c in r for r in manifest.values())]
    extras.update({c: [] for c in extra_names})
    for image, label in zip(images, labels, strict=True):
        name = Path(image).name
        product = _find_same_name(root / "products", name)
        depth = _find_same_name(root / "depth", name)
        saliency = _find_same_name(root / "saliency", name)
        row = manifest.get(image, {})
        caption = row.get("caption") if "caption" in row else captions.get(image)
        columns["path"].append(_absolute(root, image))
        columns["product_path"].append(str(product or root / "products" / name))
        columns["depth_path"].append(str(depth) if depth else None)
        columns["saliency_path"].append(str(saliency) if saliency else None)
        columns["caption"].append("" if caption is None else str(caption))
        columns["label"].append(label)
        extras["product_alpha"].append(_has_alpha(product))
        for c in extra_names:
            extras[c].append(row.get(c))
    return _assemble(columns, extras)


# ---------------------------------------------------------------------------------------
# Split


def split_by_product(
    table: pa.Table, fractions: dict[str, float] | None = None, seed: int = 0
) -> pa.Table:
    """Add (or replace) a ``split`` column so that no product is in two splits.

    Products (``product_key``, computed by :func:`product_keys` when the table has none)
    are shuffled with ``seed`` and dealt into the splits so that each split's share of
    *rows* approaches its fraction. Every split with a positive fraction gets at least one
    product when there are enough products. Deterministic: the same rows and seed give the
    same split, whatever the row order.

    Args:
        table: A sample table (needs ``product_path``, or ``product_key``/``product_id``).
        fractions: Split name -> share of rows; positive, summing to 1.
            Default ``{"train": 0.8, "val": 0.1, "test": 0.1}``.
        seed: Shuffle seed.

    Raises:
        ValueError: Invalid fractions or an empty table.
    """
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    if not fractions or any(not (isinstance(v, int | float) and v > 0) for v in fractions.values()):
        raise ValueError(f"fractions: need positive shares; got {fractions}")
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"fractions: must sum to 1; got {fractions} (sum {sum(fractions.values())})"
        )
    if table.num_rows == 0:
        raise ValueError("split_by_product: empty table")
    if "product_key" in table.column_names:
        keys = [str(k) for k in table["product_key"].to_pylist()]
    else:
        keys = product_keys(table)
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    order = sorted(counts)
    rng = np.random.default_rng(seed)
    order = [order[i] for i in rng.permutation(len(order))]
    names = list(fractions)
    bounds = np.cumsum([fractions[n] for n in names])  # upper edge of each split
    total = len(keys)
    groups: dict[str, list[str]] = {n: [] for n in names}
    done = 0
    for key in order:
        middle = (done + counts[key] / 2) / total  # where this product's rows sit
        idx = min(int(np.searchsorted(bounds, middle, side="right")), len(names) - 1)
        groups[names[idx]].append(key)
        done += counts[key]
    # Tiny tables: give each empty split one product from the split with the most.
    for name in names:
        if not groups[name]:
            donor = max(names, key=lambda n: len(groups[n]))
            if len(groups[donor]) > 1:
                groups[name].append(groups[donor].pop())
    where = {key: name for name, ks in groups.items() for key in ks}
    split = pa.array([where[k] for k in keys], pa.string())
    if "split" in table.column_names:
        table = table.drop_columns(["split"])
    return table.append_column("split", split)


# ---------------------------------------------------------------------------------------
# Batches


@dataclass
class SampleBatch:
    """One batch of samples as tensors (B rows, S = the loader's size)."""

    product: torch.Tensor  # (B, 3, S, S) float in [0, 1]: RGB composited on white, letterboxed
    generated: torch.Tensor  # (B, 3, S, S) float in [0, 1]
    depth: torch.Tensor | None  # (B, 1, S, S) float in [0, 1], or None
    saliency: torch.Tensor | None  # (B, 1, S, S) float in [0, 1], or None
    captions: list[str]
    labels: torch.Tensor  # (B,) long: index into the loader's classes
    rows: list[int] = field(default_factory=list)  # row indices in the table

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _resize(im: Image.Image, size: int) -> Image.Image:
    return im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BILINEAR)


def load_product_rgb(path: str | Path, size: int) -> np.ndarray:
    """A product photo as (size, size, 3) uint8, RFNet's product input: read by
    :func:`rewardkit.world.export.load_product_photo` (a photo without alpha has its white
    cut out as the mask, or stays opaque), composited on white, padded to a square with
    white (aspect ratio kept), resized."""
    rgba = load_product_photo(path, target_side=size, require_cutout=False)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    rgb = (rgb + 0.5).astype(np.uint8)  # (h, w, 3) on white
    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), 255, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = rgb
    return np.asarray(_resize(Image.fromarray(square), size))


def load_resized(path: str | Path, size: int, mode: str = "RGB") -> np.ndarray:
    """An image as (size, size, 3) (``"RGB"``) or (size, size) (``"L"``) uint8: decoded by
    :func:`rewardkit.io.decode_image` (reduced toward ``size`` when much larger), then
    brought to a square by :func:`fit_square`, as generated images and maps reach RFNet."""
    return fit_square(decode_image(path, mode, target_side=size), size)


def fit_square(image: DecodedImage, size: int) -> np.ndarray:
    """A decoded image as (size, size[, C]) uint8: the whole file resized (bilinear,
    antialiased when shrinking) to a square. A reduced decode is resampled over the file's
    exact area, so its rounded-up last row and column do not shift the result."""
    if image.reduction == 1:
        return np.asarray(_resize(Image.fromarray(image.array), size))
    box = (0.0, 0.0, image.width / image.reduction, image.height / image.reduction)
    resized = Image.fromarray(image.array).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized)


class SampleLoader:
    """Batches of a sample table as float tensors for RFNet.

    Images are decoded with PIL and resized (bilinear) to ``size`` x ``size``: generated
    images and maps directly (they are square renders), product photos composited on white
    and padded to a square first (:func:`load_product_rgb`); RFNet takes the product as RGB
    on white and nothing else. Depth and saliency are loaded when the table has a non-null
    ``depth_path`` / ``saliency_path`` (and ``maps`` is on); a row of such a table without
    its map is skipped.

    A row whose files are missing or unreadable is skipped, recorded once in ``skipped``
    (``(path, reason)``) and not tried again; batches are refilled from the following rows,
    so all but the last batch are full. With ``cache``, decoded rows are kept in memory as
    uint8 (about ``8 * size**2`` bytes per row) so later epochs do not decode again.

    Args:
        table: A sample table (``path``, ``product_path``, ``label``; ``caption``,
            ``depth_path``, ``saliency_path`` optional).
        size: Output side in pixels.
        batch_size: Rows per batch.
        classes: Label names; ``labels`` index into them.
        shuffle: Shuffle the rows each epoch (seeded by ``seed`` and the epoch number).
        seed: Shuffle seed.
        cache: Keep decoded rows in memory.
        maps: Load depth and saliency when the table has them.
        drop_last: Drop the last, smaller batch.

    Raises:
        ValueError: A required column is missing or a label is not in ``classes``.
    """

    def __init__(
        self,
        table: pa.Table,
        size: int = 64,
        batch_size: int = 32,
        classes: Sequence[str] = CLASSES,
        shuffle: bool = False,
        seed: int = 0,
        cache: bool = False,
        maps: bool = True,
        drop_last: bool = False,
    ) -> None:
        missing = [c for c in ("path", "product_path", "label") if c not in table.column_names]
        if missing:
            raise ValueError(f"sample table: missing column(s) {missing}")
        if size < 1 or batch_size < 1:
            raise ValueError(f"size and batch_size must be >= 1; got {size}, {batch_size}")
        self.classes = tuple(classes)
        labels = table["label"].to_pylist()
        _check_labels(labels, self.classes, "sample table")
        self.labels = [self.classes.index(lab) for lab in labels]
        self.paths = [str(p) for p in table["path"].to_pylist()]
        self.products = [str(p) for p in table["product_path"].to_pylist()]
        n = table.num_rows
        self.captions = (
            ["" if c is None else str(c) for c in table["caption"].to_pylist()]
            if "caption" in table.column_names
            else [""] * n
        )
        self.maps: dict[str, list[str | None]] = {}
        for kind in ("depth", "saliency"):
            column = f"{kind}_path"
            if maps and column in table.column_names:
                values = table[column].to_pylist()
                if any(values):
                    self.maps[kind] = [v or None for v in values]
        self.size, self.batch_size = size, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.cache = cache
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[int] = set()
        self._memory: dict[int, tuple] = {}

    @property
    def n_skipped(self) -> int:
        """Rows skipped so far (each counted once)."""
        return len(self._bad)

    def __len__(self) -> int:
        """Batches per epoch, counting the rows not (yet) known to be bad."""
        n = len(self.paths) - len(self._bad)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _decode(self, i: int) -> tuple:
        """Row ``i`` as uint8 arrays (product, generated, depth | None, saliency | None)."""
        s = self.size
        current = self.paths[i]
        try:
            generated = load_resized(current, s, "RGB")  # (S, S, 3)
            current = self.products[i]
            product = load_product_rgb(current, s)  # (S, S, 3)
            maps = []
            for kind in ("depth", "saliency"):
                if kind not in self.maps:
                    maps.append(None)
                    continue
                current = self.maps[kind][i]
                if current is None:
                    raise ValueError(f"no {kind}_path")
                maps.append(load_resized(current, s, "L"))  # (S, S)
        except Exception as err:  # the reader's errors name the file; others get its name
            message = str(err)
            if not message.startswith(f"{current}: "):
                message = f"{current}: {type(err).__name__}: {message}"
            raise ValueError(message) from None
        return product, generated, maps[0], maps[1]

    def _row(self, i: int) -> tuple | None:
        if i in self._memory:
            return self._memory[i]
        try:
            row = self._decode(i)
        except ValueError as err:
            self._bad.add(i)
            self.skipped.append((self.paths[i], str(err)))
            return None
        if self.cache:
            self._memory[i] = row
        return row

    def _collate(self, rows: list[int], decoded: list[tuple]) -> SampleBatch:
        def images(k: int) -> torch.Tensor:
            arr = np.stack([d[k] for d in decoded])  # (B, S, S, 3) or (B, S, S)
            t = torch.from_numpy(arr)
            t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)  # (B, C, S, S)
            return t.float().div_(255.0)

        return SampleBatch(
            product=images(0),
            generated=images(1),
            depth=images(2) if "depth" in self.maps else None,
            saliency=images(3) if "saliency" in self.maps else None,
            captions=[self.captions[i] for i in rows],
            labels=torch.tensor([self.labels[i] for i in rows], dtype=torch.long),
            rows=list(rows),
        )

    def __iter__(self) -> Iterator[SampleBatch]:
        order = np.arange(len(self.paths))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths))
        self.epoch += 1
        rows: list[int] = []
        decoded: list[tuple] = []
        for i in order.tolist():
            if i in self._bad:
                continue
            row = self._row(i)
            if row is None:
                continue
            rows.append(i)
            decoded.append(row)
            if len(rows) == self.batch_size:
                yield self._collate(rows, decoded)
                rows, decoded = [], []
        if rows and not self.drop_last:
            yield self._collate(rows, decoded)
