"""Batched inspection of generated ad images: a verdict and per-class probabilities each.

Input is a manifest (Parquet: ``path``, ``product_path``, ``caption``; paths relative to the
manifest's folder or absolute), or a folder of generated images of one product with the
product photo and caption given once. Images are read by the shared reader
(``rewardkit.io``), reduced toward the inspector's resolution; product photos by the one
product-photo loader, as RFNet was trained. Unreadable rows, and every entry of a folder that
is not an image, are skipped, counted and listed with the reason. When the embedded default
inspector meets images unlike AdWorld's, a ``DomainWarning`` says so once per run. The output
is written atomically:

``verdicts.parquet``: path, product_path, caption, verdict, p_<class> per class,
p_available, and the manifest's ``label`` when present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from rewardkit.data.samples import fit_square, load_product_rgb
from rewardkit.io import (
    IMAGE_SUFFIXES,
    decode_image,
    list_images,
    write_json_atomic,
    write_parquet_atomic,
)
from rewardkit.loading import read_ahead
from rewardkit.models.inspector import Inspector
from rewardkit.models.rfnet import verdict_indices
from rewardkit.scoring import embedded_default_in_use, unlike_adworld, warn_unlike_adworld

INSPECTOR_HINT = (
    "pass an inspector trained on such images with --model DIR (an RFNet folder from "
    "`rewardkit train rfnet`)"
)

__all__ = [
    "InspectionSummary",
    "inspect_batch",
    "inspect_images",
    "placement_columns",
    "read_inspection_input",
    "write_verdicts",
]


@dataclass
class InspectionSummary:
    """What an inspection run did."""

    out: str
    inspected: int
    skipped: list[dict] = field(default_factory=list)
    verdicts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "inspected": self.inspected,
            "skipped": len(self.skipped),
            "verdicts": self.verdicts,
            "seconds": round(self.seconds, 2),
            "images_per_second": round(self.inspected / self.seconds, 1) if self.seconds else None,
        }


def read_inspection_input(
    source: str | Path,
    product: str | Path | None = None,
    caption: str | None = None,
    height_cm: float | None = None,
    fill: float | None = None,
) -> pa.Table:
    """Rows (path, product_path, caption, height_cm, fill, error[, label]) with absolute
    paths, from a manifest or a folder of one product's generated images (``product`` and
    ``caption`` required then; ``height_cm`` and ``fill`` given once too). ``error`` is null,
    or why the row cannot be inspected: a folder's entries that are not images (other files,
    hidden files, broken links) and manifest rows without a path are rows with their reason,
    so the run lists them with the unreadable ones.

    ``height_cm`` (a manifest's ``product_height_cm``, else "N cm" in the caption) and
    ``fill`` (where the product was placed; null: the generator's default) are read by
    early-fusion inspectors only; null when unknown."""
    from rewardkit.data.keys import height_from_row

    source = Path(source)
    if source.is_dir():
        if product is None or caption is None:
            raise ValueError(f"{source}: a folder needs --product FILE and --caption TEXT")
        files, others = list_images(source)
        if not files:
            raise ValueError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        entries = sorted([(f, None) for f in files] + others, key=lambda e: str(e[0]))
        n = len(entries)
        if fill is not None and not 0.05 <= fill <= 1.0:
            raise ValueError(f"--fill: must be in [0.05, 1]; got {fill}")
        if height_cm is None:
            height_cm = height_from_row({"caption": caption})
        return pa.table(
            {
                "path": [str(f) for f, _ in entries],
                "product_path": [str(Path(product))] * n,
                "caption": [caption] * n,
                "height_cm": pa.array([height_cm] * n, pa.float64()),
                "fill": pa.array([fill] * n, pa.float64()),
                "error": pa.array([why for _, why in entries], pa.string()),
            }
        )
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such manifest or folder")
    table = pq.read_table(source)
    missing = [c for c in ("path", "product_path", "caption") if c not in table.column_names]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; has {table.column_names}")

    def absolute(column: str) -> list[str | None]:
        return [
            None if not p else p if Path(p).is_absolute() else str(source.parent / p)
            for p in table[column].to_pylist()
        ]

    paths, products = absolute("path"), absolute("product_path")
    errors = [
        None if (p and q) else f"empty {'path' if not p else 'product_path'}"
        for p, q in zip(paths, products, strict=True)
    ]
    captions = ["" if c is None else str(c) for c in table["caption"].to_pylist()]
    given = (
        table["product_height_cm"].to_pylist()
        if "product_height_cm" in table.column_names
        else [None] * len(paths)
    )
    fills = table["fill"].to_pylist() if "fill" in table.column_names else [None] * len(paths)
    cols = {
        "path": pa.array(paths, pa.string()),
        "product_path": pa.array(products, pa.string()),
        "caption": captions,
        "height_cm": pa.array(
            [height_from_row({"product_height_cm": h, "caption": c})
             for h, c in zip(given, captions, strict=True)], pa.float64()),
        "fill": pa.array([None if f is None else float(f) for f in fills], pa.float64()),
        "error": pa.array(errors, pa.string()),
    }  # fmt: skip
    if "label" in table.column_names:
        cols["label"] = table["label"].to_pylist()
    return pa.table(cols)


class _BatchReader:
    """Rows ``[lo, hi)`` decoded at the inspector's size (run in a loader process): the
    generated images and product photos (B, S, S, 3) uint8, the rows kept, the rows skipped
    with their reason, and why the first image unlike AdWorld is (when checking).

    With ``fills`` (an early-fusion inspector) each product entry is (S, S, 7): the photo on
    white, then the product as placed at the row's fill on white and its mask
    (``world.placement.placed_on_white``)."""

    def __init__(self, paths, products, errors, size: int, check_domain: bool, fills=None) -> None:
        self.paths, self.products, self.errors = paths, products, errors
        self.size, self.check_domain, self.fills = size, check_domain, fills
        self.products_seen: dict = {}  # a folder's one photo is read once

    def __call__(self, span: tuple[int, int]):
        gen, prod, idx, bad, unlike = [], [], [], [], None
        for i in range(span[0], min(span[1], len(self.paths))):
            path, product = self.paths[i], self.products[i]
            try:
                if self.errors[i] is not None:
                    raise ValueError(self.errors[i])
                decoded = decode_image(path, "RGB", target_side=self.size)
                g_i = fit_square(decoded, self.size)  # (S, S, 3)
                fill = None if self.fills is None else self.fills[i]
                if (product, fill) not in self.products_seen:
                    if len(self.products_seen) >= 256:
                        self.products_seen.clear()
                    self.products_seen[(product, fill)] = self._product(product, fill)
                p_i = self.products_seen[(product, fill)]  # (S, S, 3 or 7)
            except (OSError, ValueError) as err:  # unreadable or missing: skip, count, report
                reason = str(err).removeprefix(f"{path}: ")
                bad.append({"row": i, "path": path or "", "reason": reason})
                continue
            if self.check_domain and unlike is None and (why := unlike_adworld(decoded)):
                unlike = f"{path}: {why}"
            gen.append(g_i)
            prod.append(p_i)
            idx.append(i)
        if not idx:
            return None, None, idx, bad, unlike
        return torch.from_numpy(np.stack(gen)), torch.from_numpy(np.stack(prod)), idx, bad, unlike

    def _product(self, path: str, fill: float | None) -> np.ndarray:
        photo = load_product_rgb(path, self.size)  # (S, S, 3) on white
        if self.fills is None:
            return photo
        from rewardkit.world.export import load_product_photo
        from rewardkit.world.placement import DEFAULT_FILL, placed_on_white

        f = DEFAULT_FILL if fill is None or fill != fill else float(fill)
        placed = placed_on_white(load_product_photo(path, require_cutout=False), self.size, f)
        return np.concatenate([photo, placed], axis=2)


def inspect_images(
    inspector: Inspector,
    rows: pa.Table,
    out: str | Path,
    batch_size: int = 64,
    progress: bool = True,
    mixed_precision: str = "no",
    workers: int = 2,
) -> InspectionSummary:
    """Inspect every row; write ``out`` (Parquet) and ``<stem>.skipped.json`` if any.

    Images and product photos are decoded ahead of the model by ``workers`` DataLoader
    processes (0: in this process).

    Rows with an ``error`` (see :func:`read_inspection_input`) and rows whose image or
    product photo cannot be read are skipped with the reason. The inspector runs on its own
    device, under autocast at ``mixed_precision`` (``no``, ``fp16``, ``bf16``)."""
    out = Path(out)
    device = inspector.device
    size = inspector.rfnet.config.resolution
    check_domain = embedded_default_in_use(inspector)
    classes = inspector.classes
    start = time.perf_counter()
    kept: list[int] = []
    probs: list[np.ndarray] = []
    skipped: list[dict] = []
    paths, products = rows["path"].to_pylist(), rows["product_path"].to_pylist()
    captions = rows["caption"].to_pylist()
    errors = rows["error"].to_pylist() if "error" in rows.column_names else [None] * len(paths)
    fills, heights = placement_columns(inspector, rows, errors)
    reader = _BatchReader(paths, products, errors, size, check_domain, fills)
    starts = list(range(0, rows.num_rows, batch_size))
    batches = read_ahead(reader, [(lo, lo + batch_size) for lo in starts], workers,
                         pin=device.type == "cuda")  # fmt: skip
    bar = tqdm(total=rows.num_rows, desc="inspect", disable=not progress, unit="img")
    for lo, (gen, prod, idx, bad, unlike) in zip(starts, batches, strict=True):
        skipped.extend(bad)
        if check_domain and unlike is not None:
            warn_unlike_adworld(unlike, INSPECTOR_HINT)
            check_domain = False  # once per run
        if idx:
            h = None if heights is None else [heights[i] for i in idx]
            probs.append(inspect_batch(
                inspector, gen, prod, [captions[i] for i in idx], mixed_precision, h
            ))  # fmt: skip
            kept.extend(idx)
        bar.update(min(batch_size, rows.num_rows - lo))
    bar.close()
    p_all = np.concatenate(probs) if probs else np.zeros((0, len(classes)), np.float32)
    counts = write_verdicts(out, rows, kept, p_all, classes, skipped, inspector.accept_threshold)
    return InspectionSummary(str(out), len(kept), skipped, counts, time.perf_counter() - start)


def placement_columns(inspector: Inspector, rows: pa.Table, errors: list):
    """(fills, heights) per row for an early-fusion inspector, (None, None) otherwise. A row
    without a height when the inspector reads one gets that as its ``errors`` entry (it is
    skipped and listed, not guessed)."""
    if not inspector.uses_placement:
        return None, None
    n = rows.num_rows
    fills = rows["fill"].to_pylist() if "fill" in rows.column_names else [None] * n
    heights = rows["height_cm"].to_pylist() if "height_cm" in rows.column_names else [None] * n
    for i in inspector.missing_heights(heights):
        if errors[i] is None:
            errors[i] = (
                "no product height (product_height_cm, 'N cm' in the caption, or "
                "--height-cm); this inspector reads it"
            )
    return fills, heights


def inspect_batch(
    inspector: Inspector,
    gen: torch.Tensor,
    prod: torch.Tensor,
    captions: list[str],
    mixed_precision: str = "no",
    heights: list[float] | None = None,
) -> np.ndarray:
    """Class probabilities (B, C) float32 for generated images and product photos (B, S, S,
    3) uint8 at the inspector's size, one caption each: the model's forward on its device,
    under autocast at ``mixed_precision``. For an early-fusion inspector ``prod`` is (B, S,
    S, 7) (the photo, then the placed product and its mask: ``_BatchReader`` with fills) and
    ``heights`` the products' heights in cm. The local run and the Ray actors
    (``inspect --engine ray``) both call it."""
    from rewardkit.commands.devices import autocast

    device = inspector.device
    g = gen.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    p = prod.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    placed = None
    if p.shape[1] == 7:
        p, placed = p[:, :3], p[:, 3:]
    extra = ()
    if inspector.uses_placement:
        h = None if heights is None else torch.tensor(heights, dtype=torch.float32, device=device)
        extra = (placed, h)
    with torch.no_grad(), autocast(device, mixed_precision):
        logits = inspector(p, g, captions, *extra)  # (B, C)
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()


def write_verdicts(
    out: Path,
    rows: pa.Table,
    kept: list[int],
    probs: np.ndarray,
    classes: tuple[str, ...],
    skipped: list[dict],
    accept_threshold: float | None = None,
) -> dict[str, int]:
    """Write ``out`` (the inspected rows ``kept``, in that order, with their verdicts and
    probabilities ``probs`` (len(kept), C)) and ``<stem>.skipped.json`` when rows were
    skipped; returns the count of each verdict."""
    paths, products = rows["path"].to_pylist(), rows["product_path"].to_pylist()
    captions = rows["caption"].to_pylist()
    verdict = [classes[k] for k in verdict_indices(probs, classes, accept_threshold)]
    cols = {
        "path": [paths[i] for i in kept],
        "product_path": [products[i] for i in kept],
        "caption": [captions[i] for i in kept],
        "verdict": verdict,
    }
    for k, name in enumerate(classes):
        cols[f"p_{name.lower().replace(' ', '_')}"] = pa.array(probs[:, k], pa.float32())
    if "label" in rows.column_names:
        labels = rows["label"].to_pylist()
        cols["label"] = [labels[i] for i in kept]
    write_parquet_atomic(out, pa.table(cols))
    if skipped:
        write_json_atomic(out.with_name(out.stem + ".skipped.json"), skipped)
    return {c: verdict.count(c) for c in classes}
