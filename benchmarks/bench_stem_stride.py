"""Benchmark the early-fusion inspector's strided stem on CPU:
``python benchmarks/bench_stem_stride.py [--batch 16 --threads 1 --repeats 3]``.

One training step (forward, cross-entropy, backward, AdamW) of ``RFNetConfig.aligned()`` at
64 and 128 px with ``stem_stride`` 1 and 2, random weights and inputs, measured side by side
in one process. Prints one JSON object: seconds per step (the fastest of ``--repeats`` after a
warm-up) per (resolution, stride), and each against the 64-px preset (stride 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

from rewardkit.models.rfnet import RFNet, RFNetConfig


def step_seconds(resolution: int, stride: int, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    config = dataclasses.replace(RFNetConfig.aligned(), resolution=resolution, stem_stride=stride)
    model = RFNet(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    r = resolution
    x = {"product": torch.rand(batch, 3, r, r), "generated": torch.rand(batch, 3, r, r),
         "placed": torch.rand(batch, 4, r, r), "height_cm": torch.rand(batch) * 50 + 5}  # fmt: skip
    y = torch.randint(len(config.classes), (batch,))
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t = time.perf_counter()
        F.cross_entropy(model(**x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return min(times[1:])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = {
        f"{r}px_stride{s}": round(step_seconds(r, s, a.batch, a.repeats), 4)
        for r in (64, 128)
        for s in (1, 2)
    }
    base = rows["64px_stride1"]
    result = {
        "config": {"batch": a.batch, "threads": a.threads, "repeats": a.repeats},
        "seconds_per_step": rows,
        "vs_64px_preset": {k: round(v / base, 2) for k, v in rows.items()},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
