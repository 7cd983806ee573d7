"""``rewardkit eval generator``: generators side by side on held-out products.

For every generator (``NAME=DIR``; the first is the base the others are compared with):

- one image per product (the first ``limit`` products; attempt-1 seeds, the same for every
  generator, so rows differ only by the weights), judged by AdWorld's oracle (ground truth)
  and by the RFNet inspector: the first-attempt available rates;
- ``seeds`` images for each of the first ``diversity_products`` products (the first seed is
  the image above): background diversity across seeds and across products
  (``generation.metrics``), and the community's ground-truth appeal and the generic
  aesthetic rating, reported as the mean over seed indices with its standard deviation
  (the spread over seeds); the Social Reward's own score, for reference;
- two guards against collapses the grid diversity does not see: ``palette`` (the spread of
  the backgrounds' mean colours over the same images, ``generation.metrics``) and
  ``prop_painted`` (of the first images whose prompt names reference props, the share where
  the oracle finds one of them standing in the scene: a reward the oracle cannot fault for a
  prop it does not find can be gamed by leaving the prop out);
- with ``recurrent_attempts`` > 0, a "Recurrent Generation" row for the base generator:
  the inspector as accept test, up to that many attempts, the returned images measured the
  same way (diversity across products only: one image per product).

Outputs in ``out``: ``generator_eval.json`` and ``generator_eval.md`` (the table),
``grids/<name>.png`` (products x seeds per generator) and ``compare.png`` (the same products
and seeds, one row per generator).

Every model runs on ``device``; with ``mixed_precision`` (``fp16``/``bf16``) the generators'
weights are cast to it and the inspector and Social Reward run under autocast
(``rewardkit.commands.devices``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from rewardkit.data.keys import check_held_out
from rewardkit.generation.metrics import appeal_scores, background_diversity, palette_diversity
from rewardkit.generation.pipeline import AdGenerator, generate_images, generator_resolution
from rewardkit.generation.recurrent import (
    AVAILABLE,
    InspectorJudge,
    ProductJob,
    attempt_seed,
    judge_images,
    recurrent_generate,
)
from rewardkit.io import write_json_atomic, write_png_atomic, write_text_atomic

__all__ = ["evaluate_generators", "parse_models"]


def parse_models(specs: list[str] | None, default: str | Path) -> list[tuple[str, Path]]:
    """``NAME=DIR`` strings -> [(name, folder)]; none: [("Original", default)]."""
    if not specs:
        return [("Original", Path(default))]
    out = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--model: expected NAME=DIR; got {spec!r}")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--model {name}: {folder} is not a generator folder")
        out.append((name, Path(folder)))
    if len({n for n, _ in out}) != len(out):
        raise ValueError("--model: names must be unique")
    return out


def _oracle(jobs: list[ProductJob], images: list[np.ndarray]) -> tuple[list[str], list[str]]:
    """The oracle's class of each image, and the prop kind it measured ("" for none)."""
    from rewardkit.world.oracle import label

    out = [
        label(j.photo, img, j.height_cm, fill=j.fill) for j, img in zip(jobs, images, strict=True)
    ]
    return [v for v, _ in out], [str(m.get("prop_kind") or "") for _, m in out]


def _grid(images: np.ndarray) -> np.ndarray:
    """(R, C, H, W, 3) -> one image with 2 px white gutters."""
    r, c, h, w, _ = images.shape
    g = 2
    out = np.full((r * (h + g) - g, c * (w + g) - g, 3), 255, np.uint8)
    for i in range(r):
        for k in range(c):
            out[i * (h + g) : i * (h + g) + h, k * (w + g) : k * (w + g) + w] = images[i, k]
    return out


def _social_scores(images: list[np.ndarray], jobs: list[ProductJob], model) -> np.ndarray:
    t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return model(t, [j.prompt for j in jobs]).float().cpu().numpy()


