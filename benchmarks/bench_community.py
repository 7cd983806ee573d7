"""Benchmark the community simulator: ``python benchmarks/bench_community.py [--users N ...]``.

Builds a synthetic image pool (random appearance features, ``--prompts`` prompts), simulates
the community and prints one JSON object: sizes, seconds, events per second and peak RSS.
With ``--write DIR`` it also times ``write_community``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import pyarrow as pa

from rewardkit.world.appearance import FEATURE_NAMES
from rewardkit.world.community import CommunityConfig, simulate_community
from rewardkit.world.community_io import write_community


def synthetic_images(n_images: int, n_prompts: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    """An images table (image_id, prompt_id, prompt, path) and (N, F) features in (-1, 1)."""
    rng = np.random.default_rng(seed)
    prompt_id = rng.integers(0, n_prompts, n_images)
    images = pa.table({
        "image_id": np.arange(n_images, dtype=np.int64),
        "prompt_id": prompt_id,
        "prompt": pa.array([f"prompt {p}" for p in prompt_id]),
        "path": pa.array([f"images/{i:07d}.png" for i in range(n_images)]),
    })  # fmt: skip
    features = np.tanh(rng.normal(0.0, 0.6, (n_images, len(FEATURE_NAMES)))).astype(np.float32)
    return images, features


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print (and return) its JSON figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--prompts", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", default=None, help="also write the logs to this folder")
    args = ap.parse_args(argv)
    images, features = synthetic_images(args.images, args.prompts, args.seed)
    config = CommunityConfig(n_users=args.users, events_target=args.events, seed=args.seed)
    start = time.perf_counter()
    logs = simulate_community(images, features, config)
    seconds = time.perf_counter() - start
    result = {
        "users": logs.users.num_rows,
        "events": logs.events.num_rows,
        "images": logs.images.num_rows,
        "seconds": round(seconds, 2),
        "events_per_second": round(logs.events.num_rows / seconds),
    }
    if args.write:
        start = time.perf_counter()
        write_community(logs, args.write)
        result["write_seconds"] = round(time.perf_counter() - start, 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    result["peak_rss_mib"] = round(peak / (2**20 if sys.platform == "darwin" else 2**10))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
