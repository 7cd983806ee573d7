"""Appearance attributes measured from pixels: what the simulated community has tastes over.

Every image is first resampled (area averaging, so a 128 px image and its 64 px version agree)
to a canonical 64 x 64 grid, and RGB is taken in [0, 1]. Luminance is
``Y = 0.299 R + 0.587 G + 0.114 B``. Each feature is a raw statistic mapped to (-1, 1) by
``tanh((raw - centre) / scale)`` with the fixed constants ``_CENTRE`` and ``_SCALE`` (never
per-batch statistics: an image gets the same features in any batch). The centres sit near the
median of AdWorld renders, the scales near their spread. The features:

- ``warmth``: mean of ``R - B`` (red-vs-blue balance). Centre 0, scale 0.25.
- ``saturation``: mean HSV saturation ``(max - min) / max(max, 0.1)`` (value floored at 0.1
  so that noise in near-black pixels does not count as colour). Centre 0.3, scale 0.25.
- ``brightness``: mean luminance. Centre 0.55, scale 0.2.
- ``contrast``: standard deviation of luminance. Centre 0.16, scale 0.1.
- ``colourfulness``: Hasler and Suesstrunk (2003), ``sigma_rgyb + 0.3 mu_rgyb`` with
  ``rg = R - G`` and ``yb = (R + G) / 2 - B`` (their 0-255 scale divided by 255: 0.13 is
  "moderately", 0.32 "highly" colourful). Centre 0.18, scale 0.1.
- ``clutter``: edge density / high-frequency energy,
  ``log(0.005 + mean |dY/dx| + mean |dY/dy|)`` on the luminance at 32 x 32 (2 x 2 block
  means, which makes it robust to resampling blur): flat renders ~ -4, busy scenes ~ -2.7,
  pixel noise ~ -0.9. Centre -3.3, scale 0.7.
- ``centre_focus``: where salient energy sits. Saliency per pixel (at 32 x 32) is the
  luminance gradient magnitude plus the colour distance from the image's mean colour; raw is
  ``(c - b) / (c + b + 0.001)`` with ``c`` the mean saliency inside the central box (the middle
  half of each side, a quarter of the area) and ``b`` the mean over the border. Centre 0.2,
  scale 0.3.
- ``palette_harmony``: how concentrated the hues are. Each pixel's chroma vector in the
  hexagonal hue plane, ``((2R - G - B) / 2, sqrt(3) / 2 (G - B))``, is averaged; raw is
  ``(|mean vector| + 0.02) / (mean |vector| + 0.02)``: 1 for a single hue (or a grey image),
  near 0 for complementary or rainbow palettes. Centre 0.6, scale 0.3.
"""

from __future__ import annotations

import numpy as np

FEATURE_NAMES: tuple[str, ...] = (
    "warmth",
    "saturation",
    "brightness",
    "contrast",
    "colourfulness",
    "clutter",
    "centre_focus",
    "palette_harmony",
)

CANONICAL_SIZE = 64  # every image is area-resampled to this side before measuring
_CHUNK = 256  # images per chunk: (256, 64, 64, 3) float32 is 12 MiB, cache friendly
_CENTRE = np.array([0.0, 0.3, 0.55, 0.16, 0.18, -3.3, 0.2, 0.6], dtype=np.float32)
_SCALE = np.array([0.25, 0.25, 0.2, 0.1, 0.1, 0.7, 0.3, 0.3], dtype=np.float32)


def appearance_features(images: np.ndarray) -> np.ndarray:
    """Measure the appearance attributes of a batch of images from their pixels.

    Args:
        images: (N, H, W, 3) uint8 RGB images, any H and W (resampled to 64 x 64).

    Returns:
        (N, F) float32 array in (-1, 1), columns in the order of ``FEATURE_NAMES``.

    Raises:
        ValueError: if ``images`` is not an (N, H, W, 3) uint8 array.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images: expected an (N, H, W, 3) uint8 array, got {images.dtype} {images.shape}"
        )
    n, h, w, _ = images.shape
    if h < 2 or w < 2:
        raise ValueError(f"images: expected at least 2 x 2 pixels, got {h} x {w}")
    out = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
    rows_h = _area_matrix(h, CANONICAL_SIZE)
    rows_w = _area_matrix(w, CANONICAL_SIZE)
    for start in range(0, n, _CHUNK):
        chunk = images[start : start + _CHUNK]
        # (3, n, H, W) planes: per-channel arithmetic on contiguous arrays is much faster.
        planes = np.ascontiguousarray(chunk.transpose(3, 0, 1, 2)).astype(np.float32)
        planes *= np.float32(1 / 255)
        if (h, w) != (CANONICAL_SIZE, CANONICAL_SIZE):
            planes = _resample(planes, rows_h, rows_w)
        out[start : start + _CHUNK] = _raw_features(planes)
    return np.tanh((out - _CENTRE) / _SCALE).astype(np.float32)


def _area_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) weights of area resampling: each output cell averages the inputs it covers."""
    edges = np.linspace(0.0, src, dst + 1)
    j = np.arange(src, dtype=np.float64)
    lo = np.maximum(j[None, :], edges[:-1, None])
    hi = np.minimum(j[None, :] + 1, edges[1:, None])
    weights = np.clip(hi - lo, 0.0, None) / (edges[1:] - edges[:-1])[:, None]
    return weights.astype(np.float32)


