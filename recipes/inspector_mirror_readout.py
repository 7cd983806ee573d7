"""Measure a mirror readout for an RFNet: its class probabilities averaged over the inputs
and their mirror image, against the plain readout, on labelled images (issue 23, the model's
view). A model trained with random mirror flips (``flip: true``) should judge a mirrored ad
the same; averaging the two views is the usual test-time augmentation.

    python recipes/inspector_mirror_readout.py --model MODEL --manifest T_VAL.parquet \
        --out R.json

T_VAL: a labelled manifest (``rewardkit world label ... --training-manifest T_VAL.parquet``)
of products the model neither trained nor was chosen on. Prints, for each readout (plain,
mirror only, average), six-class agreement at the model's accept threshold and at the most
probable class, and writes those with Available precision / recall and the confusion matrix
to R.json. Measured on 2026-12-04 (MODELS.md): the average lost a point on validation, so
it is not the shipped readout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rewardkit.commands.rfnet import load_samples, predict_on_device
from rewardkit.io import write_json_atomic
from rewardkit.models.rfnet import RFNet
from rewardkit.training.rfnet import FLIPPED_INPUTS, evaluate_rfnet, prepare_inspection_data


class Mirrored(torch.nn.Module):
    """``model`` reading the mirror image of every image input (``FLIPPED_INPUTS``), so
    ``predict_on_device`` can batch it as it batches the model itself."""

    def __init__(self, model: RFNet) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, **inputs) -> torch.Tensor:
        return self.model(
            **{k: v.flip(3) if k in FLIPPED_INPUTS and v is not None else v
               for k, v in inputs.items()}
        )  # fmt: skip


def readouts(model: RFNet, data) -> dict[str, torch.Tensor]:
    """Class probabilities (N, C) of every sample of ``data``: plain, mirrored, and their
    average."""
    with torch.no_grad():
        p, m = predict_on_device(model, data), predict_on_device(Mirrored(model), data)
    return {"plain": p, "mirror": m, "average": (p + m) / 2}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="RFNet folder")
    ap.add_argument("--manifest", required=True, type=Path, help="labelled manifest")
    ap.add_argument("--out", required=True, type=Path, help="JSON to write")
    a = ap.parse_args(argv)
    model = RFNet.from_pretrained(a.model).eval()
    samples = load_samples(a.manifest, split=False)
    data = prepare_inspection_data(samples, model.config, progress=False)
    threshold = model.config.accept_threshold
    result = {"model": str(a.model), "manifest": str(a.manifest), "n": len(data)}
    for name, probs in readouts(model, data).items():
        at = evaluate_rfnet(probs, data.labels, data.classes, threshold)
        top = evaluate_rfnet(probs, data.labels, data.classes, None)
        result[name] = {"at_threshold": at, "most_probable_accuracy": top["accuracy"]}
        print(
            f"{name}: six classes {100 * at['accuracy']:.2f}% at threshold {threshold}, "
            f"{100 * top['accuracy']:.2f}% most probable; Available P/R "
            f"{100 * at['precision']:.1f}/{100 * at['recall']:.1f}"
        )
    write_json_atomic(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
