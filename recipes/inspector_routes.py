"""Issue 23: routes to an inspector of *generated* images, measured end to end on a
validation set of products.

    python recipes/inspector_routes.py --train G1 G2 ... --val V1 V2 ... --work DIR \
        [--routes shipped,data,aligned,aligned-size] [--epochs 6] [--lr 5e-5]

``--train`` / ``--val`` are ``rewardkit generate`` output folders (their manifest.parquet) of
*different* products. Every image is labelled by the AdWorld oracle (the annotators of RF1M
here; labels are cached in ``DIR/labels-*.parquet``). Each route is trained on the train
folders and measured on the val folders: six-class agreement with the oracle,
Available-or-not agreement, Available precision and recall, and the confusion matrix. No
test products are read: the test set is left for the model this chooses.

Routes (all the paper's RFNet architecture and the small preset, initialised from the shipped
``rfnet`` unless ``--scratch``):

- ``shipped``: the shipped RFNet as it is (trained on renders only), the baseline;
- ``data``: the paper's five inputs, fine-tuned on the oracle-labelled generated images (the
  paper's route: RF1M is its own generator's images, labelled);
- ``aligned``: inputs the generator already has (beyond the paper): the product input is the
  product *as placed on the canvas* (on white, aligned with the generated image) instead of
  the padded photo, and the depth slot takes the placement mask (exact, aligned) instead of a
  predicted depth map, so contact and relative size are comparisons within one frame;
- ``aligned-size``: as ``aligned``, with the product's real height (the caption's number)
  written into the mask's intensity (``height_cm / HEIGHT_SCALE``): the size as a number
  rather than as text to a frozen encoder.

A diagnostic is written beside the routes: how often the oracle itself changes its verdict
when a val image is re-encoded as JPEG at quality 90 (how near its thresholds the generated
images sit).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

HEIGHT_SCALE = 200.0  # cm written as mask intensity 1.0 (AdWorld products are < 200 cm)
ROUTES = ("shipped", "data", "aligned", "aligned-size")


def labelled_table(folder: Path, work: Path, split: str) -> pa.Table:
    """The folder's generated images with the oracle's verdict as ``label`` (cached)."""
    from rewardkit.world.export import label_manifest

    manifest = folder / "manifest.parquet"
    cache = work / f"labels-{folder.name}.parquet"
    if cache.is_file():
        labels = pq.read_table(cache)
    else:
        labels, errors = label_manifest(manifest, cache, progress=False)
        print(f"{folder}: oracle could not judge {errors} image(s)", flush=True)
    table = pq.read_table(manifest)
    keep = [i for i, v in enumerate(labels.column("oracle_label").to_pylist()) if v is not None]
    rows = []
    for i in keep:
        r = table.slice(i, 1).to_pylist()[0]
        absolute = {k: str(folder / r[k]) if not Path(r[k]).is_absolute() else r[k]
                    for k in ("path", "product_path")}  # fmt: skip
        rows.append({**absolute, "caption": r["caption"], "fill": float(r["fill"]),
                     "product_height_cm": float(r["product_height_cm"]),
                     "label": labels.column("oracle_label")[i].as_py(), "split": split})  # fmt: skip
    return pa.Table.from_pylist(rows)


def aligned_inputs(table: pa.Table, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The product as placed on the canvas, on white (N, 3, S, S) uint8, and its placement
    mask (N, 1, S, S) float in [0, 1], at the model's resolution."""
    from rewardkit.world.export import load_product_photo
    from rewardkit.world.placement import place_product

    placed, masks = [], []
    for path, fill in zip(
        table["product_path"].to_pylist(), table["fill"].to_pylist(), strict=True
    ):
        layer, _ = place_product(load_product_photo(path), size, float(fill))
        a = layer[..., 3:4].astype(np.float32) / 255
        rgb = layer[..., :3].astype(np.float32) * a + 255 * (1 - a)
        placed.append((rgb + 0.5).astype(np.uint8))
        masks.append(a[..., 0])
    product = torch.from_numpy(np.stack(placed)).permute(0, 3, 1, 2).contiguous()
    return product, torch.from_numpy(np.stack(masks)).unsqueeze(1)


def route_data(route: str, base, table: pa.Table, size: int):
    """The InspectionData a route trains and is measured on."""
    if route in ("shipped", "data"):
        return base
    product, mask = aligned_inputs(table, size)
    if route == "aligned-size":
        heights = torch.tensor(table["product_height_cm"].to_pylist()).view(-1, 1, 1, 1)
        mask = mask * (heights / HEIGHT_SCALE).clamp(max=1.0)
    depth = (mask * 255 + 0.5).to(torch.uint8)
    return dataclasses.replace(base, product=product, depth=depth)