def _resample(planes: np.ndarray, rows_h: np.ndarray, rows_w: np.ndarray) -> np.ndarray:
    """Area-resample (3, n, H, W) planes to (3, n, S, S) with two large matrix products."""
    c, n, h, w = planes.shape
    s = rows_h.shape[0]
    cols = planes.transpose(2, 0, 1, 3).reshape(h, c * n * w)  # (H, 3nW)
    y = (rows_h @ cols).reshape(s * c * n, w) @ rows_w.T  # (S * 3n, S)
    return np.ascontiguousarray(y.reshape(s, c, n, s).transpose(1, 2, 0, 3))  # (3, n, S, S)


def _half(a: np.ndarray) -> np.ndarray:
    """2 x 2 block means over the last two axes (slicing is far faster than a reshape-mean)."""
    return 0.25 * (
        a[..., 0::2, 0::2] + a[..., 1::2, 0::2] + a[..., 0::2, 1::2] + a[..., 1::2, 1::2]
    )


def _raw_features(planes: np.ndarray) -> np.ndarray:
    """Raw (unscaled) statistics of (3, n, S, S) float32 RGB planes in [0, 1] -> (n, 8)."""
    n, s = planes.shape[1], planes.shape[2]
    flat = (n, -1)
    r, g, b = planes[0], planes[1], planes[2]
    lum = 0.299 * r + 0.587 * g + 0.114 * b  # (n, S, S)
    mx = np.maximum(np.maximum(r, g), b)
    chroma = mx - np.minimum(np.minimum(r, g), b)

    warmth = (r - b).reshape(flat).mean(axis=1)
    saturation = (chroma / np.maximum(mx, 0.1)).reshape(flat).mean(axis=1)
    brightness = lum.reshape(flat).mean(axis=1)
    contrast = lum.reshape(flat).std(axis=1)

    rg = (r - g).reshape(flat)
    yb = (0.5 * (r + g) - b).reshape(flat)
    colourfulness = np.sqrt(rg.var(axis=1) + yb.var(axis=1)) + 0.3 * np.sqrt(
        rg.mean(axis=1) ** 2 + yb.mean(axis=1) ** 2
    )

    # Gradients at half the canonical size (2 x 2 means): robust to resampling blur.
    half = _half(lum)  # (n, S/2, S/2)
    gx = np.abs(np.diff(half, axis=2))  # (n, S/2, S/2 - 1)
    gy = np.abs(np.diff(half, axis=1))  # (n, S/2 - 1, S/2)
    clutter = np.log(0.005 + gx.reshape(flat).mean(axis=1) + gy.reshape(flat).mean(axis=1))

    # Saliency at S/2: gradient magnitude (padded back) + distance from the mean colour.
    grad = np.zeros_like(half)
    grad[:, :, :-1] += gx
    grad[:, :-1, :] += gy
    small = _half(planes)  # (3, n, S/2, S/2)
    mean_rgb = small.reshape(3, n, -1).mean(axis=2)[:, :, None, None]
    saliency = grad + np.sqrt(((small - mean_rgb) ** 2).sum(axis=0))  # (n, S/2, S/2)
    h = s // 2
    q0, q1 = h // 4, h - h // 4
    total = saliency.reshape(flat).sum(axis=1)
    centre_sum = saliency[:, q0:q1, q0:q1].reshape(flat).sum(axis=1)
    centre_area = (q1 - q0) ** 2
    c = centre_sum / centre_area
    bd = (total - centre_sum) / (h * h - centre_area)
    centre_focus = (c - bd) / (c + bd + 1e-3)

    hue_a = (r - 0.5 * (g + b)).reshape(flat)  # hexagonal hue plane, magnitude ~ chroma
    hue_b = (0.8660254 * (g - b)).reshape(flat)
    resultant = np.sqrt(hue_a.mean(axis=1) ** 2 + hue_b.mean(axis=1) ** 2)
    spread = np.sqrt(hue_a**2 + hue_b**2).mean(axis=1)
    palette_harmony = (resultant + 0.02) / (spread + 0.02)

    feats = [warmth, saturation, brightness, contrast, colourfulness, clutter]
    return np.stack([*feats, centre_focus, palette_harmony], axis=1).astype(np.float32)


# A generic photo-aesthetic rating over FEATURE_NAMES: what a photography panel (AVA-style
# raters), not this community, rewards: contrast, clean and centred composition, harmony, a
# little brightness; indifferent to warmth, wary of loud saturation. The "aesthetic" baseline
# is fitted to it, as LAION's predictor was fitted to photography ratings rather than to one
# community's remixes; it overlaps the community's taste (clutter, centre, harmony) without
# being it.
GENERIC_AESTHETIC_WEIGHTS: tuple[float, ...] = (0.0, -0.3, 0.3, 0.9, -0.2, -0.8, 0.7, 0.5)


def generic_aesthetic_rating(features: np.ndarray) -> np.ndarray:
    """A 1-10 rating per image from appearance features (N, 8) -> (N,) float32."""
    w = np.asarray(GENERIC_AESTHETIC_WEIGHTS, dtype=np.float32)
    z = features.astype(np.float32) @ w  # (N,)
    return (1.0 + 9.0 / (1.0 + np.exp(-z))).astype(np.float32)
