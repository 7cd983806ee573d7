"""Demo stage: RFFT, the generator fine-tuned with reward gradients, against the original.

Loads the shipped fine-tuned generators (``generator-rfft``: RFNet reward + Consistent
Condition regularisation; ``generator-social``: Social Reward, when shipped), both made by
``rewardkit finetune`` (the commands are in ``assets/models/MODELS.md``), and evaluates them
with the original on new products (``rewardkit eval generator``'s code): first-attempt
available rate by the oracle and by RFNet, background diversity, the community's appeal;
the table, the same products and seeds side by side, and the fine-tuning curves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rewardkit.generation.evaluate import evaluate_generators
from rewardkit.io import read_image_rgb
from rewardkit.models.defaults import default_model_path
from rewardkit.report.html import esc, img_tag, table_html
from rewardkit.world.export import render_world

__all__ = ["rfft_section", "TUNED", "recipe_text"]

PRODUCTS_SEED = 4243  # new products: not the generation stage's, none a model saw (checked)
TUNED = (
    ("RFFT (RFNet + CC + KL)", "generator-rfft"),
    ("RFFT (Social Reward + CC)", "generator-social"),
)


_TRAINED = {
    "controlnet": "ControlNet trained",
    "lora": "LoRA on the UNet and ControlNet",
    "all": "every UNet and ControlNet weight trained",
}


def recipe_text(folder: Path) -> str:
    """How a shipped fine-tuned generator was made, from its ``finetune_summary.json``
    (reward, regularisers, what was trained, lr, steps), so the page says what ships rather
    than what shipped once; "" when the folder has no summary."""
    path = Path(folder) / "finetune_summary.json"
    if not path.is_file():
        return ""
    c = json.loads(path.read_text()).get("config", {})
    reg = c.get("regularizer", "?")
    parts = [f"reward {c.get('reward', '?')}"]
    if reg == "none":
        parts.append("no regulariser")
    else:
        term = {"cc": "Consistent Condition", "kl": "KL"}.get(reg, reg)
        parts.append(f"{term} (beta {c.get('beta', 0):g})")
    if c.get("kl_beta"):
        parts.append(f"KL beside it (beta {c['kl_beta']:g})")
    parts.append(_TRAINED.get(c.get("trainable", "controlnet"), str(c.get("trainable"))))
    parts.append(f"lr {c.get('lr', 0):g}, {c.get('max_steps', '?')} steps")
    return ", ".join(parts)


def rfft_section(
    out: Path,
    timings: dict,
    products: int = 24,
    seeds: int = 2,
    diversity_products: int = 12,
    steps: int | None = None,
    allow_overlap: bool = False,
    device: str = "cpu",
    mixed_precision: str = "no",
) -> tuple[str, dict]:
    """The shipped original and fine-tuned generators on ``products`` new products
    (``steps``: DDIM steps, default the generators' own), on ``device`` at
    ``mixed_precision``."""
    t = time.perf_counter()
    try:
        models = [("Original", default_model_path("generator"))]
    except FileNotFoundError as err:
        return f"<p class='muted'>Skipped: no embedded generator ({esc(err)}).</p>", {
            "skipped": str(err)
        }
    for name, key in TUNED:
        try:
            models.append((name, default_model_path(key)))
        except (FileNotFoundError, ValueError):
            continue
    if len(models) == 1:
        msg = "Skipped: no fine-tuned generator is shipped; make one with rewardkit finetune."
        return f"<p class='muted'>{msg}</p>", {"skipped": msg}
    world = out / "rfft_products"
    render_world(world, products, PRODUCTS_SEED, balance="Available=1", progress=False)
    result = evaluate_generators(
        models, world, out / "rfft_eval", limit=products, seeds=seeds,
        diversity_products=min(diversity_products, products), recurrent_attempts=0,
        batch_size=16, progress=False, steps=steps, allow_overlap=allow_overlap,
        device=device, mixed_precision=mixed_precision,
    )  # fmt: skip
    timings["rfft_eval"] = time.perf_counter() - t
    rows = [
        [
            r["model"],
            100 * r["oracle_available"],
            100 * r["rfnet_available"],
            f"{r['diversity']:.4f} ({r['diversity_vs_base']:.2f}x)",
            f"{r['appeal']:.4f} ± {r['appeal_sd_seeds']:.4f}",
            r["social_score"],
        ]
        for r in result["rows"]
    ]
    table = table_html(
        ["generator", "Available by oracle %", "Available by RFNet %",
         "background diversity (vs original)", "appeal (± sd over seeds)", "Social Reward"],
        rows,
    )  # fmt: skip
    compare = read_image_rgb(result["compare"])
    curves = ""
    for name, folder in models[1:]:
        png = Path(folder) / "rfft_curves.png"
        if png.is_file():
            curves += f"<h3>Fine-tuning curves: {esc(name)}</h3>" + img_tag(read_image_rgb(png))
    body = (
        f"<p>{result['n_products']} new products, one image each with the same seed for every "
        "generator, judged by the oracle (ground truth) and by the RFNet inspector. The "
        "fine-tuned generators were trained by <code>rewardkit finetune</code> (one-step "
        "x0_hat at a random step among the last 30 (RFNet: the image and two shifted, "
        "noised copies averaged) or 10 (Social Reward) of a 40-step DDIM run; commands and the "
        "evaluation on held-out products in MODELS.md): "
        + "; ".join(
            f"{esc(name)}: {esc(recipe_text(folder) or 'no finetune_summary.json')}"
            for name, folder in models[1:]
        )
        + ". Diversity: RMS difference of backgrounds across seeds and "
        f"across products on a 16x16 grid, over {result['diversity_products']} products x "
        f"{result['seeds']} seeds; appeal: the simulated community's ground truth.</p>"
        + f"<p class='muted'>{esc(result['held_out_text'])}.</p>"
        + table
        + "<h3>Same products and seeds: one row per generator</h3>"
        + img_tag(compare, width=min(1100, 3 * compare.shape[1]))
        + curves
    )
    summary = {
        "rows": result["rows"],
        "products": result["n_products"],
        "held_out": result["held_out"],
    }
    return body, summary