def scores(probs: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict:
    from rewardkit.training.rfnet import evaluate_rfnet

    ev = evaluate_rfnet(probs, labels, classes)
    a = classes.index("Available")
    pred = probs.argmax(1)
    return {
        "images": ev["n"],
        "agreement": ev["accuracy"],
        "binary_agreement": float(((pred == a) == (labels == a)).float().mean()),
        "available_precision": ev["precision"],
        "available_recall": ev["recall"],
        "ap": ev["ap"],
        "confusion": ev["confusion"],
    }


def oracle_jpeg_stability(table: pa.Table, quality: int = 90) -> dict:
    """Share of images whose oracle verdict survives a JPEG re-encode (quality ``quality``)."""
    from rewardkit.world.export import load_product_photo
    from rewardkit.world.oracle import label

    same = 0
    for r in table.to_pylist():
        img = Image.open(r["path"]).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        cls, _ = label(load_product_photo(r["product_path"]), jpeg, r["product_height_cm"],
                       fill=r["fill"])  # fmt: skip
        same += cls == r["label"]
    return {"images": table.num_rows, "quality": quality, "same_verdict": same / table.num_rows}


def main() -> None:
    from rewardkit.models.defaults import default_model_path
    from rewardkit.models.rfnet import RFNet
    from rewardkit.training.rfnet import (
        RFNetTrainConfig,
        predict_rfnet,
        prepare_inspection_data,
        train_rfnet,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", nargs="+", type=Path, required=True)
    ap.add_argument("--val", nargs="+", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-class-weighting", action="store_true")
    ap.add_argument("--dropout", action="store_true", help="keep the model's dropout on")
    ap.add_argument("--scratch", action="store_true", help="new weights instead of the shipped")
    ap.add_argument("--degrade", type=float, default=0.0)
    ap.add_argument(
        "--train-limit", type=int, default=None,
        help="first N training images only (a learning curve: does more data pay?)",
    )  # fmt: skip
    ap.add_argument("--tag", default="", help="suffix of the run folders and result file")
    ap.add_argument("--stability", action="store_true", help="the oracle JPEG diagnostic")
    ap.add_argument(
        "--resolution", type=int, default=None,
        help="the model's view: the side the network resizes its inputs to (the shipped 64; "
        "128 doubles the feature maps at every stage, for 2-px contact and size cues); the "
        "data stays at the shipped resolution and the weights carry over (the positions are "
        "sin-cos, recomputed per map size)",
    )  # fmt: skip
    a = ap.parse_args()
    routes = [r for r in a.routes.split(",") if r]
    bad = [r for r in routes if r not in ROUTES]
    if bad:
        raise SystemExit(f"--routes: unknown {bad}; known {list(ROUTES)}")
    a.work.mkdir(parents=True, exist_ok=True)
    tables = [labelled_table(f, a.work, "train") for f in a.train]
    if a.train_limit is not None:
        train = pa.concat_tables(tables)
        tables = [train.slice(0, a.train_limit)]
    tables += [labelled_table(f, a.work, "val") for f in a.val]
    table = pa.concat_tables(tables)
    shipped = default_model_path("rfnet")
    config = RFNet.from_pretrained(shipped).config
    init = shipped
    if a.resolution and a.resolution != config.resolution:
        start = RFNet.from_pretrained(shipped)
        start.config = dataclasses.replace(start.config, resolution=a.resolution)
        init = start.save_pretrained(a.work / f"init-r{a.resolution}")
    t0 = time.time()
    base = prepare_inspection_data(table, config, progress=False)
    print(f"prepared {table.num_rows} images in {time.time() - t0:.0f} s", flush=True)
    counts = {}
    for s, lab in zip(table["split"].to_pylist(), table["label"].to_pylist(), strict=True):
        counts.setdefault(s, {}).setdefault(lab, 0)
        counts[s][lab] += 1
    val_rows = base.rows("val")
    results: dict = {"label_counts": counts, "settings": vars(a) | {"train": [str(p) for p in a.train],
                     "val": [str(p) for p in a.val], "work": str(a.work)}, "routes": {}}  # fmt: skip
    if a.stability:
        results["oracle_jpeg90_stability_val"] = oracle_jpeg_stability(
            table.filter(pa.compute.equal(table["split"], "val"))
        )
        print(json.dumps(results["oracle_jpeg90_stability_val"]), flush=True)
    out_file = a.work / f"routes{a.tag}.json"
    for route in routes:
        data = route_data(route, base, table, config.resolution)
        t0 = time.time()
        if route == "shipped":
            model = RFNet.from_pretrained(init)
        else:
            cfg = RFNetTrainConfig(
                lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, degrade=a.degrade,
                degraded_copy=False, class_weighting=not a.no_class_weighting,
                dropout=a.dropout,
            )  # fmt: skip
            run = a.work / f"run-{route}{a.tag}"
            view = dataclasses.replace(config, resolution=a.resolution or config.resolution)
            train_rfnet(data, run, model_config=view, config=cfg,
                        init=None if a.scratch else init, progress=False)  # fmt: skip
            model = RFNet.from_pretrained(run / "model")
        probs = predict_rfnet(model.eval(), data, val_rows, 128)
        r = scores(probs, data.labels[val_rows], data.classes)
        r["train_seconds"] = round(time.time() - t0, 1)
        results["routes"][route] = r
        print(route, json.dumps({k: v for k, v in r.items() if k != "confusion"}), flush=True)
        out_file.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
