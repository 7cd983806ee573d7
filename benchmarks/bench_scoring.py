"""Batched scoring vs a per-image loop on the same model and images. Prints JSON.

The model is a dual encoder built like the embedded default (small CLIP vision tower +
all-MiniLM-L6-v2 text tower, 64 px input), loaded once. The images are N AdWorld renders,
scored two ways:

* ``folder``: the image folder with one prompt for all (``rewardkit score --input DIR``);
* ``manifest``: the render manifest, a different prompt per image.

The batched path is :func:`rewardkit.scoring.score_images` (timed end to end: listing,
decoding, scoring, writing); the loop reads one image, scores it alone, and moves on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from rewardkit.io import read_image_rgb
from rewardkit.models.scorers import Scorer, create_scorer
from rewardkit.models.social_reward import build_default_dual_encoder
from rewardkit.scoring import list_images, score_images
from rewardkit.world.export import render_world

FOLDER_PROMPT = "a product on a table in a bright room"


def per_image_loop(scorer: Scorer, files: list[Path], prompts: list[str]) -> list[float]:
    """Score images one at a time: read, convert, score alone."""
    scores = []
    for file, prompt in zip(files, prompts, strict=True):
        image = read_image_rgb(file)  # (H, W, 3) uint8
        x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0  # (1,3,H,W)
        scores.append(float(scorer.score_batch(x, [prompt], batch_size=1)[0]))
    return scores


def compare(
    scorer: Scorer, source: Path, files: list[Path], prompts: list[str], batch_size: int,
    out: Path, prompt: str = "", repeats: int = 3,
) -> dict:  # fmt: skip
    # Best of `repeats` for both paths: this machine may be shared, and a co-tenant's burst
    # should not decide the figure.
    loop_s = batched_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        loop_scores = per_image_loop(scorer, files, prompts)
        loop_s = min(loop_s, time.perf_counter() - start)
        summary = score_images(scorer, source, out, batch_size, prompt=prompt, progress=False)
        batched_s = min(batched_s, summary.seconds)
    batched = pq.read_table(out).column("score").to_pylist()
    n = len(files)
    max_diff = max(abs(a - b) for a, b in zip(batched, loop_scores, strict=True))
    return {
        "images": n,
        "unique_prompts": len(set(prompts)),
        "batched_images_per_second": round(n / batched_s, 1),
        "per_image_images_per_second": round(n / loop_s, 1),
        "speedup": round(loop_s / batched_s, 2),
        "batched_seconds": round(batched_s, 3),
        "per_image_seconds": round(loop_s, 3),
        "max_abs_score_difference": max_diff,
        "skipped": len(summary.skipped),
    }


def bench(n: int, size: int, batch_size: int, repeats: int = 3, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_default_dual_encoder(root / "model", image_size=64, seed=seed)
        render_world(root / "world", n, seed, size, progress=False)
        scorer = create_scorer("social-reward", model)  # one model load for everything
        with torch.inference_mode():  # warm-up (allocator, kernels), not timed
            for b in (batch_size, 1, batch_size, 1):
                scorer.score_batch(torch.rand(b, 3, size, size), [FOLDER_PROMPT] * b)

        folder = root / "world" / "images"
        files = list_images(folder)
        by_folder = compare(scorer, folder, files, [FOLDER_PROMPT] * len(files), batch_size,
                            root / "folder.parquet", FOLDER_PROMPT, repeats)  # fmt: skip
        manifest = root / "world" / "manifest.parquet"
        rows = pq.read_table(manifest, columns=["path", "prompt"]).to_pylist()
        by_manifest = compare(scorer, manifest, [manifest.parent / r["path"] for r in rows],
                              [r["prompt"] for r in rows], batch_size,
                              root / "manifest.parquet", "", repeats)  # fmt: skip
    return {"folder": by_folder, "manifest": by_manifest}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timings kept: the best of these")
    a = ap.parse_args()
    load_before = os.getloadavg()[0]
    results = bench(a.n, a.size, a.batch_size, a.repeats)
    out = {
        "benchmark": "scoring",
        "model": "default dual encoder: CLIP vision 4x192 @ 64 px + all-MiniLM-L6-v2",
        "image_size": a.size,
        "batch_size": a.batch_size,
        "repeats": a.repeats,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": {"before": round(load_before, 2), "after": os.getloadavg()[0]},
        "results": results,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
