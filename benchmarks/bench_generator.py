"""Generator design figures. Prints JSON.

    python benchmarks/bench_generator.py steps [--threads 1] [--batch-size 32]
    python benchmarks/bench_generator.py vae --vae DIR [--n 300] [--balance "Available=1"]

``steps``: seconds per training step (UNet + ControlNet forward and backward, random
weights) of the default architecture and of a wider one with cross-attention at 16 and 8 px.
``vae``: how much a VAE's reconstructions (product pasted back) change the oracle's verdicts
on AdWorld renders (``world render --seed 202``, all classes), against the originals, and
their PSNR, and per true class the share whose reconstruction keeps its verdict (with
``--balance "Available=1"``: how many correct scenes survive the decoder, an upper bound on
what a generator decoding through this VAE can reach).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("steps", "vae"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vae", default=None)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--balance", default=None, help='render class weights, e.g. "Available=1"')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "vae":
        if not a.vae:
            ap.error("vae needs --vae DIR")
        print(json.dumps(vae_agreement(a.vae, a.n, a.balance), indent=2))
        return
    archs = {
        "default 32-64-128, cross-attention at 8 px": GeneratorArch(),
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
