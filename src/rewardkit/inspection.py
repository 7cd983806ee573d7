"""Batched inspection of generated ad images: a verdict and per-class probabilities each.

Input is a manifest (Parquet: ``path``, ``product_path``, ``caption``; paths relative to the
manifest's folder or absolute), or a folder of generated images of one product with the
product photo and caption given once. Unreadable rows are skipped, counted and listed with
the reason; the output is written atomically:

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
from PIL import Image
from tqdm import tqdm

from rewardkit.io import write_json_atomic, write_parquet_atomic
from rewardkit.models.inspector import Inspector
from rewardkit.scoring import list_images

__all__ = ["InspectionSummary", "inspect_images", "read_inspection_input"]


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
    source: str | Path, product: str | Path | None = None, caption: str | None = None
) -> pa.Table:
    """Rows (path, product_path, caption[, label]) with absolute paths, from a manifest or a
    folder of one product's generated images (``product`` and ``caption`` required then)."""
    source = Path(source)
    if source.is_dir():
        if product is None or caption is None:
            raise ValueError(f"{source}: a folder needs --product FILE and --caption TEXT")
        files = [str(p) for p in list_images(source)]
        if not files:
            raise ValueError(f"{source}: no images (.png, .jpg, .jpeg, .webp)")
        n = len(files)
        return pa.table(
            {"path": files, "product_path": [str(Path(product))] * n, "caption": [caption] * n}
        )
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such manifest or folder")
    table = pq.read_table(source)
    missing = [c for c in ("path", "product_path", "caption") if c not in table.column_names]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; has {table.column_names}")

    def absolute(column: str) -> list[str]:
        return [
            p if Path(p).is_absolute() else str(source.parent / p)
            for p in table[column].to_pylist()
        ]

    cols = {"path": absolute("path"), "product_path": absolute("product_path"),
            "caption": [str(c) for c in table["caption"].to_pylist()]}  # fmt: skip
    if "label" in table.column_names:
        cols["label"] = table["label"].to_pylist()
    return pa.table(cols)


def _read(path: str, size: int, on_white: bool) -> np.ndarray:
    with Image.open(path) as im:
        if on_white:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)


def inspect_images(
    inspector: Inspector,
    rows: pa.Table,
    out: str | Path,
    batch_size: int = 64,
    progress: bool = True,
) -> InspectionSummary:
    """Inspect every row; write ``out`` (Parquet) and ``<stem>.skipped.json`` if any."""
    out = Path(out)
    size = inspector.rfnet.config.resolution
    classes = inspector.classes
    start = time.perf_counter()
    kept: list[int] = []
    probs: list[np.ndarray] = []
    skipped: list[dict] = []
    paths, products = rows["path"].to_pylist(), rows["product_path"].to_pylist()
    captions = rows["caption"].to_pylist()
    bar = tqdm(total=rows.num_rows, desc="inspect", disable=not progress, unit="img")
    for lo in range(0, rows.num_rows, batch_size):
        gen, prod, idx = [], [], []
        for i in range(lo, min(lo + batch_size, rows.num_rows)):
            try:
                g_i = _read(paths[i], size, on_white=False)
                p_i = _read(products[i], size, on_white=True)
            except Exception as err:  # unreadable or missing: skip, count, report
                reason = f"{type(err).__name__}: {err}"
                skipped.append({"row": i, "path": paths[i], "reason": reason})
                continue
            gen.append(g_i)
            prod.append(p_i)
            idx.append(i)
        if idx:
            g = torch.from_numpy(np.stack(gen)).permute(0, 3, 1, 2).float() / 255.0
            p = torch.from_numpy(np.stack(prod)).permute(0, 3, 1, 2).float() / 255.0
            with torch.no_grad():
                logits = inspector(p, g, [captions[i] for i in idx])  # (B, C)
            probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
            kept.extend(idx)
        bar.update(min(batch_size, rows.num_rows - lo))
    bar.close()
    p_all = np.concatenate(probs) if probs else np.zeros((0, len(classes)), np.float32)
    verdict = [classes[k] for k in p_all.argmax(1)] if len(p_all) else []
    cols = {
        "path": [paths[i] for i in kept],
        "product_path": [products[i] for i in kept],
        "caption": [captions[i] for i in kept],
        "verdict": verdict,
    }
    for k, name in enumerate(classes):
        cols[f"p_{name.lower().replace(' ', '_')}"] = pa.array(p_all[:, k], pa.float32())
    if "label" in rows.column_names:
        labels = rows["label"].to_pylist()
        cols["label"] = [labels[i] for i in kept]
    write_parquet_atomic(out, pa.table(cols))
    if skipped:
        write_json_atomic(out.with_name(out.stem + ".skipped.json"), skipped)
    counts = {c: verdict.count(c) for c in classes}
    return InspectionSummary(str(out), len(kept), skipped, counts, time.perf_counter() - start)
