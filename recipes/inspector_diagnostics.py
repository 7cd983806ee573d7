"""Diagnostics behind MODELS.md, "Capacity, 9,000 images without heads, and other judges in
the loop" (issue 23): are the labels the noise floor, and do the measurement heads know a
product's better attempt? In-sample measurements; nothing here chooses a model.

    python recipes/inspector_diagnostics.py mirror --manifest G/manifest.parquet [...]
    python recipes/inspector_diagnostics.py heads --model MODEL --manifest T.parquet [...]
    python recipes/inspector_diagnostics.py loop --model MODEL --run RUN --manifest T_RG.parquet \
        --labels L_RG.parquet

- ``mirror``: the oracle's label of each image against its label of the mirrored image (image
  and product photo flipped): how much label noise the mirror augmentation adds.
- ``heads``: per measurement head of an early-fusion model with heads, the correlation with
  the oracle's target and the AUC of the predicted margin for the oracle's defect.
- ``loop``: on a run that painted every attempt (``generate --until-accepted
  --accept-threshold 0.99999``; ``T_RG`` its ``world label --training-manifest``, ``L_RG`` its
  labels), the share of products whose best-scoring attempt of all is oracle-Available when
  attempts are ranked by P(Available), by the heads' margins, by both, or prop-free first
  (the oracle's own prop detection: an upper bound for a learnt one).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from rewardkit.commands.rfnet import load_samples
from rewardkit.generation.recurrent import attempt_grid, replay_outcome
from rewardkit.models.rfnet import AVAILABLE, RFNet
from rewardkit.training.rfnet import measurement_targets, prepare_inspection_data
from rewardkit.world.export import ORACLE_TARGET_SIDE, _height_cm, load_product_photo, read_image
from rewardkit.world.oracle import TARGET_KINDS, label
from rewardkit.world.placement import DEFAULT_FILL

WEIGHTS = (0.1, 0.25, 0.5, 1.0, 2.0)  # of the worst margin against log P(Available)


def defect_margin(targets: np.ndarray, name: str) -> np.ndarray:
    """A measurement in threshold units (``world.oracle.measurement_target``) -> how far past
    its decision threshold it is (> 0: the oracle calls that defect)."""
    if name == "contrast":  # too little contrast is the defect
        return -targets
    if name == "clutter" or TARGET_KINDS[name] == "log2":
        return targets
    return np.abs(targets) - 1.0  # signed: |t| > 1 crosses the threshold


def mirror_agreement(manifests: list[Path]) -> dict:
    """The oracle's label of each manifest row's image against that of its mirror image."""
    same, n, flips = 0, 0, Counter()
    for manifest in map(Path, manifests):
        base = manifest.parent
        for i, row in enumerate(pq.read_table(manifest).to_pylist()):
            image = read_image(base / row["path"], "RGB", ORACLE_TARGET_SIDE)
            cutout = load_product_photo(base / row["product_path"])
            fill, height = float(row.get("fill") or DEFAULT_FILL), _height_cm(row, i, manifest)
            plain, _ = label(cutout, image, height, fill=fill)
            flipped = np.ascontiguousarray(cutout[:, ::-1]), np.ascontiguousarray(image[:, ::-1])
            mirrored, _ = label(*flipped, height, fill=fill)
            n, same = n + 1, same + (plain == mirrored)
            if plain != mirrored:
                flips[f"{plain} -> {mirrored}"] += 1
    return {"images": n, "same_label": same, "rate": same / max(n, 1), "flips": dict(flips)}


def require_heads(model: RFNet) -> RFNet:
    if model.measure is None:
        raise SystemExit("--model: an early-fusion RFNet with measurement heads is needed")
    return model


def predict(model: RFNet, table) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(class probabilities, predicted measurements, labels, index of Available) on a
    labelled training manifest's rows."""
    data = prepare_inspection_data(table, model.config, progress=False)
    mods = tuple(model.config.modalities)
    probs, measured = [], []
    with torch.no_grad():
        for rows in torch.arange(len(data)).split(128):
            logits, m = model(**data.batch(rows, mods, "cpu"), measurements=True)
            probs.append(torch.softmax(logits.float(), -1))
            measured.append(m.float())
    a = list(data.classes).index(AVAILABLE)
    return torch.cat(probs).numpy(), torch.cat(measured).numpy(), data.labels.numpy(), a


