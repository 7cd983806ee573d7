"""Oracle vs render truth over many renders, clean and degraded (blur + noise + JPEG).

Acceptance of issue 2: >= 98% clean and >= 95% degraded over 10,000 renders. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from rewardkit.world.agreement import oracle_agreement


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    out = {"benchmark": "oracle_agreement", "n": a.n, "size": a.size, "seed": a.seed}
    for degraded in (False, True):
        t = time.perf_counter()
        r = oracle_agreement(a.n, a.seed, a.size, degraded=degraded, workers=a.workers)
        key = "degraded" if degraded else "clean"
        out[key] = {
            "agreement": r["agreement"],
            "per_class": r["per_class"],
            "confusion": r["confusion"],
            "seconds": time.perf_counter() - t,
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
