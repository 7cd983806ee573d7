"""Renders per second at 64 and 128 px (render only, and render + oracle). Prints JSON."""

from __future__ import annotations

import argparse
import json
import platform
import time

from rewardkit.world.oracle import label
from rewardkit.world.sampler import class_for_index, parse_balance, sample_item


def bench(size: int, n: int, seed: int = 0) -> dict:
    weights = parse_balance(None)
    t = time.perf_counter()
    items = [sample_item(seed, i, size, class_for_index(seed, i, weights)) for i in range(n)]
    render_s = time.perf_counter() - t
    t = time.perf_counter()
    for it in items:
        label(it.cutout, it.render.image, it.product.height_cm)
    oracle_s = time.perf_counter() - t
    return {
        "size": size,
        "n": n,
        "renders_per_second": n / render_s,
        "oracle_images_per_second": n / oracle_s,
        "render_plus_oracle_per_second": n / (render_s + oracle_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()
    results = [bench(64, a.n), bench(128, a.n)]
    print(
        json.dumps(
            {
                "benchmark": "render",
                "machine": platform.machine(),
                "single_process": True,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
