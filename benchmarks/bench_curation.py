"""Benchmark curation: ``python benchmarks/bench_curation.py [--users N --events N ...]``.

Simulates a community (random appearance features, ``simulate_community``) and writes it to a
temporary folder with ``write_community`` (or reuses ``--logs DIR``), then times ``curate``
(in a fresh process, so the peak RSS is curation's own) with the default config and prints
one JSON object: events, pairs, seconds, peak RSS (MiB), and, for simulated logs, the pairs'
truth accuracy (evaluation only).

``--engines duckdb,spark`` curates the same logs with each engine, side by side in one run
(Spark on ``local[2]``: the driver's normalisation, then the stages on 2 cores), and adds a
projection of events/s for a 16-node cluster from the measured per-core rate: ON PAPER,
linear scaling assumed (an upper bound: shuffles and the driver-side schema pass are not
modelled).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rewardkit.data.curation import CurationConfig, curate, pair_truth_accuracy
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


def _peak_rss_mib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print (and return) its JSON figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--prompts", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logs", default=None, help="curate these logs instead of simulating")
    ap.add_argument("--config", default=None, help="curation YAML (default: the defaults)")
    ap.add_argument("--engines", default="duckdb", help="comma-separated: duckdb,spark")
    ap.add_argument("--engine", default="duckdb", help=argparse.SUPPRESS)  # the child's
    ap.add_argument("--cores-per-node", type=int, default=16, help="for the projection")
    args = ap.parse_args(argv)
    if args.logs is None:  # simulate here, curate in a fresh process: its own peak RSS
        with tempfile.TemporaryDirectory(prefix="bench_curation_") as tmp:
            images, features = synthetic_images(args.images, args.prompts, args.seed)
            cc = CommunityConfig(n_users=args.users, events_target=args.events, seed=args.seed)
            start = time.perf_counter()
            write_community(simulate_community(images, features, cc), Path(tmp) / "logs")
            sim_seconds = round(time.perf_counter() - start, 2)
            runs = {}
            for engine in args.engines.split(","):
                cmd = [sys.executable, __file__, "--logs", str(Path(tmp) / "logs"),
                       "--engine", engine]  # fmt: skip
                cmd += ["--config", args.config] if args.config else []
                child = subprocess.run(cmd, check=True, capture_output=True, text=True)
                runs[engine] = json.loads(child.stdout.strip().splitlines()[-1])
        result: dict = {"simulate_write_seconds": sim_seconds}
        if len(runs) == 1:
            result.update(next(iter(runs.values())))
        else:
            result["engines"] = runs
            if "spark" in runs and "duckdb" in runs:
                d, sp = runs["duckdb"], runs["spark"]
                result["same_pairs"] = d["pairs"] == sp["pairs"]
                result["spark_local2_vs_duckdb_speed"] = round(
                    sp["events_per_second"] / d["events_per_second"], 3
                )
                per_core = sp["events_per_second"] / 2  # local[2]
                nodes, cores = 16, args.cores_per_node
                result["projection_on_paper"] = {
                    "what": f"Spark, {nodes} nodes x {cores} cores, linear in cores from the "
                    "measured local[2] rate (an upper bound; not measured)",
                    "events_per_second": round(per_core * nodes * cores),
                }
        print(json.dumps(result))
        return result
    config = CurationConfig.from_yaml(args.config) if args.config else CurationConfig()
    logs_dir = Path(args.logs)
    with tempfile.TemporaryDirectory(prefix="bench_curation_") as tmp:
        start = time.perf_counter()
        master = "local[2]" if args.engine == "spark" else None
        out = curate(logs_dir, config, Path(tmp) / "pairs.parquet", args.engine, master)
        seconds = time.perf_counter() - start
        pairs = out.card["pairs_after_caps"]
        truth = logs_dir / "truth" / "images.parquet"
        acc = pair_truth_accuracy(out.pairs, pq.read_table(truth)) if truth.is_file() else None
    result = {
        "engine": args.engine,
        "events": out.card["events_read"],
        "users_flagged_bots": out.card["users_flagged_bots"],
        "images": out.card["images"],
        "pairs": pairs,
        "seconds": round(seconds, 2),
        "events_per_second": round(out.card["events_read"] / seconds),
        "peak_rss_mib": _peak_rss_mib(),
    }
    if acc is not None:
        result["pair_truth_accuracy"] = round(acc, 4)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
