"""Rebuild the shipped RFNet inspector and its image-only baseline, and measure the tables.

    python recipes/train_rfnet_models.py --train TRAIN/manifest.parquet [MORE/manifest.parquet] \
        --test TEST/manifest.parquet --work DIR [--epochs 8] [--variants all] \
        [--model-config rfnet.yaml] [--ship]

1. ``rewardkit train rfnet --variant V``: each variant (default all: full RFNet, the
   image-only baseline and one model per removed input) trained from scratch on the training
   manifests (concatenated, split by product; depth and saliency predicted by the shipped
   extractors; half of the training images drawn from a degraded copy). A variant whose
   ``model/`` exists is kept (the recipe resumes).
2. ``rewardkit eval rfnet --runs``: every run on the held-out manifest (other products),
   clean and degraded, with agreement with the AdWorld oracle; tables in ``DIR/eval.md``.
3. ``--ship``: copies ``full`` and ``image-only`` into the package and the tables beside them.

The data used for the shipped models: ``rewardkit world render --n 6000 --seed 101 --size 64``
and ``--n 14000 --seed 303 --size 64 --balance "Available=0.25,Size Mismatch=0.25,Space
Mismatch=0.125,Indistinctiveness=0.125,Shape Hallucination=0.125,Unsuitable=0.125"``
(training; Available vs Size Mismatch is the hard pair) and ``--n 1200 --seed 202`` (held-out
products).
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
    ap.add_argument("--train", required=True, nargs="+")
    ap.add_argument("--test", required=True)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--variants", default="all", help="comma-separated, or all")
    ap.add_argument("--model-config", default=None, help="RFNet architecture YAML")
    ap.add_argument("--ship", action="store_true")
    a = ap.parse_args()
    from rewardkit.training.rfnet import VARIANTS

    runs = a.work / "runs"
    names = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
    for name in names:
        if (runs / name / "model").is_dir():
            print(f"{name}: trained already ({runs / name / 'model'})", flush=True)
            continue
        extra = ["--model-config", a.model_config] if a.model_config else []
        run("train", "rfnet", "--manifest", *a.train, "--out", str(runs / name),
            "--variant", name, "--epochs", str(a.epochs), *extra)  # fmt: skip
    run("eval", "rfnet", "--manifest", a.test, "--runs", str(runs),
        "--out", str(a.work / "eval.json"))  # fmt: skip
    if a.ship:
        # The render-trained pair; the shipped ``rfnet`` starts from ``rfnet-renders`` and is
        # fine-tuned on generated images (MODELS.md, "The shipped inspector").
        for name, folder in (("full", "rfnet-renders"), ("image-only", "rfnet-image-only")):
            dst = ASSETS / folder
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(runs / name / "model", dst)
        shutil.copy2(a.work / "eval.md", ASSETS / "rfnet-renders" / "ablation.md")


if __name__ == "__main__":
    main()
