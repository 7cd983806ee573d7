"""Measures of a generator's output used by RFFT's probes and ``rewardkit eval generator``.

Diversity (how much the painted backgrounds vary), documented so numbers can be compared:

- Images are area-averaged to a ``grid`` x ``grid`` raster (16 x 16 by default, so pixel noise
  and sub-cell texture do not count as variety) in RGB [0, 1]; a cell is *background* when no
  product pixel falls in it (the placed product's keep mask, pooled the same way, is 0).
- ``across_seeds``: for each product, the mean over pairs of its images (different seeds) of
  the RMS difference over the cells that are background; averaged over products. It is 0 when
  a product always gets the same background.
- ``across_products``: for each seed index, the mean over pairs of products of the RMS
  difference over the cells that are background in both images; averaged over seeds. It is 0
  when every product gets the same background (the collapse of unregularised reward tuning).
- ``diversity``: the mean of the two.
- ``palette`` (``palette_diversity``): each image's mean background colour (over the same
  background cells), then the RMS difference between those colours over every pair of images
  (all products and seeds). The grid measures above count *where* colours change, so a
  generator that paints every background in one two-tone palette but moves the horizon keeps
  them high; this one falls when the palette collapses.

Appeal: the community's ground-truth appeal (``world.community.expected_appeal``) of each
image's appearance features, and the generic photo-aesthetic rating of the same features.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

__all__ = ["background_diversity", "palette_diversity", "appeal_scores"]


def _pool(a: np.ndarray, grid: int) -> np.ndarray:
    """(..., S, S, C) -> (..., grid, grid, C) by block means (S divisible by grid)."""
    s = a.shape[-3]
    if s % grid:
        raise ValueError(f"image side {s} is not a multiple of the diversity grid {grid}")
    k = s // grid
    shape = (*a.shape[:-3], grid, k, grid, k, a.shape[-1])
    return a.reshape(shape).mean(axis=(-4, -2))


def _rms(a: np.ndarray, b: np.ndarray, cells: np.ndarray) -> float:
    if not cells.any():
        return float("nan")
    d = (a - b)[cells]
    return float(np.sqrt(np.mean(d**2)))


def _pooled_backgrounds(images, keep, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked inputs -> (P, S, g, g, 3) pooled images in [0, 1], (P, g, g) background cells."""
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] != 3:
        raise ValueError(f"images: expected (products, seeds, H, W, 3); got {images.shape}")
    if keep.shape != (images.shape[0], *images.shape[2:4]):
        raise ValueError(
            f"keep: expected {(images.shape[0], *images.shape[2:4])}; got {keep.shape}"
        )
    x = _pool(images.astype(np.float32) / 255.0, grid)
    bg = _pool(np.asarray(keep, np.float32)[..., None], grid)[..., 0] <= 0.0
    return x, bg


def background_diversity(images: np.ndarray, keep: np.ndarray, grid: int = 16) -> dict:
    """Diversity of backgrounds (module docstring).

    Args:
        images: (P, S, H, W, 3) uint8, P products x S seeds (S >= 2 for ``across_seeds``).
        keep: (P, H, W) product masks in [0, 1] (1 = product pixel).
    """
    x, bg = _pooled_backgrounds(images, keep, grid)
    p_n, s_n = x.shape[:2]
    seeds = [
        _rms(x[p, i], x[p, j], bg[p]) for p in range(p_n) for i, j in combinations(range(s_n), 2)
    ]
    prods = [
        _rms(x[i, s], x[j, s], bg[i] & bg[j])
        for s in range(s_n)
        for i, j in combinations(range(p_n), 2)
    ]
    across_seeds = float(np.nanmean(seeds)) if seeds else float("nan")
    across_products = float(np.nanmean(prods)) if prods else float("nan")
    return {
        "across_seeds": across_seeds,
        "across_products": across_products,
        "diversity": float(np.nanmean([across_seeds, across_products])),
        "grid": grid,
    }


def palette_diversity(images: np.ndarray, keep: np.ndarray, grid: int = 16) -> float:
    """Spread of the images' mean background colours (module docstring), same arguments as
    ``background_diversity``; NaN with fewer than two images that show background."""
    x, bg = _pooled_backgrounds(images, keep, grid)
    p_n, s_n = x.shape[:2]
    means = [x[p, s][bg[p]].mean(axis=0) for p in range(p_n) if bg[p].any() for s in range(s_n)]
    if len(means) < 2:
        return float("nan")
    m = np.stack(means)  # (N, 3)
    d2 = ((m[:, None] - m[None]) ** 2).mean(-1)  # mean over channels, (N, N)
    pairs = np.triu_indices(len(m), 1)
    return float(np.sqrt(d2[pairs].mean()))


def appeal_scores(images: np.ndarray, community=None) -> dict[str, np.ndarray]:
    """Per image: the community's ground-truth appeal and the generic aesthetic rating."""
    from rewardkit.world.appearance import appearance_features, generic_aesthetic_rating
    from rewardkit.world.community import expected_appeal

    feats = appearance_features(np.asarray(images))
    return {
        "appeal": expected_appeal(feats, community),
        "aesthetic": generic_aesthetic_rating(feats).astype(np.float64),
    }
