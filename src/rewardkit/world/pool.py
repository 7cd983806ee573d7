"""The image pool a simulated community posts and reacts to.

Each prompt is one product; its images are scenes of that product that differ in style
(wall and surface colours, light, decor, props) and sometimes carry a defect, as the outputs
of a text-to-image model for one prompt do. Images are written as PNG under ``images/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from rewardkit.io import write_png_atomic
from rewardkit.world.placement import DEFAULT_FILL, place_product
from rewardkit.world.products import render_cutout, sample_product
from rewardkit.world.sampler import CUTOUT_SIZE
from rewardkit.world.scene import render_scene, sample_scene_spec

# Community images: mostly clean scenes, some with each scene defect (no Unsuitable: the
# product photo is shared by all images of a prompt).
POOL_CLASSES = {
    "Available": 0.6,
    "Space Mismatch": 0.1,
    "Size Mismatch": 0.1,
    "Indistinctiveness": 0.1,
    "Shape Hallucination": 0.1,
}


def _feasible_product(rng: np.random.Generator, product_id: str, size: int):
    """A product for which an Available scene can be drawn (its colours leave room for a
    contrasting background); resampled otherwise."""
    for attempt in range(50):
        product = sample_product(rng, f"{product_id}-{attempt}")
        cutout = render_cutout(product, CUTOUT_SIZE)
        layer, placement = place_product(cutout, size, DEFAULT_FILL)
        probe = np.random.default_rng(rng.integers(2**32))
        if sample_scene_spec(probe, product, placement, "Available", layer, size) is not None:
            return product, cutout, layer, placement
    raise RuntimeError(f"{product_id}: no feasible product in 50 tries")


def render_pool(
    out_dir: str | Path,
    n_prompts: int,
    images_per_prompt: int,
    seed: int,
    size: int = 64,
    progress: bool = True,
) -> tuple[pa.Table, np.ndarray]:
    """Render the pool. Returns (images table, pixels (N, size, size, 3) uint8).

    Table columns: image_id (int64), prompt_id (int64), prompt, path (relative to out_dir),
    label (the render truth class).
    """
    if n_prompts <= 0 or images_per_prompt < 2:
        raise ValueError("need n_prompts >= 1 and images_per_prompt >= 2")
    out = Path(out_dir)
    names = list(POOL_CLASSES)
    probs = np.array([POOL_CLASSES[c] for c in names])
    rows, pixels = [], []
    bar = tqdm(total=n_prompts * images_per_prompt, desc="pool", disable=not progress, unit="img")
    for j in range(n_prompts):
        rng_p = np.random.default_rng([seed, j, 7])
        product, cutout, layer, placement = _feasible_product(rng_p, f"c{seed}-{j}", size)
        prompt = f"an ad photo of a {product.caption}"
        for k in range(images_per_prompt):
            rng = np.random.default_rng([seed, j, k, 8])
            for _ in range(100):
                cls = names[int(rng.choice(len(names), p=probs))]
                spec = sample_scene_spec(rng, product, placement, cls, layer, size)
                if spec is not None:
                    break
            else:
                raise RuntimeError(f"prompt {j}: no feasible scene for {product.caption!r}")
            render = render_scene(product, cutout, spec)
            image_id = j * images_per_prompt + k
            path = f"images/{image_id:07d}.png"
            write_png_atomic(out / path, render.image)
            rows.append(
                {"image_id": image_id, "prompt_id": j, "prompt": prompt, "path": path, "label": cls}
            )
            pixels.append(render.image)
            bar.update()
    bar.close()
    schema = pa.schema(
        [
            ("image_id", pa.int64()),
            ("prompt_id", pa.int64()),
            ("prompt", pa.string()),
            ("path", pa.string()),
            ("label", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema), np.stack(pixels)
