"""Issue 23, a fifth route: early fusion of aligned inputs (beyond the paper), measured on a
validation set of products.

    python recipes/inspector_early_fusion.py --train G1 G2 ... --val V --work DIR \
        [--epochs 20] [--lr 2e-3] [--no-aligned] [--balance 0.5] [--seed 0] [--tag=-x]

``--train`` / ``--val`` are ``rewardkit generate`` output folders of *different* products;
labels are the AdWorld oracle's, cached in ``DIR/labels-*.parquet`` exactly as
``recipes/inspector_routes.py`` caches them (the two recipes share a work folder).

The paper's RFNet encodes each input on its own and fuses 4x4 token grids (late fusion): a
2-px gap under the product or a product-coloured floor touching it must survive a 16-px
token. Here the generated image, the product *as placed on the canvas* (on white) and its
placement mask are stacked as 7 channels of one full-resolution CNN (plus two coordinate
channels), so contact, relative size and colour similarity are comparisons within one
receptive field. The product photo (padded, the paper's product input) goes through a small
branch of its own (a bad cut-out is a property of the photo, not of the scene); the product's
real height (the caption's number) and its placed pixel height enter the head as numbers.
Trained from scratch (no pretrained weights exist for this input).

``--no-aligned`` is the ablation: the same network and photo branch with the placed product
and mask channels left out.

``--aux W`` adds a second teacher (beyond the paper, and beyond what RF1M's annotators give):
heads that regress the oracle's measurements (contact gap, contrast, clutter, hallucinated
area, prop scale error, the photo's truncation and matte defect), each in units of its
decision threshold, with weight W beside the cross-entropy. It asks whether the verdict is
hard to learn because 3,000 labels say little about *why* an image fails. Two readouts are
reported: the class head, and the oracle's decision order applied to the predicted
measurements (``decide``).

``--test T`` (only for the model already chosen on validation) also scores the final model on
the generated images of test products. Without it no test products are read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspector_routes import aligned_inputs, labelled_table, scores  # noqa: E402

from rewardkit.models.rfnet import CLASSES  # noqa: E402
from rewardkit.world.oracle import Thresholds, decide  # noqa: E402

# The oracle's measurements as regression targets, in units of their decision threshold
# (``world.oracle.Thresholds``, same field names): |t| > 1 crosses the threshold for the signed
# ones; contrast and clutter are (v - threshold) / threshold; the area is a log2 ratio.
AUX = (
    ("contact_gap", "signed"), ("contrast", "offset"), ("clutter", "offset"),
    ("hallucinated_area", "log2"), ("scale_error", "signed"), ("truncation", "signed"),
    ("matte_defect", "signed"),
)  # fmt: skip
LOG_EPS = 0.01  # keeps log2 finite at an area of 0


def to_target(v: np.ndarray, name: str, kind: str) -> np.ndarray:
    limit = getattr(Thresholds(), name)
    if kind == "signed":
        return v / limit
    if kind == "offset":
        return (v - limit) / limit
    return np.log2((v + LOG_EPS) / (limit + LOG_EPS))  # > 0 exactly above the limit


def from_target(t: float, name: str, kind: str) -> float:
    limit = getattr(Thresholds(), name)
    if kind == "signed":
        return t * limit
    if kind == "offset":
        return t * limit + limit
    return 2.0**t * (limit + LOG_EPS) - LOG_EPS


def aux_targets(folders: list[Path], work: Path) -> torch.Tensor:
    """(N, len(AUX)) float targets (NaN where the oracle measured nothing), row-aligned with
    ``load`` (the judged rows of each folder, in order)."""
    import pyarrow.parquet as pq

    out = []
    for f in folders:
        t = pq.read_table(work / f"labels-{f.name}.parquet")
        keep = np.array([v is not None for v in t.column("oracle_label").to_pylist()])
        cols = [
            np.clip(to_target(t.column(name).to_numpy(zero_copy_only=False)[keep], name, kind),
                    -4, 4)
            for name, kind in AUX
        ]  # fmt: skip
        out.append(np.stack(cols, 1))
    return torch.from_numpy(np.concatenate(out)).float()


def decide_from_aux(pred: torch.Tensor) -> torch.Tensor:
    """The oracle's own decision order (``world.oracle.decide``) on predicted measurements
    (N, len(AUX)) -> class index."""
    rows = pred.double().tolist()
    return torch.tensor([
        CLASSES.index(decide({n: from_target(v, n, k) for (n, k), v in zip(AUX, r, strict=True)}))
        for r in rows
    ])  # fmt: skip


SIDE = 64  # the AdWorld generator's output side


def load(folders: list[Path], work: Path, split: str, aligned: bool):
    """Stacked inputs (N, 7 + 3, S, S) or (N, 3 + 3, S, S), numbers (N, 2), labels (N,)."""
    from rewardkit.data.samples import load_product_rgb, load_resized

    t = pa.concat_tables([labelled_table(f, work, split) for f in folders])
    image = np.stack([load_resized(p, SIDE) for p in t["path"].to_pylist()])
    photo = np.stack([load_product_rgb(p, SIDE) for p in t["product_path"].to_pylist()])
    placed, mask = aligned_inputs(t, SIDE)  # (N, 3, S, S) uint8, (N, 1, S, S) float
    parts = [torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255]
    if aligned:
        parts += [placed.float() / 255, mask]
    parts.append(torch.from_numpy(photo).permute(0, 3, 1, 2).float() / 255)
    height = torch.tensor(t["product_height_cm"].to_pylist(), dtype=torch.float32)
    pixel_height = (mask[:, 0] > 0.5).any(2).sum(1).float() / SIDE
    numbers = torch.stack([torch.log(height / 30.0), pixel_height], 1)
    labels = torch.tensor([CLASSES.index(v) for v in t["label"].to_pylist()])
    return torch.cat(parts, 1), numbers, labels


def block(ci: int, co: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(),
        nn.Conv2d(co, co, 3, 1, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(),
    )  # fmt: skip


class EarlyFusion(nn.Module):
    """Scene stream (stacked channels + coordinates, 64 -> 4 px) and photo branch (64 -> 8)."""

    def __init__(self, scene_channels: int, width: int = 32, aux: int = 0) -> None:
        super().__init__()
        w = width
        self.scene_channels = scene_channels
        self.scene = nn.Sequential(
            block(scene_channels + 2, w, 1), block(w, 2 * w, 2), block(2 * w, 4 * w, 2),
            block(4 * w, 4 * w, 2), block(4 * w, 4 * w, 2),
        )  # fmt: skip
        self.photo = nn.Sequential(block(3, 16, 2), block(16, 32, 2), block(32, 64, 2))
        self.head = nn.Sequential(
            nn.Linear(8 * w + 128 + 2, 128), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(128, len(CLASSES)),
        )  # fmt: skip
        # Measurement heads (``--aux``): from the same pooled features.
        self.aux = nn.Sequential(nn.Linear(8 * w + 128 + 2, 128), nn.ReLU(), nn.Linear(128, aux))
        self.aux_out = None  # the last forward's measurement predictions (B, aux)

    def forward(self, x: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        scene, photo = x[:, : self.scene_channels], x[:, self.scene_channels :]
        n, _, h, w = scene.shape
        yy = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
        xx = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
        f = self.scene(torch.cat([scene, yy, xx], 1))
        g = self.photo(photo)
        pooled = [f.mean((2, 3)), f.amax((2, 3)), g.mean((2, 3)), g.amax((2, 3)), numbers]
        z = torch.cat(pooled, 1)
        self.aux_out = self.aux(z)
        return self.head(z)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, numbers: torch.Tensor, bs: int = 256):
    """Class probabilities (N, C) and predicted measurements (N, len(AUX))."""
    model.eval()
    probs, aux = [], []
    for i in range(0, len(x), bs):
        probs.append(F.softmax(model(x[i : i + bs], numbers[i : i + bs]), 1))
        aux.append(model.aux_out)
    return torch.cat(probs), torch.cat(aux)


def readouts(model, x, numbers, labels, with_aux: bool) -> tuple[dict, torch.Tensor]:
    """Scores of the class head (and of ``decide`` on the measurement heads)."""
    probs, aux = predict(model, x, numbers)
    r = scores(probs, labels, CLASSES)
    if with_aux:
        pred = decide_from_aux(aux)
        onehot = F.one_hot(pred, len(CLASSES)).float()
        r["decide_readout"] = scores(onehot, labels, CLASSES)
    return r, probs


def main() -> None:
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", nargs="+", type=Path, required=True)
    ap.add_argument("--val", nargs="+", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=2e-3, help="one-cycle peak, AdamW")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--no-aligned", action="store_true", help="ablation: no placed product/mask")
    ap.add_argument(
        "--balance", type=float, default=0.0,
        help="sample class c with weight n_c^-balance (0: as drawn, 1: uniform classes)",
    )  # fmt: skip
    ap.add_argument("--aux", type=float, default=0.0, help="weight of the measurement heads")
    ap.add_argument("--test", nargs="+", type=Path, help="test folders: the chosen model only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    a.work.mkdir(parents=True, exist_ok=True)
    aligned = not a.no_aligned
    x, s, y = load(a.train, a.work, "train", aligned)
    vx, vs, vy = load(a.val, a.work, "val", aligned)
    ty = aux_targets(a.train, a.work) if a.aux else None
    counts = np.bincount(y.numpy(), minlength=len(CLASSES)).tolist()
    print(f"train {tuple(x.shape)} classes {counts}; val {tuple(vx.shape)}", flush=True)
    model = EarlyFusion(x.shape[1] - 3, a.width, len(AUX))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    steps = a.epochs * -(-len(x) // a.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=steps, pct_start=0.1)
    weights = torch.bincount(y, minlength=len(CLASSES)).clamp(min=1).float().pow(-a.balance)[y]
    history, t0 = [], time.time()
    for epoch in range(1, a.epochs + 1):
        model.train()
        if a.balance:
            order = torch.multinomial(weights, len(x), replacement=True)
        else:
            order = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), a.batch_size):
            idx = order[i : i + a.batch_size]
            xb = x[idx]
            flip = torch.rand(len(idx)) < 0.5  # a mirrored ad is judged the same
            xb[flip] = xb[flip].flip(3)
            loss = F.cross_entropy(model(xb, s[idx]), y[idx], label_smoothing=0.05)
            if ty is not None:
                target = ty[idx]
                seen = ~target.isnan()
                pred = model.aux_out
                loss = loss + a.aux * F.smooth_l1_loss(pred[seen], target[seen])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        r, _ = readouts(model, vx, vs, vy, ty is not None)
        history.append({"epoch": epoch, "loss": round(total / len(x), 4),
                        "val_agreement": r["agreement"]})  # fmt: skip
        print(f"epoch {epoch} loss {total / len(x):.3f} val {r['agreement']:.3f} "
              f"P {r['available_precision']:.3f} R {r['available_recall']:.3f} "
              f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip
    result, probs = readouts(model, vx, vs, vy, ty is not None)
    if "decide_readout" in result:
        print(f"decide readout: val {result['decide_readout']['agreement']:.3f}", flush=True)
    if a.test:
        tx, ts, tyl = load(a.test, a.work, "test", aligned)
        result["test"], _ = readouts(model, tx, ts, tyl, ty is not None)
    result |= {"train_seconds": round(time.time() - t0, 1), "history": history,
               "train_images": len(x), "train_classes": dict(zip(CLASSES, counts, strict=True)),
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()
                            if k not in ("train", "val", "test")}
               | {k: [str(p) for p in getattr(a, k) or []]
                  for k in ("train", "val", "test")}}  # fmt: skip
    name = f"early{'-noaligned' if a.no_aligned else ''}{'-aux' if a.aux else ''}{a.tag}"
    (a.work / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    save_file(model.state_dict(), str(a.work / f"{name}.safetensors"))
    save_file({"probs": probs.contiguous()}, str(a.work / f"{name}-val-probs.safetensors"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "settings")}))


if __name__ == "__main__":
    main()
