"""Generator design figures. Prints JSON.

    python benchmarks/bench_generator.py steps [--threads 1] [--batch-size 32]
    python benchmarks/bench_generator.py vae --vae DIR [--n 300] [--balance "Available=1"]
    python benchmarks/bench_generator.py props --generator DIR --products DIR [--n 300]

``steps``: seconds per training step (UNet + ControlNet forward and backward, random
weights) of the default architecture and of a wider one with cross-attention at 16 and 8 px.
``vae``: how much a VAE's reconstructions (product pasted back) change the oracle's verdicts
on AdWorld renders (``world render --seed 202``, all classes), against the originals, and
their PSNR, and per true class the share whose reconstruction keeps its verdict (with
``--balance "Available=1"``: how many correct scenes survive the decoder, an upper bound on
what a generator decoding through this VAE can reach).
``props``: how a generator sizes the reference props its prompts name ("next to a soda can").
One image per product (the first ``--n`` products, the first-attempt seeds of ``rewardkit eval
generator``); on the prompts that name a prop, the oracle's ``scale_error`` (log2 of the
painted prop's height over the height the scene needs, from the product's real height and its
height in pixels). Reported: its mean and spread, the share within the oracle's threshold, the
correlation (log scale) between the height a prop needs and the height it was painted, and
the correlation of the error with the product's height relative to its category's geometric
mean over the products manifest (does knowing the product's exact height matter?).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rewardkit.data.keys import OverlapError, check_held_out
from rewardkit.generation.default import GeneratorArch, build_generator, count_parameters


def step_seconds(arch: GeneratorArch, batch: int, repeats: int = 3) -> float:
    gen = build_generator(arch)
    h = arch.resolution // 2 ** (len(arch.vae_channels) - 1)
    x, t = torch.randn(batch, arch.latent_channels, h, h), torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, arch.max_tokens, arch.text_width)
    ctrl = torch.rand(batch, 3, arch.resolution, arch.resolution)
    extra = torch.randn(batch, 1 + arch.latent_channels, h, h)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        down, mid = gen.controlnet(x, t, encoder_hidden_states=text, controlnet_cond=ctrl,
                                   return_dict=False)  # fmt: skip
        out = gen.unet(torch.cat([x, extra], 1), t, encoder_hidden_states=text,
                       down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample  # fmt: skip
        out.pow(2).mean().backward()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))  # the first step warms up


def vae_agreement(vae_dir: str, n: int, balance: str | None = None) -> dict:
    from diffusers import AutoencoderKL

    from rewardkit.generation.product import paste_back, prepare_product
    from rewardkit.io import read_image_rgb, read_image_rgba
    from rewardkit.world.export import render_world
    from rewardkit.world.oracle import label

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    with tempfile.TemporaryDirectory() as tmp:
        rows = render_world(
            Path(tmp), n, seed=202, size=64, balance=balance, progress=False
        ).to_pylist()
        orig = 0
        psnr = []
        kept: dict[str, list[int]] = {}
        changed_to: dict[str, int] = {}
        for r in rows:
            img = read_image_rgb(Path(tmp) / r["path"])
            cut = read_image_rgba(Path(tmp) / r["product_path"])
            x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                out = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample
            rec = ((out + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255 + 0.5
            rec = paste_back(rec.astype(np.uint8), prepare_product(cut, 64, r["fill"]))
            psnr.append(10 * np.log10(255**2 / np.mean((rec.astype(float) - img) ** 2)))
            h = r["product_height_cm"]
            orig += label(cut, img, h, fill=r["fill"])[0] == r["label"]
            verdict = label(cut, rec, h, fill=r["fill"])[0]
            kept.setdefault(r["label"], []).append(int(verdict == r["label"]))
            if verdict != r["label"]:
                changed_to[verdict] = changed_to.get(verdict, 0) + 1
    return {
        "vae": vae_dir,
        "renders": n,
        "balance": balance,
        "verdict_kept_by_class": {c: round(sum(v) / len(v), 4) for c, v in sorted(kept.items())},
        "changed_verdicts_to": dict(sorted(changed_to.items())),
        "psnr_db_pasted": round(float(np.mean(psnr)), 2),
        "oracle_agreement_original": orig / n,
        "oracle_agreement_reconstruction": sum(map(sum, kept.values())) / n,
    }


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    return round(float(np.corrcoef(a, b)[0, 1]), 3) if len(a) > 2 else None


def prop_sizes(
    generator: str, products: str, n: int, batch_size: int = 16, allow_overlap: bool = False
) -> dict:
    import pyarrow.parquet as pq

    from rewardkit.generation.evaluate import generate_images
    from rewardkit.generation.pipeline import AdGenerator, generator_resolution
    from rewardkit.generation.recurrent import attempt_seed
    from rewardkit.generation.run import load_jobs, sampler_for
    from rewardkit.world.oracle import Thresholds, label
    from rewardkit.world.placement import place_product
    from rewardkit.world.scene import PROPS

    manifest = Path(products)
    manifest = manifest / "manifest.parquet" if manifest.is_dir() else manifest
    table = pq.read_table(manifest, columns=["product_path", "category", "product_height_cm"])
    logs: dict[str, list[float]] = {}
    cats, heights = table["category"].to_pylist(), table["product_height_cm"].to_pylist()
    for c, h in zip(cats, heights, strict=True):
        logs.setdefault(c, []).append(np.log2(h))
    cat_mean = {c: float(np.mean(v)) for c, v in logs.items()}
    # log2 of each product's height over its category's geometric mean, by product id
    paths = table["product_path"].to_pylist()
    rel_of = {Path(p).stem: np.log2(h) - cat_mean[c]
              for p, c, h in zip(paths, cats, heights, strict=True)}  # fmt: skip
    size = generator_resolution(generator)
    jobs, _ = load_jobs(manifest, size, limit=n)
    held_out = check_held_out(
        {"generator": generator}, [j.product_key for j in jobs], [j.prompt for j in jobs],
        allow_overlap=allow_overlap, where=str(manifest),
    )  # fmt: skip
    gen = AdGenerator.from_pretrained(generator)
    images = generate_images(gen, [j.prepared for j in jobs], [j.prompt for j in jobs],
                             [attempt_seed(0, i, 1) for i in range(len(jobs))],
                             sampler_for(generator), batch_size)  # fmt: skip
    named, verdicts, err, need, rel, real, scale = 0, {}, [], [], [], [], []
    for j, img in zip(jobs, images, strict=True):
        if not any(k in j.prompt for k in PROPS):
            continue
        named += 1
        verdict, m = label(j.photo, img, j.height_cm, fill=j.fill)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        e, kind = m["scale_error"], m["prop_kind"]
        if not kind or np.isnan(e):
            continue
        px = place_product(j.photo, size, j.fill)[1].height
        err.append(e)
        need.append(np.log2(PROPS[kind][0] * px / j.height_cm))
        rel.append(rel_of[j.product_id])
        real.append(np.log2(PROPS[kind][0]))  # the prop's real height (cm), from its word
        scale.append(np.log2(px / j.height_cm))  # the product's pixels per cm in the image
    e, need_a, rel_a = np.array(err), np.array(need), np.array(rel)
    real_a, scale_a = np.array(real), np.array(scale)
    limit = Thresholds().scale_error
    stats = {  # rounded below; None when no prop was measured
        "scale_error_mean": lambda: e.mean(),
        "scale_error_sd": lambda: e.std(),
        "within_threshold": lambda: (np.abs(e) <= limit).mean(),
        "needed_height_sd_log2": lambda: need_a.std(),
        "height_within_category_sd_log2": lambda: rel_a.std(),
    }
    return {
        "generator": generator,
        "products": len(jobs),
        "prompts_naming_a_prop": named,
        "verdicts_on_those": dict(sorted(verdicts.items())),
        "props_measured": len(e),
        "threshold_log2": limit,
        **{k: round(float(f()), 3) if len(e) else None for k, f in stats.items()},
        "corr_needed_vs_painted_height": _corr(need_a, need_a + e),
        "corr_error_vs_height_within_category": _corr(rel_a, e),
        # The needed height is the sum of two parts (log2): which does the painting follow?
        "prop_real_height_sd_log2": round(float(real_a.std()), 3) if len(e) else None,
        "product_px_per_cm_sd_log2": round(float(scale_a.std()), 3) if len(e) else None,
        "corr_painted_vs_prop_real_height": _corr(real_a, need_a + e),
        "corr_painted_vs_product_px_per_cm": _corr(scale_a, need_a + e),
        "held_out": held_out.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("steps", "vae", "props"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vae", default=None)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--generator", default=None, help="props: pipeline folder")
    ap.add_argument("--products", default=None, help="props: product manifest or folder")
    ap.add_argument("--balance", default=None, help='render class weights, e.g. "Available=1"')
    ap.add_argument("--allow-overlap", action="store_true", help="props: report on products "
                    "the generator trained or was chosen on")  # fmt: skip
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "vae":
        if not a.vae:
            ap.error("vae needs --vae DIR")
        print(json.dumps(vae_agreement(a.vae, a.n, a.balance), indent=2))
        return
    if a.what == "props":
        if not (a.generator and a.products):
            ap.error("props needs --generator DIR and --products DIR")
        try:
            result = prop_sizes(a.generator, a.products, a.n, allow_overlap=a.allow_overlap)
        except OverlapError as e:
            raise SystemExit(f"bench_generator: error: {e}") from None
        print(json.dumps(result, indent=2))
        return
    archs = {
        "default 32-64-128, cross-attention at 8 px": GeneratorArch(),
        "32-64-128, cross-attention at 16 and 8 px (train generator --cross-attention 16,8)": (
            GeneratorArch(cross_attention_levels=(False, True, True))
        ),
        "64-128-192, cross-attention at 16 and 8 px": GeneratorArch(
            unet_channels=(64, 128, 192), cross_attention_levels=(False, True, True)
        ),
    }
    out = {"threads": a.threads, "batch_size": a.batch_size}
    for name, arch in archs.items():
        out[name] = {
            "seconds_per_step": round(step_seconds(arch, a.batch_size), 2),
            "parameters": count_parameters(build_generator(arch)),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
