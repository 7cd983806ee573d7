"""Oracle vs render truth: how often the pixel-only oracle names the class the renderer drew."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from rewardkit.world.oracle import label
from rewardkit.world.perturb import degrade
from rewardkit.world.sampler import class_for_index, parse_balance, sample_item
from rewardkit.world.scene import CLASSES


def _judge(args: tuple[int, int, int, bool, dict[str, float]]) -> tuple[str, str]:
    seed, index, size, degraded, weights = args
    truth = class_for_index(seed, index, weights)
    item = sample_item(seed, index, size, truth)
    image = item.render.image
    if degraded:
        image = degrade(image, np.random.default_rng([seed, index, 3]))
    pred, _ = label(item.cutout, image, item.product.height_cm)
    return truth, pred


def oracle_agreement(
    n: int,
    seed: int = 0,
    size: int = 64,
    degraded: bool = False,
    balance: str | dict[str, float] | None = None,
    workers: int = 1,
) -> dict:
    """Render ``n`` items and compare the oracle's class with the render truth.

    Returns a dict with overall ``agreement``, ``per_class`` (truth counts and agreement) and
    the ``confusion`` matrix as {truth: {predicted: count}}.
    """
    weights = parse_balance(balance)
    jobs = [(seed, i, size, degraded, weights) for i in range(n)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            pairs = list(ex.map(_judge, jobs, chunksize=64))
    else:
        pairs = [_judge(j) for j in jobs]
    conf = Counter(pairs)
    per_class = {}
    for c in CLASSES:
        total = sum(v for (t, _), v in conf.items() if t == c)
        per_class[c] = {"n": total, "agreement": conf[(c, c)] / total if total else float("nan")}
    return {
        "n": n,
        "seed": seed,
        "size": size,
        "degraded": degraded,
        "agreement": sum(conf[(c, c)] for c in CLASSES) / n,
        "per_class": per_class,
        "confusion": {t: {p: conf[(t, p)] for p in CLASSES} for t in CLASSES},
    }
