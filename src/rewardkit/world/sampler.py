"""Sampling AdWorld items: a product, its photo, a scene of a requested class, the render.

Each item is a pure function of (seed, index): the same seed always gives the same items,
whatever order or subset they are rendered in (so rendering can be split across workers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rewardkit.world.oracle import label as oracle_label
from rewardkit.world.placement import DEFAULT_FILL, place_product
from rewardkit.world.products import Product, damage_cutout, render_cutout, sample_product
from rewardkit.world.scene import CLASSES, Render, render_scene, sample_scene_spec

CUTOUT_SIZE = 192  # product photo resolution; placement scales it to the frame


@dataclass
class Item:
    """One AdWorld sample: the product, its photo (maybe damaged) and the rendered scene."""

    index: int
    product: Product
    cutout: np.ndarray  # RGBA uint8 (CUTOUT_SIZE, CUTOUT_SIZE, 4)
    render: Render
    label: str
    defect: str
    severity: float


def parse_balance(spec: str | dict[str, float] | None) -> dict[str, float]:
    """Class balance from ``"Available=0.5,Space Mismatch=0.1,..."`` or a dict; None = uniform.

    Weights are normalised; a class left out gets weight 0. Raises naming the bad entry.
    """
    if spec is None or spec == "":
        return {c: 1 / len(CLASSES) for c in CLASSES}
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(f"class balance entry {part!r}: expected NAME=WEIGHT")
            k, v = part.split("=", 1)
            try:
                items[k.strip()] = float(v)
            except ValueError:
                raise ValueError(f"class balance entry {part!r}: weight is not a number") from None
        spec = items
    bad = [k for k in spec if k not in CLASSES]
    if bad:
        raise ValueError(f"class balance: unknown class {bad[0]!r}; expected one of {CLASSES}")
    if any(v < 0 for v in spec.values()) or sum(spec.values()) <= 0:
        raise ValueError("class balance: weights must be >= 0 with a positive sum")
    total = sum(spec.values())
    return {c: spec.get(c, 0.0) / total for c in CLASSES}


def class_for_index(seed: int, index: int, balance: dict[str, float]) -> str:
    rng = np.random.default_rng([seed, index, 1])
    probs = np.array([balance[c] for c in CLASSES])
    return CLASSES[int(rng.choice(len(CLASSES), p=probs))]


def spread_for_index(seed: int, index: int, spread: float) -> bool:
    """Whether item ``index`` of world ``seed`` is drawn across the oracle's threshold
    (``sample_item(spread=True)``) when a share ``spread`` of the world is."""
    return spread > 0 and bool(np.random.default_rng([seed, index, 3]).uniform() < spread)


def sample_item(
    seed: int,
    index: int,
    size: int,
    label: str,
    fill: float = DEFAULT_FILL,
    max_tries: int = 50,
    spread: bool = False,
) -> Item:
    """Render item ``index`` of world ``seed`` with class ``label`` at ``size`` px.

    With ``spread`` a Space or Size Mismatch scene is drawn with its defect strength across
    the oracle's threshold (``sample_scene_spec``), and the item's label is the oracle's
    verdict on the rendered pixels, whatever was asked for.
    """
    rng = np.random.default_rng([seed, index, 2])
    for attempt in range(max_tries):
        product = sample_product(rng, f"p{seed}-{index}-{attempt}")
        cutout = render_cutout(product, CUTOUT_SIZE)
        defect, severity = "", 0.0
        if label == "Unsuitable":
            defect = "truncated" if rng.uniform() < 0.5 else "matte"
            severity = float(
                rng.uniform(0.25, 0.45) if defect == "truncated" else rng.uniform(0.2, 0.4)
            )
            cutout = damage_cutout(cutout, defect, severity, rng)
        layer, placement = place_product(cutout, size, fill)
        scene_label = "Available" if label == "Unsuitable" else label
        spec = sample_scene_spec(rng, product, placement, scene_label, layer, size, fill, spread)
        if spec is None:
            continue
        if label == "Unsuitable":
            spec.label, spec.defect, spec.severity = label, defect, severity
        render = render_scene(product, cutout, spec)
        final = label
        if spread:
            final, _ = oracle_label(cutout, render.image, product.height_cm, placement, fill)
        return Item(index, product, cutout, render, final, spec.defect, spec.severity)
    raise RuntimeError(f"could not sample a {label!r} scene at {size}px after {max_tries} tries")