def margins(model: RFNet, measured: np.ndarray) -> np.ndarray:
    """(N, heads) predicted margins past each threshold (:func:`defect_margin`)."""
    names = model.config.measurements
    return np.stack([defect_margin(measured[:, j], n) for j, n in enumerate(names)], 1)


def heads_report(model: RFNet, manifests: list[Path]) -> dict:
    from sklearn.metrics import roc_auc_score

    require_heads(model)
    table = load_samples([str(m) for m in manifests], split=False)
    probs, measured, labels, a = predict(model, table)
    targets = measurement_targets(table, model.config.measurements)
    out = {}
    for j, name in enumerate(model.config.measurements):
        ok = ~np.isnan(targets[:, j])
        defect = defect_margin(targets[ok, j], name) > 0
        out[name] = {
            "n": int(ok.sum()), "defects": int(defect.sum()),
            "corr": float(np.corrcoef(measured[ok, j], targets[ok, j])[0, 1]),
            "auc": float(roc_auc_score(defect, defect_margin(measured[ok, j], name)))
            if 0 < defect.sum() < ok.sum() else None,
        }  # fmt: skip
    available = labels == a
    worst = margins(model, measured).max(1)
    out["auc_available"] = {
        "p_available": float(roc_auc_score(available, probs[:, a])),
        "minus_worst_margin": float(roc_auc_score(available, -worst)),
    }
    return out


def loop_report(model: RFNet, run: Path, manifest: Path, labels_file: Path) -> dict:
    require_heads(model)
    attempts = pq.read_table(run / "attempts.parquet")
    rows = attempts.select(["product_id", "attempt", "score"]).to_pylist()
    table = load_samples([str(manifest)], split=False)
    oracle = pq.read_table(labels_file)
    if table.num_rows != len(rows) or oracle.num_rows != len(rows):
        raise SystemExit(f"{manifest}, {labels_file}: need one row per attempt of {run}")
    probs, measured, _, a = predict(model, table)
    labels = oracle["oracle_label"].to_pylist()
    prop = ~np.isnan(np.asarray(oracle["scale_error"].to_numpy(zero_copy_only=False), float))
    d = margins(model, measured)
    log_p, worst = np.log(probs[:, a] + 1e-9), np.maximum(d.max(1), -1)

    def best_of_all(score: np.ndarray) -> float:
        grid = [dict(r, score=float(v)) for r, v in zip(rows, score, strict=True)]
        scores, available, _, _ = attempt_grid(grid, labels, max(r["attempt"] for r in rows))
        return replay_outcome(scores, available, np.inf)["available_rate"]

    out = {"p_available": best_of_all(probs[:, a]), "minus_worst_margin": best_of_all(-worst),
           "prop_free_first": best_of_all(probs[:, a] + (~prop)),
           "attempts_with_prop": float(prop.mean())}  # fmt: skip
    for w in WEIGHTS:
        out[f"log_p_minus_{w}_worst"] = best_of_all(log_p - w * worst)
    for j, name in enumerate(model.config.measurements):
        out[f"log_p_minus_half_{name}"] = best_of_all(log_p - 0.5 * np.maximum(d[:, j], -1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mirror")
    m.add_argument("--manifest", nargs="+", required=True, type=Path)
    h = sub.add_parser("heads")
    h.add_argument("--model", required=True, type=Path)
    h.add_argument("--manifest", nargs="+", required=True, type=Path)
    lp = sub.add_parser("loop")
    lp.add_argument("--model", required=True, type=Path)
    lp.add_argument("--run", required=True, type=Path)
    lp.add_argument(
        "--manifest", required=True, type=Path, help="training manifest of the attempts"
    )
    lp.add_argument("--labels", required=True, type=Path, help="world label of the attempts")
    a = ap.parse_args(argv)
    if a.what == "mirror":
        out = mirror_agreement(a.manifest)
    elif a.what == "heads":
        out = heads_report(RFNet.from_pretrained(a.model).eval(), a.manifest)
    else:
        out = loop_report(RFNet.from_pretrained(a.model).eval(), a.run, a.manifest, a.labels)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
