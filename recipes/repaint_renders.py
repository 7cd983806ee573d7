"""Repaint AdWorld renders with a generator (SDEdit): images that look generated, drawn from
a world whose class balance you choose, for the inspector's pre-training.

Each render is encoded by the generator's VAE, noised to ``--strength`` of the schedule and
denoised by the generator with the render's own prompt, product and placement (eq. 2 blend
and paste-back as in ``generate``). The repaint may change what the oracle sees (a prop's
size, the contact), so label the output afterwards, as any generated set:

    rewardkit world render --out W --n 4000 --seed S --size 64 --spread 1 --balance "$BAL"
    python recipes/repaint_renders.py --renders W --out G --strength 0.5 --seed 7
    rewardkit world label --manifest G/manifest.parquet --out L.parquet \
        --training-manifest T.parquet

Writes ``G/images/<id>.png``, ``G/products/<id>.png`` and ``G/manifest.parquet`` (the
columns ``generate`` writes, plus ``source_path`` and ``strength``); images are written
atomically, so a rerun repaints only the ids whose image is missing (the manifest is last).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rewardkit.data.keys import prompt_key
from rewardkit.generation.pipeline import AdGenerator, generate_images
from rewardkit.generation.run import load_jobs, sampler_for
from rewardkit.io import write_json_atomic, write_parquet_atomic, write_png_atomic
from rewardkit.models.defaults import default_model_path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--renders", required=True, help="a `world render` folder or its manifest")
    ap.add_argument("--out", required=True)
    ap.add_argument("--generator", default=None, help="default: the embedded generator")
    ap.add_argument("--strength", type=float, default=0.5, help="share of the schedule, (0, 1]")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args(argv)
    if not 0.0 < a.strength <= 1.0:
        ap.error(f"--strength: must be in (0, 1]; got {a.strength}")
    src = Path(a.renders)
    manifest = src / "manifest.parquet" if src.is_dir() else src
    if not manifest.is_file():
        ap.error(f"--renders: {manifest} does not exist")
    table = pq.read_table(manifest)
    if "path" not in table.column_names:
        ap.error(f"--renders: {manifest} has no path column (a `world render` manifest)")
    renders = {
        Path(r["product_path"]).stem: manifest.parent / r["path"]
        for r in table.select(["path", "product_path"]).to_pylist()
    }
    generator = a.generator or str(default_model_path("generator"))
    gen = AdGenerator.from_pretrained(generator, "cpu")
    sampler = sampler_for(generator, a.steps)
    jobs, skipped = load_jobs(manifest, gen.resolution, limit=a.limit)
    out = Path(a.out)
    t0 = time.perf_counter()
    todo = [j for j in jobs if not (out / "images" / f"{j.product_id}.png").is_file()]
    for i in range(0, len(todo), a.batch_size):
        chunk = todo[i : i + a.batch_size]
        init = []
        for j in chunk:
            img = Image.open(renders[j.product_id]).convert("RGB")
            if img.size != (gen.resolution, gen.resolution):
                raise SystemExit(
                    f"{renders[j.product_id]}: {img.size[0]} px; the generator paints at "
                    f"{gen.resolution} px (render the world at that --size)"
                )
            init.append(np.asarray(img))
        seeds = [hash_seed(a.seed, j.product_key) for j in chunk]
        images = generate_images(
            gen, [j.prepared for j in chunk], [j.prompt for j in chunk], seeds, sampler,
            batch_size=a.batch_size, init_images=init, strength=a.strength,
        )  # fmt: skip
        for j, image in zip(chunk, images, strict=True):
            write_png_atomic(out / "images" / f"{j.product_id}.png", image)
    rows = []
    for j in jobs:
        write_png_atomic(out / "products" / f"{j.product_id}.png", j.photo)
        rows.append({
            "image_id": j.product_id, "product_id": j.product_id,
            "product_key": j.product_key, "prompt_key": prompt_key(j.prompt),
            "path": f"images/{j.product_id}.png", "product_path": f"products/{j.product_id}.png",
            "prompt": j.prompt, "caption": j.caption, "product_height_cm": j.height_cm,
            "fill": j.fill, "seed": hash_seed(a.seed, j.product_key),
            "source_path": str(renders[j.product_id].resolve()), "strength": a.strength,
        })  # fmt: skip
    write_parquet_atomic(out / "manifest.parquet", pa.Table.from_pylist(rows))
    stats = {"images": len(jobs), "repainted_now": len(todo), "skipped": skipped,
             "strength": a.strength, "steps": sampler.steps, "generator": generator,
             "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    write_json_atomic(out / "stats.json", stats)
    print(json.dumps(stats))
    return stats


def hash_seed(seed: int, key: str) -> int:
    """A product's noise seed: a pure function of (--seed, product key)."""
    return (int(key[:12], 16) + 1_000_003 * seed) % (2**31 - 1)


if __name__ == "__main__":
    main()