def _measure(
    first: list[np.ndarray],
    extra: np.ndarray | None,
    jobs: list[ProductJob],
    inspector,
    social,
) -> dict:
    """Rates on ``first`` (one per product); diversity and appeal over ``extra`` (P, S, ...)."""
    from rewardkit.world.scene import prompt_props

    oracle, found = _oracle(jobs, first)
    row: dict = {"images": len(first)}
    row["oracle_available"] = float(np.mean([v == AVAILABLE for v in oracle]))
    if inspector is not None:
        labels, _ = judge_images(InspectorJudge.at_operating_point(inspector), first, jobs)
        row["rfnet_available"] = float(np.mean([v == AVAILABLE for v in labels]))
    counts: dict[str, int] = {}
    for v in oracle:
        counts[v] = counts.get(v, 0) + 1
    row["oracle_counts"] = counts
    named = [(prompt_props(j.prompt), k) for j, k in zip(jobs, found, strict=True)]
    named = [(kinds, k) for kinds, k in named if kinds]
    row["props_named"] = len(named)
    row["prop_painted"] = (
        float(np.mean([k in kinds for kinds, k in named])) if named else float("nan")
    )
    if extra is None:
        extra = np.stack(first)[:, None]
    p_n, s_n = extra.shape[:2]
    keep = np.stack([j.prepared.keep for j in jobs[:p_n]])
    row.update(background_diversity(extra, keep))
    row["palette"] = palette_diversity(extra, keep)
    flat = extra.reshape(-1, *extra.shape[2:])
    scores = appeal_scores(flat)
    for key in ("appeal", "aesthetic"):
        per_seed = scores[key].reshape(p_n, s_n).mean(axis=0)
        row[key] = float(per_seed.mean())
        row[f"{key}_sd_seeds"] = float(per_seed.std(ddof=1)) if s_n > 1 else float("nan")
    if social is not None:
        row["social_score"] = float(_social_scores(first, jobs, social).mean())
    return row


def evaluate_generators(
    models: list[tuple[str, Path]],
    products: str | Path,
    out: str | Path,
    inspector: str | Path | None = None,
    social: str | Path | None = None,
    limit: int = 200,
    seeds: int = 4,
    diversity_products: int = 24,
    recurrent_attempts: int = 8,
    grid_products: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    steps: int | None = None,
    allow_overlap: bool = False,
    device: str | torch.device = "cpu",
    mixed_precision: str = "no",
) -> dict:
    """The module docstring's table, grids and JSON (``steps``: DDIM steps, default each
    generator's own). Products that a generator, the inspector or the Social Reward model
    trained or was chosen on raise ``OverlapError`` unless ``allow_overlap``; the overlap is
    reported in the JSON either way. ``device`` and ``mixed_precision``: where and in which
    precision every model runs (module docstring)."""
    from rewardkit.commands.devices import autocast, precision_dtype

    with autocast(device, mixed_precision):
        return _evaluate(
            models, products, out, inspector, social, limit, seeds, diversity_products,
            recurrent_attempts, grid_products, batch_size, seed, progress, steps,
            allow_overlap, device, precision_dtype(mixed_precision),
        )  # fmt: skip


