"""The demo's RFNet stage: inspect the demo's renders with the shipped inspector.

The renders of the demo's first stage are products the shipped RFNet never saw. The stage
inspects them (clean and degraded) with the shipped inspector (early fusion of aligned
inputs, trained on generated images) and compares it with the paper's RFNet fine-tuned on the
same generated images (``rfnet-paper``), the render-trained RFNet it was fine-tuned from and
the shipped image-only baseline; it shows the confusion matrix as a picture and examples of
each verdict, and reprints the baseline and ablation tables measured when the render-trained
models were trained (``MODELS.md`` beside them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from rewardkit.commands.rfnet import (
    agreement_with_oracle,
    load_samples,
    oracle_verdicts,
    predict_on_device,
)
from rewardkit.data.keys import check_held_out
from rewardkit.demo.run import held_out_note
from rewardkit.io import read_image_rgb
from rewardkit.models.defaults import default_model_path
from rewardkit.models.rfnet import RFNet, verdict_indices
from rewardkit.report.html import card, esc, figure_tag, table_html
from rewardkit.training.rfnet import (
    VARIANTS,
    degrade_inspection_data,
    evaluate_rfnet,
    prepare_inspection_data,
)

EXAMPLES_PER_VERDICT = 5


def _confusion_figure(confusion: list[list[int]], classes: list[str], title: str) -> str:
    from rewardkit.demo.run import _plt

    plt = _plt()
    m = np.asarray(confusion, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    short = [c.replace(" Mismatch", "").replace("Shape ", "").replace("ness", "") for c in classes]
    ax.set_xticks(range(len(classes)), short, rotation=35, ha="right")
    ax.set_yticks(range(len(classes)), short)
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color=colour, fontsize=8)
    ax.set(xlabel="RFNet verdict", ylabel="truth", title=title)
    return figure_tag(fig)


def rfnet_section(
    out: Path,
    timings: dict,
    allow_overlap: bool = False,
    device: str = "cpu",
    mixed_precision: str = "no",
) -> tuple[str, dict]:
    """Inspect ``out/world`` with the shipped RFNet and its image-only baseline (products
    either model trained on are refused unless ``allow_overlap``), on ``device`` at
    ``mixed_precision``."""
    t = time.perf_counter()
    samples = load_samples(out / "world" / "manifest.parquet", split=False)
    folder = default_model_path("rfnet")
    paper = default_model_path("rfnet-paper")
    renders_only = default_model_path("rfnet-renders")
    baseline = default_model_path("rfnet-image-only")
    held_out = check_held_out(
        {"rfnet": folder, "rfnet-paper": paper, "rfnet-renders": renders_only,
         "rfnet-image-only": baseline},
        product_keys=samples["product_key"].to_pylist(), prompts=samples["prompt"].to_pylist(),
        allow_overlap=allow_overlap, where="demo RFNet stage",
    )  # fmt: skip
    models = {"RFNet (shipped)": RFNet.from_pretrained(folder)}
    models["paper's RFNet, fine-tuned on generated images (rfnet-paper)"] = RFNet.from_pretrained(
        paper
    )
    models["paper's RFNet, renders only (rfnet-renders)"] = RFNet.from_pretrained(renders_only)
    models["image-only baseline (shipped)"] = RFNet.from_pretrained(baseline)
    full = next(iter(models.values())).config
    needed = tuple({m for model in models.values() for m in model.config.modalities})
    clean = prepare_inspection_data(samples, full, progress=False, modalities=needed)
    degraded = degrade_inspection_data(clean, seed=1)
    oracle = oracle_verdicts(samples, degraded, progress=False)
    results, probs_full = {}, None
    for name, model in models.items():
        results[name] = {}
        threshold = model.config.accept_threshold  # the model's operating point
        for cond, data in (("clean", clean), ("degraded", degraded)):
            probs = predict_on_device(model, data, None, device, mixed_precision)
            results[name][cond] = evaluate_rfnet(probs, data.labels, data.classes, threshold)
            if oracle is not None:
                verdicts = [
                    data.classes[k] for k in verdict_indices(probs, data.classes, threshold)
                ]
                results[name][cond].update(agreement_with_oracle(verdicts, oracle[cond]))
            if name == "RFNet (shipped)" and cond == "clean":
                probs_full = probs
    timings["inspect"] = time.perf_counter() - t

    rows = []
    for name, r in results.items():
        for cond in ("clean", "degraded"):
            m = r[cond]
            keys = ("precision", "recall", "f1", "ap", "accuracy")
            agree = 100 * m.get("oracle_agreement", float("nan"))
            rows.append([name, cond, m["n"], *(100 * m[k] for k in keys), agree])
    table = table_html(
        ["model", "images", "n", "P %", "R %", "F1 %", "AP %", "accuracy %",
         "agreement with the oracle %"],
        rows,
    )  # fmt: skip
    main = results["RFNet (shipped)"]["clean"]
    figure = _confusion_figure(main["confusion"], main["classes"], "RFNet, clean renders")

    verdicts = verdict_indices(probs_full, clean.classes, full.accept_threshold)
    classes = list(clean.classes)
    gallery = []
    for k, name in enumerate(classes):
        idx = np.nonzero(verdicts == k)[0][:EXAMPLES_PER_VERDICT]
        cards = [
            card(
                read_image_rgb(clean.paths[i]),
                [
                    f"truth: {classes[int(clean.labels[i])]}",
                    f"P({name}) {probs_full[i, k]:.2f}",
                    f"P(Available) {probs_full[i, classes.index('Available')]:.2f}",
                ],
            )  # fmt: skip
            for i in idx
        ]
        body = "".join(cards) if cards else "<p class='muted'>no image got this verdict</p>"
        gallery.append(f"<h4>verdict: {esc(name)} ({int((verdicts == k).sum())})</h4>"
                       f"<div class='grid'>{body}</div>")  # fmt: skip

    measured = folder / "MODELS.md"
    tables = ""
    ablation_file = renders_only / "ablation.md"  # measured on the render-trained pair
    if ablation_file.is_file():
        tables = f"<pre>{esc(ablation_file.read_text())}</pre>"
    body = (
        f"<p>{clean.labels.shape[0]} renders of products the inspector never saw, judged by "
        "the shipped inspector from the image, the product as placed on the canvas and its "
        "mask, the product photo and its height, and by the paper's RFNet from the product "
        "photo, the image, its predicted depth and saliency and the caption "
        "(<code>rewardkit inspect</code>). The shipped inspectors were trained on generated "
        "images, which is what they exist to judge; renders are a harder shift for them "
        "than for the render-trained one. Degraded: the same images blurred, noised and "
        "JPEG-compressed, depth and saliency predicted again. P/R/F1/AP are for Available "
        "vs any defect; accuracy is over all classes (render truth); agreement is with the "
        "AdWorld oracle's verdict on the same image.</p>"
        + held_out_note(held_out)
        + table
        + figure
        + "<h3>Baseline and modality ablation (measured when the render-trained models "
        "were trained)</h3>"
        + (tables or f"<p class='muted'>see {esc(measured)}</p>")
        + "<h3>Examples of each verdict</h3>"
        + "".join(gallery)
    )
    stats = {"results": results, "variants": list(VARIANTS), "held_out": held_out.to_dict()}
    return body, json.loads(json.dumps(stats))
