"""Choose an inspector readout on validation images, then measure only the chosen one on test
images (issue 23, the model's view: what the verdict does with the probabilities).

    python recipes/inspector_readouts.py --model MODEL [--candidate NAME=FOLDER ...] \
        --val T_V1.parquet [T_V2.parquet ...] --test T_TEST.parquet --out R.json \
        [--min-gain 1.0]

Readouts measured on the validation manifests (labelled generated images of products no
model trained or was chosen on):

- ``plain:NAME``: each model (``MODEL`` is ``shipped``) at its own accept threshold, the
  verdict ``inspect`` gives (Available exactly when P(Available) >= it, else the most
  probable defect);
- ``ensemble``: the class probabilities of all models averaged, at ``MODEL``'s threshold;
- ``bias:NAME``: each model with a fitted readout: its accept threshold and one additive
  bias per defect class on the log-probabilities (which defect is named when the image is
  not Available), fitted by coordinate ascent to six-class agreement, starting from its
  own threshold. Its validation figure is out of fold (two halves of the validation
  images: fit on one, score the other), so it is comparable with the unfitted readouts;
  the readout it would ship is then fitted on all validation images. (Until 2026-12-05
  only ``bias:shipped``; a candidate whose own operating point, chosen on its training
  run's validation split, is far stricter than the shipped one is otherwise judged at
  that point alone.)

The rule, fixed before any figure: the readout with the highest validation six-class
agreement is adopted when it beats ``plain:shipped`` by at least ``--min-gain`` points;
only then, and only for it and ``plain:shipped``, the test manifest is read. Nothing else
is ever measured on test here. Measured on 2026-12-04 (MODELS.md, "Readouts, an ensemble and
2,000 more products"): the fitted readout led by 0.5 points on 800 validation images, so
nothing was adopted and the test manifest was not read.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rewardkit.commands.rfnet import load_samples, predict_on_device
from rewardkit.io import write_json_atomic
from rewardkit.models.rfnet import AVAILABLE, RFNet, verdict_indices
from rewardkit.training.rfnet import evaluate_rfnet, prepare_inspection_data, verdict_figures
from rewardkit.world.oracle import Thresholds

BIAS_GRID = np.round(np.arange(-3.0, 3.01, 0.25), 2)
THRESHOLD_GRID = np.round(np.arange(0.30, 0.981, 0.01), 2)


def biased_verdicts(probs: np.ndarray, a: int, threshold: float, bias: np.ndarray) -> np.ndarray:
    """Available exactly when P(Available) >= ``threshold``; otherwise the defect with the
    highest log-probability plus its ``bias``."""
    score = np.log(np.clip(probs, 1e-12, None)) + bias
    score[:, a] = -np.inf
    return np.where(probs[:, a] >= threshold, a, score.argmax(1))


def fit_readout(probs: np.ndarray, labels: np.ndarray, a: int, threshold: float, sweeps: int = 4):
    """Coordinate ascent on (threshold, defect biases) for agreement on ``probs``; a move is
    taken only when it adds at least one correct verdict, ties keep the smaller change."""
    bias = np.zeros(probs.shape[1])

    def correct(t, b):
        return int((biased_verdicts(probs, a, t, b) == labels).sum())

    best = correct(threshold, bias)
    for _ in range(sweeps):
        moved = False
        scores = [(correct(t, bias), -abs(t - threshold), t) for t in THRESHOLD_GRID]
        s, _, t = max(scores)
        if s > best:
            best, threshold, moved = s, float(t), True
        for k in range(probs.shape[1]):
            if k == a:
                continue
            trial = []
            for v in BIAS_GRID:
                b = bias.copy()
                b[k] = v
                trial.append((correct(threshold, b), -abs(v), v))
            s, _, v = max(trial)
            if s > best:
                best, bias[k], moved = s, float(v), True
        if not moved:
            break
    return threshold, bias


# The oracle's measurements that decide among generated images' classes, and their limits.
MARGIN_LIMITS = {
    "contact_gap": Thresholds.contact_gap,
    "scale_error": Thresholds.scale_error,
    "hallucinated_area": Thresholds.hallucinated_area,
    "contrast": Thresholds.contrast,
    "clutter": Thresholds.clutter,
}
MARGIN_BINS = (0.1, 0.25, 0.5)


def threshold_margins(measurements: pa.Table) -> np.ndarray:
    """Per image, how near its oracle verdict was to flipping: the smallest relative distance
    ``| |value| - limit | / limit`` over the measurements of ``MARGIN_LIMITS`` (NaN ones
    skipped; inf when none is measured)."""
    out = np.full(measurements.num_rows, np.inf)
    for key, limit in MARGIN_LIMITS.items():
        v = np.asarray(measurements[key].to_numpy(zero_copy_only=False), dtype=float)
        r = np.abs(np.abs(v) - limit) / limit
        out = np.fmin(out, np.where(np.isnan(r), np.inf, r))
    return out


def by_margin(correct: np.ndarray, margins: np.ndarray) -> list[dict]:
    """Agreement per margin bin (below 10%, 10-25%, 25-50%, 50% and more of the limit)."""
    edges = (0.0, *MARGIN_BINS, np.inf)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (margins >= lo) & ((margins < hi) | (hi == np.inf))  # none measured: far
        rows.append({"margin": f"[{lo:g}, {hi:g})", "n": int(sel.sum()),
                     "errors": int((~correct[sel]).sum()),
                     "accuracy": float(correct[sel].mean()) if sel.any() else None})  # fmt: skip
    return rows


def probabilities(models: dict[str, RFNet], manifests: list[Path]):
    samples = load_samples([str(m) for m in manifests], split=False)
    first = next(iter(models.values()))
    data = prepare_inspection_data(samples, first.config, progress=False)
    with torch.no_grad():
        probs = {name: predict_on_device(m, data).numpy() for name, m in models.items()}
    return probs, data.labels.numpy(), tuple(data.classes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="the shipped RFNet folder")
    ap.add_argument("--candidate", nargs="*", default=[], help="NAME=FOLDER, other RFNets")
    ap.add_argument("--val", nargs="+", required=True, type=Path, help="labelled manifests")
    ap.add_argument("--test", type=Path, help="labelled test manifest (read only on adoption)")
    ap.add_argument("--out", required=True, type=Path, help="JSON to write")
    ap.add_argument("--min-gain", type=float, default=1.0, help="points over plain:shipped")
    ap.add_argument("--measurements", nargs="*", type=Path, default=[],
                    help="the oracle's measurements of each --val manifest (`world label "
                         "--out`), in order: agreement by distance to a threshold")  # fmt: skip
    ap.add_argument("--sweep", nargs="*", type=float, default=[],
                    help="also report each model's validation figures at these accept "
                         "thresholds (a diagnostic: never a choice)")  # fmt: skip
    a = ap.parse_args(argv)
    models = {"shipped": RFNet.from_pretrained(a.model).eval()}
    for item in a.candidate:
        name, sep, folder = item.partition("=")
        if not sep or not name or name in models:
            raise SystemExit(f"--candidate {item!r}: expected a new NAME=FOLDER")
        models[name] = RFNet.from_pretrained(folder).eval()
    configs = {m.config.fusion for m in models.values()}
    if len(configs) != 1:
        raise SystemExit(f"--candidate: models must share one input preparation; got {configs}")
    t0 = models["shipped"].config.accept_threshold
    probs, labels, classes = probabilities(models, a.val)
    av = classes.index(AVAILABLE)

    def plain(p: np.ndarray, t: float, y: np.ndarray) -> dict:
        return verdict_figures(verdict_indices(p, classes, t), y, classes)

    val: dict[str, dict] = {
        f"plain:{name}": plain(probs[name], model.config.accept_threshold, labels)
        for name, model in models.items()
    }
    if len(models) > 1:
        val["ensemble"] = plain(np.mean(list(probs.values()), axis=0), t0, labels)
    # Out-of-fold figure for each model's fitted readout: two halves, fixed permutation.
    halves = np.random.default_rng(0).permutation(len(labels)) % 2
    fitted, fits = {}, {}
    for name, model in models.items():
        start = model.config.accept_threshold or 0.5
        pred = np.zeros_like(labels)
        folds = []
        for h in (0, 1):
            fit, score = halves != h, halves == h
            t, b = fit_readout(probs[name][fit], labels[fit], av, start)
            pred[score] = biased_verdicts(probs[name][score], av, t, b)
            folds.append({"threshold": t, "bias": b.tolist()})
        val[f"bias:{name}"] = verdict_figures(pred, labels, classes) | {"folds": folds}
        fits[name] = fit_readout(probs[name], labels, av, start)
        t_all, b_all = fits[name]
        fitted[name] = {"threshold": t_all, "bias": dict(zip(classes, b_all.tolist(), strict=True))}

    if a.measurements:
        if len(a.measurements) != len(a.val):
            raise SystemExit(f"--measurements: {len(a.measurements)} files for {len(a.val)} --val")
        table = pa.concat_tables(
            [pq.read_table(m) for m in a.measurements], promote_options="permissive"
        )
        if table.num_rows != len(labels):
            raise SystemExit(f"--measurements: {table.num_rows} rows for {len(labels)} images")
        pred = verdict_indices(probs["shipped"], classes, t0)
        correct, margins = pred == labels, threshold_margins(table)
        rows = by_margin(correct, margins)
        far = (margins >= MARGIN_BINS[-1]) & ~correct
        pairs = Counter(
            f"{classes[t]} -> {classes[p]}" for t, p in zip(labels[far], pred[far], strict=True)
        )
        result_margins = {"limits": MARGIN_LIMITS, "plain:shipped": rows,
                          "far_errors": dict(pairs.most_common())}  # fmt: skip
        for r in rows:
            print(f"margin {r['margin']}: {r['n']} images, {r['errors']} errors")
        print("errors at margin >= 0.5 (oracle -> model):", dict(pairs.most_common()))
    for name, f in val.items():
        print(f"validation {name}: six classes {100 * f['accuracy']:.2f}%, Available P/R "
              f"{100 * f['precision']:.1f}/{100 * f['recall']:.1f} (n {f['n']})")  # fmt: skip
    sweep = {name: {str(t): plain(p, t, labels) for t in a.sweep} for name, p in probs.items()}
    for name, rows in sweep.items():
        for t, f in rows.items():
            print(f"sweep {name} at {t}: six classes {100 * f['accuracy']:.2f}%, Available P/R "
                  f"{100 * f['precision']:.1f}/{100 * f['recall']:.1f}")  # fmt: skip
    base = val["plain:shipped"]["accuracy"]
    chosen = max(val, key=lambda k: (val[k]["accuracy"], k == "plain:shipped"))
    gain = 100 * (val[chosen]["accuracy"] - base)
    adopted = chosen != "plain:shipped" and gain >= a.min_gain
    print(f"chosen on validation: {chosen} ({gain:+.2f} points); adopted: {adopted}")
    result = {
        "model": str(a.model),
        "candidates": a.candidate,
        "val": [str(m) for m in a.val],
        "validation": val,
        "fitted_on_all_validation": fitted,
        "chosen": chosen,
        "gain_points": gain,
        "min_gain": a.min_gain,
        "adopted": adopted,
    }
    if a.measurements:
        result["margins"] = result_margins
    if a.sweep:
        result["sweep"] = sweep
    if adopted and a.test is not None:
        tprobs, tlabels, _ = probabilities(models, [a.test])
        test = {
            "plain:shipped": evaluate_rfnet(
                torch.from_numpy(tprobs["shipped"]), torch.from_numpy(tlabels), classes, t0
            )
        }
        if chosen == "ensemble":
            test[chosen] = plain(np.mean(list(tprobs.values()), axis=0), t0, tlabels)
        elif chosen.startswith("bias:"):
            t_all, b_all = fits[chosen.split(":", 1)[1]]
            pred = biased_verdicts(tprobs[chosen.split(":", 1)[1]], av, t_all, b_all)
            test[chosen] = verdict_figures(pred, tlabels, classes)
        else:
            name = chosen.split(":", 1)[1]
            test[chosen] = plain(tprobs[name], models[name].config.accept_threshold, tlabels)
        for name, f in test.items():
            print(f"TEST {name}: six classes {100 * f['accuracy']:.2f}%, Available P/R "
                  f"{100 * f['precision']:.1f}/{100 * f['recall']:.1f} (n {f['n']})")  # fmt: skip
        result |= {"test_manifest": str(a.test), "test": test}
    write_json_atomic(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