def _evaluate(
    models, products, out, inspector, social, limit, seeds, diversity_products,
    recurrent_attempts, grid_products, batch_size, seed, progress, steps, allow_overlap,
    device, dtype,
) -> dict:  # fmt: skip
    from rewardkit.generation.run import load_jobs, sampler_for
    from rewardkit.models.defaults import default_model_path
    from rewardkit.models.inspector import Inspector
    from rewardkit.models.social_reward import SocialReward

    if seeds < 1 or diversity_products < 1 or limit < 1:
        raise ValueError("limit, seeds and diversity_products must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    insp = Inspector.from_pretrained(inspector or default_model_path("rfnet"), device=device)
    soc = SocialReward.from_pretrained(social or default_model_path("social-reward"), device=device)
    jobs, skipped = load_jobs(products, generator_resolution(models[0][1]), limit=limit)
    if not all(np.isfinite(j.height_cm) for j in jobs):
        raise ValueError(f"{products}: the oracle needs product heights (an AdWorld manifest)")
    held_out = check_held_out(
        {**dict(models), "inspector": inspector or default_model_path("rfnet"),
         "social": social or default_model_path("social-reward")},
        product_keys=[j.product_key for j in jobs], prompts=[j.prompt for j in jobs],
        allow_overlap=allow_overlap, where=str(products),
    )  # fmt: skip
    p_div = min(diversity_products, len(jobs))
    rows, grids = [], []
    first_seeds = [attempt_seed(seed, i, 1) for i in range(len(jobs))]
    for name, folder in models:
        t0 = time.perf_counter()
        gen = AdGenerator.from_pretrained(folder, device, dtype)
        sampler = sampler_for(folder, steps)
        prepared = [j.prepared for j in jobs]
        prompts = [j.prompt for j in jobs]
        first = generate_images(gen, prepared, prompts, first_seeds, sampler, batch_size)
        extra = np.stack(first[:p_div])[:, None]
        if seeds > 1:
            idx = [i for i in range(p_div) for _ in range(seeds - 1)]
            more = generate_images(
                gen, [prepared[i] for i in idx], [prompts[i] for i in idx],
                [attempt_seed(seed, i, k) for i in range(p_div) for k in range(2, seeds + 1)],
                sampler, batch_size,
            )  # fmt: skip
            more_arr = np.stack(more).reshape(p_div, seeds - 1, *more[0].shape)
            extra = np.concatenate([extra, more_arr], axis=1)
        row = {"model": name, "folder": str(folder)}
        row.update(_measure(first, extra, jobs, insp, soc))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        g = min(grid_products, p_div)
        grids.append(extra[:g, 0])
        write_png_atomic(out / "grids" / f"{_slug(name)}.png", _grid(extra[:g].swapaxes(0, 1)))
        if progress:
            print(f"eval generator: {name} done in {row['seconds']} s", flush=True)
        if recurrent_attempts > 0 and name == models[0][0]:
            t0 = time.perf_counter()
            res = recurrent_generate(
                gen, jobs, InspectorJudge(insp), sampler, max_attempts=recurrent_attempts,
                batch_size=batch_size, seed=seed,
            )  # fmt: skip
            final = [a.image for a in res.final]
            rec = {"model": f"Recurrent Generation ({name}, <= {recurrent_attempts})"}
            rec["folder"] = str(folder)
            rec.update(_measure(final, None, jobs, insp, soc))
            rec["rfnet_accepted"] = res.stats()["accepted_rate"]
            rec["attempts_per_product"] = len(res.attempts) / len(jobs)
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(rec)
            if progress:
                print(f"eval generator: recurrent done in {rec['seconds']} s", flush=True)
        del gen
    base = rows[0]
    for r in rows:
        # One image per product (the Recurrent row): compare across products only.
        key = "diversity" if np.isfinite(r["across_seeds"]) else "across_products"
        r["diversity_vs_base"] = r[key] / base[key] if base[key] else None
        r["palette_vs_base"] = r["palette"] / base["palette"] if base["palette"] else None
        r["prop_painted_vs_base"] = (
            r["prop_painted"] / base["prop_painted"] if base["prop_painted"] else None
        )
        r["oracle_gain_points"] = 100 * (r["oracle_available"] - base["oracle_available"])
    write_png_atomic(out / "compare.png", _grid(np.stack(grids)))
    result = {
        "products": str(products),
        "n_products": len(jobs),
        "skipped_products": len(skipped),
        "seeds": seeds,
        "diversity_products": p_div,
        "rows": rows,
        "grids": {name: str(out / "grids" / f"{_slug(name)}.png") for name, _ in models},
        "compare": str(out / "compare.png"),
        "held_out": held_out.to_dict(),
        "held_out_text": held_out.describe(),
    }
    write_json_atomic(out / "generator_eval.json", result)
    write_text_atomic(out / "generator_eval.md", markdown_table(result))
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "model"


def _vs(r: dict, key: str, fmt: str) -> str:
    v, ratio = r.get(key, float("nan")), r.get(f"{key}_vs_base")
    if v is None or not np.isfinite(v):
        return "-"
    return f"{v:{fmt}}" + (f" ({ratio:.2f}x)" if ratio is not None and np.isfinite(ratio) else "")


def _props(r: dict) -> str:
    v = r.get("prop_painted", float("nan"))
    if v is None or not np.isfinite(v):
        return "-"
    return f"{100 * v:.1f}% of {r['props_named']}"


def markdown_table(result: dict) -> str:
    head = (
        "| generator | oracle available | RFNet available | diversity (vs base) | across seeds"
        " | across products | palette (vs base) | prop painted | appeal (sd over seeds) |"
        " aesthetic | social score |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in result["rows"]:

        def pct(k, r=r):
            return f"{100 * r[k]:.1f}%" if k in r else "-"

        sd = r.get("appeal_sd_seeds", float("nan"))
        appeal = f"{r['appeal']:.4f}" + (f" ({sd:.4f})" if np.isfinite(sd) else "")
        lines.append(
            f"| {r['model']} | {pct('oracle_available')} | {pct('rfnet_available')} | "
            f"{r['diversity']:.4f} ({r['diversity_vs_base']:.2f}x) | {r['across_seeds']:.4f} | "
            f"{r['across_products']:.4f} | {_vs(r, 'palette', '.4f')} | {_props(r)} | "
            f"{appeal} | {r['aesthetic']:.3f} | "
            f"{r.get('social_score', float('nan')):.3f} |"
        )
    foot = (
        f"\n{result['n_products']} held-out products, one image each (same seeds for every "
        f"generator); diversity, palette, appeal and aesthetic over the first "
        f"{result['diversity_products']} products x {result['seeds']} seeds; prop painted: of "
        f"the one-per-product images whose prompt names a prop, the share where the oracle "
        f"finds one standing in the scene.\n"
    )
    if "held_out_text" in result:
        foot += f"\n{result['held_out_text']}.\n"
    return head + "\n".join(lines) + "\n" + foot
