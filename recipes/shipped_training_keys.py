"""Write ``training_keys.parquet`` into every shipped model folder, from the data that
MODELS.md says each was trained, validated or chosen on.

The shipped models were trained before runs recorded their keys. AdWorld items are pure
functions of (seed, index, class balance), so the products and prompts each model saw can be
drawn again exactly, in memory, without writing images. Over-inclusion is the safe side: a
world a model was only partly trained on (its 80/10/10 split by product) is recorded whole,
so the held-out check can only be stricter than the truth; the one exception is Social
Reward's community, whose test prompts are excluded by the same split hash that curation
uses (``data/sql/curation_5_pairs.sql``), because MODELS.md reports on them.

    python recipes/shipped_training_keys.py [--models DIR] [--only rfnet,rfnet-paper]
    # all: about 10 minutes on 1 core
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rewardkit.data.keys import TrainingKeys, prompt_key, write_training_keys
from rewardkit.world.pool import _feasible_product
from rewardkit.world.sampler import class_for_index, parse_balance, sample_item, spread_for_index

B_RFNET = (
    "Available=0.25,Size Mismatch=0.25,Space Mismatch=0.125,Indistinctiveness=0.125,"
    "Shape Hallucination=0.125,Unsuitable=0.125"
)
B_GEN = (
    "Available=0.5,Space Mismatch=0.14,Size Mismatch=0.12,Indistinctiveness=0.12,"
    "Shape Hallucination=0.12"
)
B_HELDOUT = "Available=0.97,Unsuitable=0.03"

# (seed, n, balance): the AdWorld worlds of MODELS.md, by what they were used for.
PRETRAIN = (101, 6000, None)  # dual encoder, aesthetic head, depth/saliency, RFNet
RFNET_HARD = (303, 14000, B_RFNET)  # RFNet
GEN_TRAIN = (303, 16000, B_GEN)  # generator (and the RFFT runs' first 2,000 products)
GEN_HELDOUT = (404, 300, B_HELDOUT)  # every generator table chose on it: selection
RFFT_PROBE = (505, 64, B_HELDOUT)  # RFFT probes: selection
COMMUNITY = (7, 500)  # Social Reward's community: seed, prompts
# Issue 23: products the shipped rfnet was fine-tuned on (painted by the generators), all three
# pooled and split 80/10/10 by product by `train rfnet` (recorded whole; 1,600 of the 2,000
# loop products were painted).
I23_TRAIN = (23001, 3000, B_HELDOUT)
I23_VAL = (23002, 400, B_HELDOUT)
I23_LOOP = (23003, 2000, B_HELDOUT)
I23_MORE = (23005, 2000, B_HELDOUT)  # 2026-12-03: 2,000 more generated images
# Products the early-fusion rfnet's operating point for Recurrent Generation was chosen on.
I23_RG = (23004, 200, B_HELDOUT)
I23_RFFT_VAL = (23201, 150, B_HELDOUT)  # 2026-12-03: generator-rfft (early-fusion) chosen on it
# 2026-12-06: the test worlds on which the all-weights CC + KL run was confirmed to beat the
# previous generator-rfft before it replaced it (chosen on I23_RFFT_VAL; recorded as selection).
I23_RFFT_TEST_A = (23908, 150, B_HELDOUT)
I23_RFFT_TEST_B = (23909, 150, B_HELDOUT)
I23_MIRROR_VAL = (23301, 400, B_HELDOUT)  # 2026-12-04: rfnet's mirror readout judged (not adopted)
# 2026-12-04: with 23301, the validation of recipes/inspector_readouts.py (nothing adopted)...
I23_READOUT_VAL = (23302, 400, B_HELDOUT)
# ...and the products its fine-tuned candidates were trained on (not adopted; recorded whole).
I23_READOUT_FT = (23303, 2000, B_HELDOUT)
# ...and the renders mixed into two of them (Available and Shape Hallucination, half each).
I23_READOUT_SHAPE = (23304, 800, "Available=0.5,Shape Hallucination=0.5")
# 2026-12-05: renders near the oracle's thresholds (`world render --spread 1`), the pre-training
# of two members of the four-model rfnet (and one member itself): (seed, n, balance, size, spread).
B_NEAR = (
    "Available=0.3,Space Mismatch=0.25,Size Mismatch=0.25,Indistinctiveness=0.066,"
    "Shape Hallucination=0.067,Unsuitable=0.067"
)
I23_NEAR_4K = (8101, 4000, B_NEAR, 64, 1.0)  # pre4k's pre-training
I23_NEAR_VAL = (8102, 800, B_NEAR, 64, 1.0)  # its validation (also drawn at 128 px: same keys)
I23_NEAR_12K = (8111, 12000, B_NEAR, 64, 1.0)  # pre12k's pre-training, and the render member


def world_keys(
    seed: int, n: int, balance: str | None, size: int = 64, spread: float = 0.0
) -> tuple[list, list]:
    """(product keys, prompt keys) of ``rewardkit world render --seed S --n N --balance B
    [--spread F]`` (which items are drawn across the oracle's threshold, as ``render_world``
    picks them)."""
    from rewardkit.data.keys import product_key

    weights = parse_balance(balance)
    products, prompts = [], []
    for i in tqdm(range(n), desc=f"world {seed}", unit="item"):
        spread_i = spread_for_index(seed, i, spread)
        item = sample_item(seed, i, size, class_for_index(seed, i, weights), spread=spread_i)
        products.append(product_key(item.cutout, item.product.height_cm))
        prompts.append(prompt_key(item.render.prompt))
    return products, prompts


def community_prompts(seed: int, n_prompts: int, split_seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, split) of each prompt of the community pool, the split as curation's stage 5
    computes it (prompt texts can repeat across prompt ids)."""
    p = 2147483647
    out = []
    for j in range(n_prompts):
        product, *_ = _feasible_product(np.random.default_rng([seed, j, 7]), f"c{seed}-{j}", 64)
        a = (abs(j) % p * 48271 + split_seed * 69621 + 1) % p
        b = (abs(j) % p * 16807 + split_seed * 48271 + 7) % p
        x = a * b % p
        u = ((x * x + x * split_seed + 12345) % p) / p
        split = "train" if u < 0.8 else "val" if u < 0.9 else "test"
        out.append((f"an ad photo of a {product.caption}", split))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="src/rewardkit/assets/models")
    ap.add_argument("--only", default=None, help="comma-separated folders (default: all)")
    a = ap.parse_args()
    root = Path(a.models)
    only = set(a.only.split(",")) if a.only else None
    t0 = time.perf_counter()
    worlds: dict = {}  # drawn when a model that needs them is written

    def keys(*parts: tuple[tuple, str]) -> TrainingKeys:
        k = TrainingKeys()
        for world, role in parts:
            if world not in worlds:
                worlds[world] = world_keys(*world)
            products, prompts = worlds[world]
            k.add("product", products, role)
            k.add("prompt", prompts, role)
        return k

    def social() -> TrainingKeys:
        k = keys((PRETRAIN, "train"))
        community = TrainingKeys()
        for text, split in community_prompts(*COMMUNITY):
            if split != "test":
                community.add_prompts([text], split)
        k.update(community)
        return k

    pretrain = ((PRETRAIN, "train"),)
    renders = ((PRETRAIN, "train"), (RFNET_HARD, "train"))
    generated = ((I23_TRAIN, "train"), (I23_VAL, "train"), (I23_LOOP, "train"))
    generated_more = (*generated, (I23_MORE, "train"))
    generator = ((GEN_TRAIN, "train"), (GEN_HELDOUT, "selection"))
    tuned = (*generator, (RFFT_PROBE, "selection"))
    # generator-rfft since 2026-12-03: RFFT on I23_TRAIN's first 2,000 products (recorded
    # whole), probed on I23_VAL, chosen on I23_RFFT_VAL; since 2026-12-05 with the four-model
    # rfnet as the reward (CC 300, 200 steps), on the same worlds; since 2026-12-06 every UNet
    # and ControlNet weight trained with CC 300 + KL 10 (lr 1e-4, 200 steps), same worlds, and
    # the two test worlds that confirmed the replacement.
    tuned_ef = (*generator, (I23_TRAIN, "train"), (I23_VAL, "selection"),
                (I23_RFFT_VAL, "selection"), (I23_RFFT_TEST_A, "selection"),
                (I23_RFFT_TEST_B, "selection"))  # fmt: skip
    plan = {
        "dual-encoder": pretrain,
        "aesthetic": pretrain,
        "depth": pretrain,
        "saliency": pretrain,
        "social-reward": social,
        # The early-fusion inspector since 2026-12-05: the average of four (RFNetConfig.ensemble):
        # the earlier rfnet (trained from scratch on the generated images alone), the same
        # recipe pre-trained on I23_NEAR_4K or I23_NEAR_12K, and a model of I23_NEAR_12K alone
        # (validated on I23_NEAR_VAL). The average was chosen on I23_MIRROR_VAL +
        # I23_READOUT_VAL, its Recurrent Generation threshold on I23_RG; earlier readouts and
        # fine-tuned candidates were judged (none adopted) on them with I23_READOUT_FT.
        "rfnet": (
            *generated_more,
            (I23_NEAR_4K, "train"),
            (I23_NEAR_12K, "train"),
            (I23_NEAR_VAL, "selection"),
            (I23_RG, "selection"),
            (I23_MIRROR_VAL, "selection"),
            (I23_READOUT_VAL, "selection"),
            (I23_READOUT_FT, "selection"),
            (I23_READOUT_SHAPE, "selection"),
        ),
        "rfnet-paper": (*renders, *generated),
        "rfnet-renders": renders,
        "rfnet-image-only": renders,
        "generator": generator,
        "generator-rfft": tuned_ef,
        "generator-social": tuned,
    }
    report = {}
    for name, parts in plan.items():
        if (root / name).is_dir() and (only is None or name in only):
            k = parts() if callable(parts) else keys(*parts)
            write_training_keys(root / name, k)
            report[name] = {"products": len(k.products), "prompts": len(k.prompts)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
