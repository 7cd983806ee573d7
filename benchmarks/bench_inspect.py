"""Inspection throughput: images per second through the whole inspector (depth and saliency
extractors, caption encoder, RFNet), batched, on AdWorld renders. Prints JSON.

    python benchmarks/bench_inspect.py [--n 512] [--batch-size 64] [--model DIR] [--paper]

``--paper`` times the paper-size RFNet (ResNet-50, width 384, 8 heads, 3 fusion layers,
384 px) with random weights instead of the shipped small model (a GPU run belongs there).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from rewardkit.commands.inspect import inspect_images, read_inspection_input
from rewardkit.models.defaults import default_model_path
from rewardkit.models.inspector import Inspector
from rewardkit.models.modalities import load_modality
from rewardkit.models.rfnet import RFNet, RFNetConfig
from rewardkit.world.export import render_world


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--paper", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        render_world(root / "w", a.n, seed=7, size=64, progress=False)
        rows = read_inspection_input(root / "w" / "manifest.parquet")
        if a.paper:
            rfnet = RFNet(RFNetConfig.paper())
            inspector = Inspector(rfnet, load_modality("depth"), load_modality("saliency"),
                                  load_modality("caption"))  # fmt: skip
        else:
            inspector = Inspector.from_pretrained(a.model or default_model_path("rfnet"))
        inspector = inspector.to(a.device).eval()
        inspect_images(inspector, rows.slice(0, a.batch_size), root / "warm.parquet",
                       a.batch_size, progress=False)  # fmt: skip
        start = time.perf_counter()
        summary = inspect_images(inspector, rows, root / "v.parquet", a.batch_size, progress=False)
        seconds = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "inspect",
        "model": "paper-size RFNet (random weights)" if a.paper else "shipped small RFNet",
        "device": a.device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "images": summary.inspected,
        "batch_size": a.batch_size,
        "seconds": round(seconds, 2),
        "images_per_second": round(summary.inspected / seconds, 1),
        "includes": ["image decode", "depth", "saliency", "caption", "rfnet"],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
