"""Recurrent Generation throughput: batched refill vs a per-product loop. Prints JSON.

    python benchmarks/bench_recurrent.py [--n 48] [--batch-size 16] [--max-attempts 8]
        [--generator DIR] [--steps 40] [--judge oracle|inspector]

Both runs make the same attempts with the same seeds (a seed is a function of product and
attempt only), so they return the same images; only the batching differs: the refill loop
keeps every batch full with new products and retries, the naive loop generates one product
at a time until it passes. The figure is accepted images per second.
Products: AdWorld renders of the Available class (seed 4242: none of the shipped models
trained or was chosen on them; checked by product keys and printed as ``held_out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from rewardkit.data.keys import check_held_out
from rewardkit.generation.pipeline import AdGenerator
from rewardkit.generation.recurrent import InspectorJudge, OracleJudge, recurrent_generate
from rewardkit.generation.run import load_jobs, sampler_for
from rewardkit.models.defaults import default_model_path
from rewardkit.world.export import render_world


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-attempts", type=int, default=8)
    ap.add_argument("--generator", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--judge", default="oracle", choices=("oracle", "inspector"))
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    folder = a.generator or default_model_path("generator")
    gen = AdGenerator.from_pretrained(folder)
    sampler = sampler_for(folder, a.steps)
    if a.judge == "oracle":
        judge = OracleJudge()
    else:
        from rewardkit.models.inspector import Inspector

        judge = InspectorJudge(Inspector.from_pretrained(default_model_path("rfnet")))
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "w"
        render_world(world, a.n, seed=4242, size=gen.resolution, balance="Available=1",
                     progress=False)  # fmt: skip
        jobs, _ = load_jobs(world, gen.resolution)
        held_out = check_held_out(
            {"generator": folder, "rfnet": default_model_path("rfnet")},
            [j.product_key for j in jobs], [j.prompt for j in jobs], allow_overlap=True,
        )  # fmt: skip
        runs = {}
        for name, refill in (("refill", True), ("per_product", False)):
            r = recurrent_generate(gen, jobs, judge, sampler, a.max_attempts, a.batch_size,
                                   seed=0, refill=refill)  # fmt: skip
            runs[name] = r.stats()
    same = runs["refill"]["accepted"] == runs["per_product"]["accepted"]
    print(
        json.dumps(
            {
                "products": a.n,
                "batch_size": a.batch_size,
                "max_attempts": a.max_attempts,
                "steps": sampler.steps,
                "judge": a.judge,
                "threads": torch.get_num_threads(),
                "refill_accepted_per_second": round(runs["refill"]["accepted_per_second"], 3),
                "per_product_accepted_per_second": round(
                    runs["per_product"]["accepted_per_second"], 3
                ),
                "speedup": round(
                    runs["refill"]["accepted_per_second"]
                    / max(runs["per_product"]["accepted_per_second"], 1e-9),
                    2,
                ),
                "same_results": same,
                "held_out": held_out.to_dict(),
                "refill": runs["refill"],
                "per_product": runs["per_product"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
