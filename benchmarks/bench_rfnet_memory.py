"""Benchmark ``train rfnet``'s memory: ``python benchmarks/bench_rfnet_memory.py [--n N ...]``.

Trains RFNet for ``--max-steps`` steps on an AdWorld manifest twice, each as a fresh child
process: the in-memory path (every input decoded whole into memory, as before the store) and
the disk-backed store (``<out>/data_cache``, rows read on demand). Prints one JSON object:
each run's peak RSS (``os.wait4`` of the child), steps per second (the loop's own timing in
``train_summary.json``, preparation excluded), preparation seconds, and the ratios against the
target (peak RSS < 25% of the in-memory run's at >= 0.9x its steps per second); plus the time
to read one training batch (clean and degraded inputs) from the store and from memory.

A third run trains from the same store with ``--loader-workers`` DataLoader processes reading
the next batches ahead of the step (``loader_workers``; the first two read in the step, as
the loop did before the loader): its steps per second (images/s = steps/s x batch size) and
the peak RSS of its main process and of its largest loader process (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, torch
torch.set_num_threads({threads})
from rewardkit.commands.rfnet import train_rfnet_command
from rewardkit.training.rfnet import RFNetTrainConfig
config = RFNetTrainConfig(max_steps={steps}, batch_size={batch}, device="cpu",
                          loader_workers={workers})
summary = train_rfnet_command({manifest!r}, {out!r}, config, maps={maps!r}, progress=False,
                              in_memory={in_memory})
loader_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{"loader_peak_rss_mb": round(loader_kib / 1024, 1)}}))
"""


def render(n: int, seed: int, size: int, folder: Path) -> Path:
    """Render an AdWorld manifest with the CLI (one core; ~60 renders per second at 64 px)."""
    cmd = [sys.executable, "-m", "rewardkit.cli", "world", "render", "--n", str(n),
           "--seed", str(seed), "--size", str(size), "--out", str(folder)]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return folder / "manifest.parquet"


def run_child(
    manifest: Path, out: Path, in_memory: bool, args: argparse.Namespace, workers: int = 0
) -> dict:
    """Train in a fresh process; its peak RSS from ``wait4`` and the loop's timing."""
    code = CHILD.format(threads=args.threads, steps=args.max_steps, batch=args.batch_size,
                        manifest=str(manifest), out=str(out), maps=args.maps,
                        in_memory=in_memory, workers=workers)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=f, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}); see {log}")
    summary = json.loads((out / "train_summary.json").read_text())
    steps, seconds = int(summary["steps"]), float(summary["seconds"])
    printed = json.loads(log.read_text().strip().splitlines()[-1])
    return {
        "loader_workers": workers,
        # wait4: the child's own peak (its loader processes are the grandchildren below)
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        **(printed if workers else {}),
        "steps": steps,
        "loop_seconds": round(seconds, 2),
        "steps_per_s": round(steps / seconds, 3),
        "images_per_s": round(steps * args.batch_size / seconds, 1),
        "prepare_seconds": round(wall - seconds, 1),
        "wall_seconds": round(wall, 1),
    }


def batch_read_ms(cache: Path, batch: int, repeats: int = 200) -> dict:
    """Milliseconds to read one training batch's clean and degraded inputs (random rows)."""
    import torch

    from rewardkit.models.rfnet import MODALITIES
    from rewardkit.training.inspection_store import InspectionStore

    store = InspectionStore(cache)
    degraded = store.degraded()
    train = store.rows("train")
    g = torch.Generator().manual_seed(0)
    picks = [train[torch.randperm(len(train), generator=g)[:batch]] for _ in range(repeats)]
    changed = ("generated", "depth", "saliency")
    start = time.perf_counter()
    for rows in picks:
        store.batch(rows, MODALITIES)
        if degraded is not None:
            degraded.batch(rows, changed)
    disk = (time.perf_counter() - start) / repeats * 1e3
    # The same batches from memory (the whole store loaded: only for this comparison).
    import numpy as np

    arrays = {f.stem: torch.from_numpy(np.load(f, allow_pickle=False)) for f in cache.glob("*.npy")}
    start = time.perf_counter()
    for rows in picks:
        for name in ("product", "generated", "depth", "saliency"):
            arrays[name][rows].float().div_(255.0)
        for name in changed:
            arrays[f"degraded_{name}"][rows].float().div_(255.0)
        index = arrays["caption_index"][rows]
        arrays["caption_tokens"][index], arrays["caption_mask"][index].long()
    memory = (time.perf_counter() - start) / repeats * 1e3
    return {"rows": batch, "disk_ms": round(disk, 3), "memory_ms": round(memory, 3)}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print (and return) its JSON figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=None, help="reuse this AdWorld manifest.parquet")
    ap.add_argument("--n", type=int, default=20_000, help="renders when no --manifest")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--maps", default="predicted", help="predicted (extractors run) or truth")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per child")
    ap.add_argument("--loader-workers", type=int, default=2, help="the third run's loaders")
    ap.add_argument("--work", default=None, help="folder for renders and runs (default: temp)")
    args = ap.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_rfnet_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = Path(args.manifest) if args.manifest else None
    render_s = None
    if manifest is None:
        start = time.perf_counter()
        manifest = render(args.n, args.seed, args.size, work / "world")
        render_s = round(time.perf_counter() - start, 1)
    import pyarrow.parquet as pq

    rows = pq.read_metadata(manifest).num_rows
    memory = run_child(manifest, work / "in_memory", True, args)
    disk = run_child(manifest, work / "disk", False, args)
    cache = work / "disk" / "data_cache"
    cache_mb = sum(f.stat().st_size for f in cache.iterdir()) / 2**20
    # The same store (hard links: nothing prepared again), read ahead by loader processes.
    ahead_out = work / "disk_loader"
    shutil.rmtree(ahead_out, ignore_errors=True)
    shutil.copytree(cache, ahead_out / "data_cache", copy_function=os.link)
    ahead = run_child(manifest, ahead_out, False, args, workers=args.loader_workers)
    result = {
        "manifest": str(manifest),
        "rows": rows,
        "render_seconds": render_s,
        "maps": args.maps,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "in_memory": memory,
        "disk": {**disk, "cache_mb": round(cache_mb, 1)},
        "rss_ratio": round(disk["peak_rss_mb"] / memory["peak_rss_mb"], 3),
        "speed_ratio": round(disk["steps_per_s"] / memory["steps_per_s"], 3),
        "batch_read": batch_read_ms(cache, args.batch_size),
        "loader": ahead,
        "loader_speed_ratio": round(ahead["steps_per_s"] / disk["steps_per_s"], 3),
    }
    result["meets_target"] = result["rss_ratio"] < 0.25 and result["speed_ratio"] >= 0.9
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
