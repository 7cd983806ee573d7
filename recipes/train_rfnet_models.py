"""Rebuild the shipped RFNet inspector and its image-only baseline, and measure the tables.

    python recipes/train_rfnet_models.py --train TRAIN/manifest.parquet \
        --test TEST/manifest.parquet --work DIR [--epochs 6] [--ship]

1. ``rewardkit train rfnet --ablation``: full RFNet, the image-only baseline and one model
   per removed input, each trained from scratch on the training manifest (split by product;
   depth and saliency predicted by the shipped extractors).
2. ``rewardkit eval rfnet --runs``: every run on the held-out manifest (other products),
   clean and degraded; the two tables go to ``DIR/eval.md``.
3. ``--ship``: copies ``full`` and ``image-only`` into the package and the tables beside them.

The data used for the shipped models: ``rewardkit world render --n 6000 --seed 101 --size 64``
(training) and ``--n 1200 --seed 202`` (held-out products).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "rewardkit" / "assets" / "models"


def run(*args: str) -> None:
    print("+ rewardkit", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "rewardkit.cli", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--ship", action="store_true")
    a = ap.parse_args()
    runs = a.work / "runs"
    run("train", "rfnet", "--manifest", a.train, "--out", str(runs), "--ablation",
        "--epochs", str(a.epochs))  # fmt: skip
    run("eval", "rfnet", "--manifest", a.test, "--runs", str(runs),
        "--out", str(a.work / "eval.json"))  # fmt: skip
    if a.ship:
        for name, folder in (("full", "rfnet"), ("image-only", "rfnet-image-only")):
            dst = ASSETS / folder
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(runs / name / "model", dst)
        shutil.copy2(a.work / "eval.md", ASSETS / "rfnet" / "ablation.md")


if __name__ == "__main__":
    main()
