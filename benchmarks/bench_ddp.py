"""Throughput of `rewardkit train reward` on the CPU in one process and in two (DDP over
gloo), the same global batch, OMP_NUM_THREADS=1 per process, measured side by side in one run.

Prints JSON: steps per second and rows per second of each, the speed-up, and the largest weight
difference between the two runs' models (they train on the same rows).

    python benchmarks/bench_ddp.py [--steps 30] [--batch-size 32] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BIN = Path(sys.executable).parent


def _pairs(folder: Path, size: int, n_images: int = 64, n_pairs: int = 512) -> Path:
    from rewardkit.io import write_png_atomic

    rng = np.random.default_rng(0)
    brightness = np.linspace(0.1, 0.9, n_images)
    for i, b in enumerate(brightness):
        img = np.clip(b * 255 + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        write_png_atomic(folder / "images" / f"{i:03d}.png", img)
    rows = []
    for _ in range(n_pairs):
        i, j = rng.choice(n_images, 2, replace=False)
        hi, lo = (i, j) if brightness[i] > brightness[j] else (j, i)
        rows.append({"prompt": "a photo", "pos_path": f"images/{hi:03d}.png",
                     "neg_path": f"images/{lo:03d}.png", "split": "train"})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), folder / "pairs.parquet")
    return folder / "pairs.parquet"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(processes: int, args: list[str], out: Path) -> dict:
    cmd = [str(BIN / "rewardkit"), *args, "--out", str(out)]
    if processes > 1:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_port()), *cmd]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    wall = time.perf_counter() - start
    summary = json.loads((out / "train_summary.json").read_text())
    return {"processes": processes, "loop_seconds": round(summary["seconds"], 2),
            "wall_seconds": round(wall, 1), "steps": summary["steps"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    a = p.parse_args()
    from safetensors.torch import load_file

    from rewardkit.models.social_reward import build_default_dual_encoder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_default_dual_encoder(root / "model", image_size=a.image_size)
        pairs = _pairs(root / "data", a.image_size)
        args = ["train", "reward", "--pairs", str(pairs), "--model", str(model),
                "--batch-size", str(a.batch_size), "--max-steps", str(a.steps),
                "--preset", "paper", "--seed", "0"]  # fmt: skip
        runs = [_run(n, args, root / f"out{n}") for n in (1, 2)]
        gaps: dict[str, float] = {}
        for f in sorted((root / "out1" / "model").glob("*.safetensors")):
            w1, w2 = load_file(f), load_file(root / "out2" / "model" / f.name)
            gaps.update({k: float((w1[k] - w2[k]).abs().max()) for k in w1})
        # Attention key biases get a zero gradient in exact arithmetic (softmax ignores a
        # shift shared by every key); AdamW turns the float noise of their sums into updates
        # of up to lr per step, so they are reported apart (tests/training/test_ddp.py).
        rest = {k: v for k, v in gaps.items() if not k.endswith("k_proj.bias")}
    for r in runs:
        r["steps_per_second"] = round(r["steps"] / r["loop_seconds"], 2)
        r["rows_per_second"] = round(r["steps"] * a.batch_size / r["loop_seconds"], 1)
    result = {
        "benchmark": "train reward, CPU, 1 vs 2 processes (DDP, gloo), OMP_NUM_THREADS=1 each",
        "global_batch": a.batch_size,
        "image_size": a.image_size,
        "cpu_cores": os.cpu_count(),
        "runs": runs,
        "speedup_2_vs_1": round(runs[0]["loop_seconds"] / runs[1]["loop_seconds"], 2),
        "max_weight_difference": max(gaps.values()),
        "max_weight_difference_at": max(gaps, key=gaps.get),
        "max_weight_difference_without_key_biases": max(rest.values()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
