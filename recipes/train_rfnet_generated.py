"""Fine-tune the shipped RFNet on generated images labelled by the oracle, and measure it.

    python recipes/train_rfnet_generated.py --products TRAIN/manifest.parquet --n 1200 \
        --test GENERATED/attempts.parquet --work DIR [--epochs 4] [--lr 3e-5] [--ship NAME] \
        [--generator FINETUNED] [--extra RENDERS/manifest.parquet OTHER/labelled.parquet ...]

RF1M, the paper's training set, is made of *generated* images judged by annotators; an
inspector trained on AdWorld renders alone transfers poorly to the generator's images. Here
the oracle plays the annotators:

1. ``rewardkit generate``: one image per product for the first ``n`` training products
   (the generator's own training products: never the held-out evaluation products), by the
   shipped generator or ``--generator`` (a fine-tuned one: the paper's data loop, where the
   images that fooled the reward during RFFT come back labelled);
2. ``world.export.label_manifest``: the oracle's verdict of every image becomes its label
   (rows the oracle cannot judge are dropped and counted);
3. ``rewardkit train rfnet --init <shipped rfnet>``: fine-tune on them, with the ``--extra``
   labelled manifests beside them (split by product across all);
4. agreement with the oracle on ``--test``, generated images of held-out products with their
   oracle ``verdict`` (e.g. a ``rewardkit generate --judge oracle`` run's attempts.parquet),
   for the shipped and the fine-tuned inspector: six classes and Available-vs-not;
5. ``--ship NAME``: copy the model to ``assets/models/NAME``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ASSETS = Path(__file__).resolve().parents[1] / "src" / "rewardkit" / "assets" / "models"


def run(*args: str) -> None:
    print("+ rewardkit", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "rewardkit.cli", *args], check=True)


def agreement(model: str, test: Path, out: Path) -> dict:
    run("inspect", "--model", model, "--input", str(test), "--out", str(out))
    truth = pq.read_table(test).column("verdict").to_pylist()
    pred = pq.read_table(out).column("verdict").to_pylist()
    t, p = np.array(truth), np.array(pred)
    binary = (t == "Available") == (p == "Available")
    avail = p == "Available"
    return {
        "images": len(t),
        "agreement": float(np.mean(t == p)),
        "binary_agreement": float(np.mean(binary)),
        "available_precision": float(np.mean(t[avail] == "Available")) if avail.any() else None,
        "available_recall": float(np.mean(avail[t == "Available"])),
    }


def main() -> None:
    from rewardkit.models.defaults import default_model_path
    from rewardkit.world.export import label_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", required=True)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--test", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--init", default=None, help="RFNet folder (default: the shipped one)")
    ap.add_argument(
        "--generator", default=None,
        help="pipeline folder that paints the images (default: the shipped generator); a "
        "fine-tuned one refreshes the inspector on what RFFT learnt to paint",
    )  # fmt: skip
    ap.add_argument(
        "--extra", nargs="*", default=[],
        help="more labelled manifests trained on together with the generated images (renders, "
        "so the inspector keeps what it knew; other oracle-labelled generated sets)",
    )  # fmt: skip
    ap.add_argument("--ship", default=None, help="copy the model to assets/models/NAME")
    a = ap.parse_args()
    init = a.init or str(default_model_path("rfnet"))
    gen = a.work / "gen"
    if not (gen / "manifest.parquet").is_file():
        more = ["--generator", a.generator] if a.generator else []
        run("generate", "--products", a.products, "--limit", str(a.n), "--out", str(gen),
            "--seed", str(a.seed), "--batch-size", "32", "--no-progress", *more)  # fmt: skip
    table, errors = label_manifest(gen / "manifest.parquet", None, progress=False)
    manifest = pq.read_table(gen / "manifest.parquet")
    labels = table.column("oracle_label").to_pylist()
    keep = [i for i, v in enumerate(labels) if v is not None]
    labelled = manifest.take(pa.array(keep))
    if "label" in labelled.column_names:
        labelled = labelled.drop_columns(["label"])
    labelled = labelled.append_column("label", pa.array([labels[i] for i in keep]))
    pq.write_table(labelled, gen / "labelled.parquet")
    counts: dict[str, int] = {}
    for v in labelled.column("label").to_pylist():
        counts[v] = counts.get(v, 0) + 1
    run("train", "rfnet", "--manifest", str(gen / "labelled.parquet"), *a.extra, "--init", init,
        "--out", str(a.work / "run"), "--epochs", str(a.epochs), "--lr", str(a.lr))  # fmt: skip
    model = str(a.work / "run" / "model")
    summary = {
        "train_images": labelled.num_rows,
        "extra_manifests": a.extra,
        "unlabelled": errors,
        "train_labels": counts,
        "shipped": agreement(init, a.test, a.work / "inspect_shipped.parquet"),
        "fine_tuned": agreement(model, a.test, a.work / "inspect_tuned.parquet"),
    }
    (a.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if a.ship:
        dst = ASSETS / a.ship
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(model, dst)
        print(f"shipped to {dst}")


if __name__ == "__main__":
    main()
