"""Generation jobs and outputs: products in (``load_jobs``), images and manifests out.

Inputs: ``--products`` is a folder of product photos (RGBA, or on white), or an AdWorld
world folder / manifest (its ``product_path``, ``prompt``, ``caption``, ``product_height_cm``
and ``fill`` columns are used). Prompts come from ``--prompt``, ``--prompts FILE`` (one per
line, in product order, cycled) or the manifest.

Outputs in ``--out``:

- ``images/<product>.png``: the accepted image per product, or the best one when the budget
  ran out (``best_effort`` in the manifest);
- ``attempts/<product>_a<k>.png`` and ``attempts.parquet``: every attempt with its verdict;
- ``manifest.parquet``: the returned images, with ``path``, ``product_path``, ``caption``,
  ``product_height_cm`` and ``fill``, so ``rewardkit world label`` and ``rewardkit inspect``
  accept it (``attempts.parquet`` too);
- ``products/<product>.png``: the product photos as given (RGBA), which both manifests point to;
- ``stats.json``: available rate after k attempts, attempts per accepted image, time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rewardkit.data.keys import prompt_key
from rewardkit.generation.pipeline import SamplerConfig
from rewardkit.generation.product import prepare_product
from rewardkit.generation.recurrent import (
    ProductJob,
    RecurrentResult,
)
from rewardkit.io import (
    IMAGE_SUFFIXES,
    list_images,
    write_json_atomic,
    write_parquet_atomic,
    write_png_atomic,
)
from rewardkit.world.placement import DEFAULT_FILL

__all__ = ["load_jobs", "sampler_for", "write_result"]

_CM = re.compile(r"(\d+(?:\.\d+)?)\s*cm\b")


def _height(caption: str) -> float:
    m = _CM.search(caption or "")
    return float(m.group(1)) if m else float("nan")


def _load_photo(path: Path):
    """The product photo as RGBA, by the one product-photo loader (any format the reader
    takes; cut out from a white background when it has no alpha; decoded reduced to a
    shorter side of 1024-2047 px when larger, as the oracle and product keys read it)."""
    from rewardkit.world.export import load_product_photo

    return load_product_photo(path)


def load_jobs(
    products: str | Path,
    size: int,
    prompt: str | None = None,
    prompts_file: str | Path | None = None,
    caption: str | None = None,
    fill: float | None = None,
    limit: int | None = None,
) -> tuple[list[ProductJob], list[dict]]:
    """Jobs from a product folder or a manifest; bad photos are skipped and reported."""
    src = Path(products)
    if src.is_dir() and (src / "manifest.parquet").is_file():
        src = src / "manifest.parquet"
    rows: list[dict] = []
    unusable: list[dict] = []  # a folder's entries that are not product photos, with why
    if src.is_file():
        table = pq.read_table(src)
        if "product_path" not in table.column_names:
            raise ValueError(f"{src}: a product manifest needs a product_path column")
        for r in table.to_pylist():
            p = Path(r["product_path"])
            rows.append(
                {
                    "path": p if p.is_absolute() else src.parent / p,
                    "prompt": r.get("prompt"),
                    "caption": r.get("caption") or "",
                    "height": r.get("product_height_cm"),
                    "fill": r.get("fill"),
                    "id": Path(r["product_path"]).stem,
                }
            )
    elif src.is_dir():
        files, others = list_images(src, recursive=False)
        unusable = [{"row": None, "path": str(p), "reason": why} for p, why in others]
        if not files:
            raise ValueError(
                f"{src}: no product photos ({', '.join(IMAGE_SUFFIXES)}; "
                f"{len(others)} other entries skipped)"
            )
        rows = [{"path": f, "prompt": None, "caption": "", "height": None, "fill": None,
                 "id": f.stem} for f in files]  # fmt: skip
    else:
        raise FileNotFoundError(f"{src}: no such product folder or manifest")
    if limit is not None:
        rows = rows[:limit]
    file_prompts: list[str] | None = None
    if prompts_file is not None:
        file_prompts = [ln.strip() for ln in Path(prompts_file).read_text().splitlines()]
        file_prompts = [p for p in file_prompts if p]
        if not file_prompts:
            raise ValueError(f"{prompts_file}: no prompts (one per line)")
    jobs, skipped = [], unusable
    used: set[str] = set()
    for i, r in enumerate(rows):
        text = prompt or (file_prompts[i % len(file_prompts)] if file_prompts else r["prompt"])
        if not text:
            raise ValueError(
                f"{src}: product {r['id']} has no prompt; give --prompt or --prompts FILE"
            )
        cap = caption or r["caption"]
        f = float(fill or r["fill"] or DEFAULT_FILL)
        try:
            photo = _load_photo(r["path"])
            prepared = prepare_product(photo, size, f)
        except (OSError, ValueError) as err:
            skipped.append({"row": i, "path": str(r["path"]), "reason": str(err)})
            continue
        height = float(r["height"]) if r["height"] is not None else _height(cap)
        job = ProductJob(r["id"], photo, prepared, text, cap, height, f)
        job.product_id = _unique_id(r["id"], job.product_key, i, used)
        jobs.append(job)
    if not jobs:
        raise ValueError(f"{src}: no usable product photos ({len(skipped)} skipped)")
    return jobs, skipped


def _unique_id(stem: str, key: str, row: int, used: set[str]) -> str:
    """The file stem for a product's outputs: its photo's stem, made unique within the run
    (two folders may both hold ``000000.png``) with its content key, then its row."""
    for candidate in (stem, f"{stem}-{key[:10]}", f"{stem}-{key[:10]}-r{row}"):
        if candidate not in used:
            used.add(candidate)
            return candidate
    raise AssertionError("unreachable: the row index makes the id unique")


def write_result(out: Path, jobs: list[ProductJob], result: RecurrentResult, judged: bool) -> dict:
    """Images, both manifests and stats (see module docstring); returns the stats."""
    for j in jobs:
        write_png_atomic(out / "products" / f"{j.product_id}.png", j.photo)
    rows = []
    for a in result.attempts:
        j = jobs[a.product]
        rel = f"attempts/{j.product_id}_a{a.attempt}.png"
        write_png_atomic(out / rel, a.image)
        rows.append(_row(j, a, rel, judged))
    write_parquet_atomic(out / "attempts.parquet", pa.Table.from_pylist(rows))
    final = []
    for a in result.final:
        j = jobs[a.product]
        rel = f"images/{j.product_id}.png"
        write_png_atomic(out / rel, a.image)
        r = _row(j, a, rel, judged)
        r["best_effort"] = judged and not a.accepted
        r["attempts_used"] = max(b.attempt for b in result.attempts if b.product == a.product)
        final.append(r)
    write_parquet_atomic(out / "manifest.parquet", pa.Table.from_pylist(final))
    stats = result.stats() if judged else {
        "products": len(jobs), "images_generated": result.images_generated,
        "seconds": round(result.seconds, 2),
    }  # fmt: skip
    write_json_atomic(out / "stats.json", stats)
    return stats


def _row(j: ProductJob, a, rel: str, judged: bool) -> dict:
    return {
        "image_id": Path(rel).stem,
        "product_id": j.product_id,
        "product_key": j.product_key,
        "prompt_key": prompt_key(j.prompt),
        "path": rel,
        "product_path": f"products/{j.product_id}.png",
        "prompt": j.prompt,
        "caption": j.caption,
        "product_height_cm": j.height_cm,
        "fill": j.fill,
        "attempt": a.attempt,
        "seed": a.seed,
        "verdict": a.label if judged else None,
        "score": a.score if judged else None,
        "accepted": a.accepted if judged else None,
    }


def sampler_for(
    generator: str | Path, steps: int | None = None, guidance: float | None = None
) -> SamplerConfig:
    """The sampler a generator folder recommends, else the reference pipeline's; flags
    override. The recommendation is the ``"sampler"`` of its ``rewardkit_generator.json``
    (``train generator`` writes one; ``finetune`` copies its base's), else its ``"base"``'s,
    recursively: a fine-tuned model samples as its base, whatever steps the fine-tune ran."""
    base = _recommended_sampler(Path(generator), ())
    return SamplerConfig(
        steps=steps or base.steps,
        guidance_scale=base.guidance_scale if guidance is None else guidance,
        controlnet_scale=base.controlnet_scale,
        blend=base.blend,
        negative_prompt=base.negative_prompt,
    )


def _recommended_sampler(folder: Path, seen: tuple[Path, ...]) -> SamplerConfig:
    card = folder / "rewardkit_generator.json"
    info = json.loads(card.read_text()) if card.is_file() else {}
    # Fine-tune cards written before "finetune_sampler" existed hold the fine-tune's own
    # sampler under "sampler": their base's recommendation is the one to use.
    legacy = "finetune" in info and "finetune_sampler" not in info
    if "sampler" in info and not (legacy and info.get("base")):
        return SamplerConfig(**info["sampler"])
    base = info.get("base")
    if base and folder.resolve() not in seen:
        return _recommended_sampler(folder / base, (*seen, folder.resolve()))
    return SamplerConfig()
