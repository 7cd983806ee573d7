"""Scoring images/s, the local path vs Ray with 2 actors, side by side. Prints JSON.

``python benchmarks/bench_ray_scoring.py [--n 400 --seed 31337 --size 64 --images DIR]``

The images are AdWorld renders (``rewardkit world render --n N --seed S --size Z``; or the
folder ``--images DIR``), scored with one prompt by the embedded default Social Reward
scorer, once each way on the same folder:

* ``local``: :func:`rewardkit.scoring.score_images` as ``rewardkit score`` runs it (the model
  loaded once beforehand, ``--workers`` decoding processes), end to end;
* ``ray``: :func:`rewardkit.ray_engine.score_images_ray` on a local Ray with ``--cpus`` CPUs
  (started before the clock: a cluster is already up), end to end: decoding tasks, the
  actors' start and model loading, scoring, shards and merge. ``actor_seconds`` is the time
  the actors spent scoring and ``decode_seconds`` the time the decoding tasks spent, so
  ``per_actor_images_per_second`` (images / actor-seconds) is the steady rate of one actor,
  startup excluded, and ``decode_images_per_second`` that of one decoding task.

Both outputs are checked to hold the same scores (within 1e-5).

``projection_on_paper``: images/s of a 16-node cluster of ``--cores-per-node`` CPU cores
from the measured rates: an image costs one actor (actor-seconds / image) plus its decoding
(decode-seconds / image) in core-seconds, and every core of every node does that work,
linear. ON PAPER: not measured; an upper bound (the driver's merge, the object store and
the network are not modelled; the seconds were wall time on a shared machine), for CPU
actors like these (a GPU actor is another rate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

PROMPT = "a product on a table in a bright room"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="renders to score")
    ap.add_argument("--seed", type=int, default=31337)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", default=None, help="score this folder instead of rendering")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="local decoding processes")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--nodes", type=int, default=16, help="for the projection")
    ap.add_argument("--cores-per-node", type=int, default=16, help="for the projection")
    ap.add_argument("--note", default=None, help="a note on the machine's state, kept in the JSON")
    args = ap.parse_args()

    import ray
    import torch

    from rewardkit.models.defaults import default_model_path
    from rewardkit.models.scorers import create_scorer
    from rewardkit.ray_engine import score_images_ray
    from rewardkit.scoring import score_images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.images is None:
            folder = tmp / "world"
            subprocess.run(
                [sys.executable, "-m", "rewardkit.cli", "world", "render", "--n", str(args.n),
                 "--seed", str(args.seed), "--size", str(args.size), "--out", str(folder)],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            images = folder / "images"
        else:
            images = Path(args.images)
        model = default_model_path("social-reward")
        load_before = load_average()

        start = time.perf_counter()
        scorer = create_scorer("social-reward", model, device="cpu")
        local_load = time.perf_counter() - start
        start = time.perf_counter()
        local = score_images(scorer, images, tmp / "local.parquet", args.batch_size,
                             prompt=PROMPT, progress=False, num_workers=args.workers)  # fmt: skip
        local_s = time.perf_counter() - start
        del scorer

        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_init = time.perf_counter() - start
        try:
            start = time.perf_counter()
            summary = score_images_ray(
                "social-reward", model, images, tmp / "ray.parquet", args.batch_size,
                prompt=PROMPT, actors=args.actors, progress=False,
            )  # fmt: skip
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()

        a, b = pq.read_table(tmp / "local.parquet"), pq.read_table(tmp / "ray.parquet")
        same_rows = a["path"].to_pylist() == b["path"].to_pylist()
        gap = float(np.abs(a["score"].to_numpy() - b["score"].to_numpy()).max())
        n = local.scored
        per_actor = summary.scored / summary.run.actor_seconds
        per_decoder = summary.scored / summary.run.decode_seconds
        core_seconds = (summary.run.actor_seconds + summary.run.decode_seconds) / summary.scored
        result = {
            "images": n,
            "image_size": args.size if args.images is None else None,
            "scorer": "social-reward (embedded default)",
            "batch_size": args.batch_size,
            "local": {
                "model_load_seconds": round(local_load, 2),
                "seconds": round(local_s, 2),
                "images_per_second": round(n / local_s, 1),
                "decode_workers": args.workers,
            },
            "ray": {
                "actors": args.actors,
                "cpus": args.cpus,
                "init_seconds": round(ray_init, 2),
                "seconds": round(ray_s, 2),
                "images_per_second": round(summary.scored / ray_s, 1),
                "actor_seconds": round(summary.run.actor_seconds, 2),
                "per_actor_images_per_second": round(per_actor, 1),
                "decode_seconds": round(summary.run.decode_seconds, 2),
                "decode_images_per_second": round(per_decoder, 1),
            },
            "ray_vs_local_speed": round((summary.scored / ray_s) / (n / local_s), 3),
            "same_rows": same_rows,
            "max_score_gap": gap,
            "projection_on_paper": {
                "what": f"Ray, {args.nodes} nodes x {args.cores_per_node} CPU cores, each "
                "image costing the measured per-actor scoring plus decoding core-seconds "
                f"({core_seconds * 1000:.1f} ms), linear in cores; startup excluded; an upper "
                "bound, not measured",
                "images_per_second": round(args.nodes * args.cores_per_node / core_seconds),
            },
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "ray": ray.__version__,
                "load_average_before": load_before,
                "load_average_after": load_average(),
            },
        }
        if args.note:
            result["note"] = args.note
        if not same_rows or gap > 1e-5:
            raise SystemExit(f"Ray and local scores differ: {json.dumps(result)}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
