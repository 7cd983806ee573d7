"""Six-class agreement and Available precision / recall of an inspector at a range of accept
thresholds, on labelled images it did not train on (MODELS.md, "The accept threshold is not
the lever for six-class agreement").

    rewardkit inspect --model MODEL --input T.parquet --out V.parquet --no-progress
    python recipes/accept_threshold_curve.py --set NAME=V.parquet:T.parquet [--set ...] \
        [--thresholds 0.3:0.75:0.025] [--extra 0.6132] --out CURVE.json

Each ``--set`` pairs `inspect`'s verdicts (the ``p_*`` columns) with a labelled manifest
(``label`` or ``oracle_label``), matched by image path; the sets are also pooled. Verdicts
at a threshold are those of ``verdict_indices`` (Available exactly when P(Available) >= it,
the most probable defect otherwise), as every command reads the model's ``accept_threshold``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pyarrow.parquet as pq

from rewardkit.io import write_json_atomic
from rewardkit.models.rfnet import verdict_indices
from rewardkit.world.scene import CLASSES


def load_set(verdicts: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, 6) in CLASSES order, label indices (N,)) matched by path."""
    v = pq.read_table(verdicts).to_pandas()
    t = pq.read_table(labels).to_pandas()
    col = "label" if "label" in t.columns else "oracle_label"
    if col not in t.columns:
        raise SystemExit(f"{labels}: no label or oracle_label column")
    probs = [f"p_{c.lower().replace(' ', '_')}" for c in CLASSES]
    missing = [c for c in ["path", *probs] if c not in v.columns]
    if missing:
        raise SystemExit(f"{verdicts}: missing column(s) {', '.join(missing)}")
    m = v[["path", *probs]].merge(t[["path", col]], on="path")
    if len(m) != len(v):
        raise SystemExit(f"{verdicts}: {len(v) - len(m)} verdict path(s) not in {labels}")
    bad = sorted(set(m[col]) - set(CLASSES))
    if bad:
        raise SystemExit(f"{labels}: column {col}: unknown class(es) {bad}")
    return m[probs].to_numpy(), m[col].map(CLASSES.index).to_numpy()


def readout(p: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    pred = verdict_indices(p, CLASSES, threshold)
    a = CLASSES.index("Available")
    tp = int(((pred == a) & (y == a)).sum())
    return {
        "n": int(len(y)),
        "six_class": float((pred == y).mean()),
        "precision": tp / max(1, int((pred == a).sum())),
        "recall": tp / max(1, int((y == a).sum())),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", required=True, metavar="NAME=V.parquet:T.parquet")
    ap.add_argument("--thresholds", default="0.3:0.75:0.025", help="start:stop:step (inclusive)")
    ap.add_argument("--extra", type=float, nargs="*", default=[], help="more thresholds")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        start, stop, step = (float(x) for x in a.thresholds.split(":"))
    except ValueError:
        ap.error(f"--thresholds: expected start:stop:step, got {a.thresholds!r}")
    sets = {}
    for spec in a.set:
        name, sep, files = spec.partition("=")
        v, sep2, t = files.partition(":")
        if not (sep and sep2 and name and v and t):
            ap.error(f"--set: expected NAME=V.parquet:T.parquet, got {spec!r}")
        sets[name] = load_set(v, t)
    sets["pooled"] = tuple(np.concatenate(x) for x in zip(*sets.values(), strict=True))
    ths = [*np.round(np.arange(start, stop + step / 2, step), 6), *a.extra]
    rows = [
        {"threshold": float(th), **{n: readout(p, y, th) for n, (p, y) in sets.items()}}
        for th in ths
    ]
    out = {"sets": {s.partition("=")[0]: s.partition("=")[2] for s in a.set}, "rows": rows}
    write_json_atomic(a.out, out)
    for r in rows:
        cells = (f"{n} {r[n]['six_class']:.2%} {r[n]['precision']:.3f}/{r[n]['recall']:.3f}"
                 for n in sets)  # fmt: skip
        print(f"{r['threshold']:.4f}  " + "  ".join(cells))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
