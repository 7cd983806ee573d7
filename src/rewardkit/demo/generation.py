"""Demo stage: ad generation around new products, first attempts vs Recurrent Generation.

The shipped generator paints backgrounds for held-out products (AdWorld renders of the
Available class give product photos and prompts); the shipped RFNet inspector is the accept
test of Recurrent Generation; the oracle judges every attempt too, so the available rate is
measured against ground truth and the inspector's agreement with it is reported.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rewardkit.data.keys import check_held_out
from rewardkit.demo.run import held_out_note
from rewardkit.generation.pipeline import AdGenerator
from rewardkit.generation.recurrent import (
    AVAILABLE,
    InspectorJudge,
    OracleJudge,
    judge_images,
    recurrent_generate,
)
from rewardkit.generation.run import load_jobs, sampler_for, write_result
from rewardkit.models.defaults import default_model_path
from rewardkit.models.inspector import Inspector
from rewardkit.report.html import card, esc, figure_tag, table_html
from rewardkit.world.export import render_world

__all__ = ["generation_section"]

# New products: no shipped model trained or was chosen on this seed's products (404, the
# seed used before, was the set every generator table chose on; checked by product keys).
PRODUCTS_SEED = 4242
GALLERY = 8


def _curve_figure(curves: dict[str, list[float]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), [100 * y for y in ys], marker="o", label=name)
    ax.set_xlabel("attempts allowed per product")
    ax.set_ylabel("products with an available image, %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_tag(fig)


def generation_section(
    out: Path,
    timings: dict,
    products: int = 24,
    max_attempts: int = 8,
    steps: int | None = None,
    batch_size: int = 16,
    generator: str | Path | None = None,
    allow_overlap: bool = False,
    device: str = "cpu",
    mixed_precision: str = "no",
) -> tuple[str, dict]:
    """Generate for ``products`` new products (``generator``: a pipeline folder; default:
    the embedded generator; without one installed, the section says so and is skipped), on
    ``device`` at ``mixed_precision`` (``rewardkit.commands.devices``)."""
    from rewardkit.commands.devices import autocast, precision_dtype

    t = time.perf_counter()
    if generator is None:
        try:
            generator = default_model_path("generator")
        except FileNotFoundError as err:
            msg = (
                "<p class='muted'>Skipped: no embedded generator in this installation "
                f"({esc(err)}). Pass <code>rewardkit demo --generator DIR</code> or train one "
                "with <code>rewardkit train generator</code>.</p>"
            )
            return msg, {"skipped": str(err)}
    folder = Path(generator)
    gen = AdGenerator.from_pretrained(folder, device, precision_dtype(mixed_precision))
    sampler = sampler_for(folder, steps)
    world = out / "gen_products"
    render_world(world, products, PRODUCTS_SEED, size=gen.resolution, balance="Available=1",
                 progress=False)  # fmt: skip
    jobs, _ = load_jobs(world, gen.resolution)
    held_out = check_held_out(
        {"generator": folder, "rfnet": default_model_path("rfnet")},
        product_keys=[j.product_key for j in jobs], prompts=[j.prompt for j in jobs],
        allow_overlap=allow_overlap, where="demo generation stage",
    )  # fmt: skip
    inspector = InspectorJudge(Inspector.from_pretrained(default_model_path("rfnet"), device))
    with autocast(device, mixed_precision):
        result = recurrent_generate(gen, jobs, inspector, sampler, max_attempts, batch_size, seed=0)
    timings["generate"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = write_result(out / "generated", jobs, result, judged=True)
    oracle_labels, _ = judge_images(OracleJudge(), [a.image for a in result.attempts],
                                    [jobs[a.product] for a in result.attempts])  # fmt: skip
    timings["judge_generated"] = time.perf_counter() - t
    by_attempt = {(a.product, a.attempt): o for a, o in zip(result.attempts, oracle_labels,
                                                            strict=True)}  # fmt: skip
    n = len(jobs)
    first_oracle = sum(by_attempt[(i, 1)] == "Available" for i in range(n)) / n
    returned_oracle = [by_attempt[(a.product, a.attempt)] for a in result.final]
    # Agreement of the inspector's labels, as `inspect` gives them (its operating point), not
    # the loop's stricter accept test: a defect verdict is the most probable defect at any
    # threshold, so only the Available cut moves.
    point = inspector.inspector.accept_threshold
    labels = [a.label if point is None or a.score < point else AVAILABLE for a in result.attempts]
    agree = np.mean([x == o for x, o in zip(labels, oracle_labels, strict=True)])
    # Oracle-available rate of the image returned when k attempts are allowed.
    oracle_curve = []
    for k in range(1, max_attempts + 1):
        ok = 0
        for i in range(n):
            tries = [a for a in result.attempts if a.product == i and a.attempt <= k]
            accepted = [a for a in tries if a.accepted]
            pick = accepted[0] if accepted else max(tries, key=lambda a: a.score)
            ok += by_attempt[(i, pick.attempt)] == "Available"
        oracle_curve.append(ok / n)
    curves = {
        "accepted by the inspector": list(stats["rate_after_attempts"].values()),
        "returned image Available (oracle)": oracle_curve,
    }
    rows = [
        ["first attempt", 100 * stats["first_attempt_rate"], 100 * first_oracle, 1.0],
        [f"Recurrent Generation (<= {max_attempts})", 100 * stats["accepted_rate"],
         100 * oracle_curve[-1], stats["mean_attempts_per_accepted"]],
    ]  # fmt: skip
    table = table_html(
        ["", "accepted by inspector %", "Available by oracle %", "attempts per accepted"],
        rows,
    )
    gallery = []
    for a in result.final[:GALLERY]:
        j = jobs[a.product]
        first = by_attempt[(a.product, 1)]
        first_img = next(b for b in result.attempts if b.product == a.product and b.attempt == 1)
        gallery.append(
            card(
                first_img.image,
                [j.product_id, "attempt 1", f"inspector: {first_img.label}", f"oracle: {first}"],
            )  # fmt: skip
            + card(
                a.image,
                [
                    j.product_id,
                    f"returned: attempt {a.attempt}",
                    f"inspector: {a.label}",
                    f"oracle: {by_attempt[(a.product, a.attempt)]}",
                ],
            )  # fmt: skip
        )
    body = (
        f"<p>{n} products the models never saw, one prompt each; the shipped generator "
        f"({sampler.steps} DDIM steps, guidance {sampler.guidance_scale}) paints the "
        "background, the product pixels are pasted back. Recurrent Generation retries the "
        f"products the RFNet inspector rejects (new seeds, batches refilled), up to "
        f"{max_attempts} attempts. The oracle judges every attempt as ground truth.</p>"
        + held_out_note(held_out)
        + table
        + f"<p>Inspector (at its operating point, as <code>inspect</code> labels) and "
        f"oracle agree on {100 * agree:.1f}% of the {len(result.attempts)} generated images; "
        + (
            f"the loop accepts at P(Available) &gt;= {inspector.threshold:.3f}.</p>"
            if inspector.threshold is not None
            else "the loop accepts its Available verdicts.</p>"
        )
        + _curve_figure(curves)
        + "<h3>First attempt and returned image, side by side</h3>"
        + f"<div class='grid'>{''.join(gallery)}</div>"
        + f"<p class='muted'>Images, attempts and manifests: {esc(out / 'generated')}</p>"
    )
    summary = {
        "products": n,
        "held_out": held_out.to_dict(),
        "stats": stats,
        "first_attempt_oracle_rate": first_oracle,
        "returned_oracle_rate": oracle_curve[-1],
        "oracle_curve": oracle_curve,
        "inspector_oracle_agreement": float(agree),
        "returned_oracle_labels": returned_oracle,
    }
    return body, summary
