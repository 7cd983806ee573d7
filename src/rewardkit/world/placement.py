"""Product placement: the one function that puts a product photo on a canvas.

AdWorld's renderer and the generation pipeline both call ``place_product``, so a generated
image and a rendered one put the product on the same pixels, and the oracle can recompute the
placement from the cutout alone. As in the reference pipeline, the product (its alpha bounding
box) is scaled so its longest side spans ``fill`` of the frame, and centred.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_FILL = 0.4  # longest product side / frame side; leaves room for scene and props at 64 px


@dataclass(frozen=True)
class Placement:
    """Where the product lies on a square canvas of ``size`` px: box [x0, x1) x [y0, y1)."""

    size: int
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def alpha_bbox(alpha: np.ndarray, threshold: int = 8) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of alpha > threshold; raises if the photo is empty."""
    ys, xs = np.nonzero(alpha > threshold)
    if len(ys) == 0:
        raise ValueError("product photo has no opaque pixels (empty alpha)")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def compute_placement(cutout: np.ndarray, size: int, fill: float = DEFAULT_FILL) -> Placement:
    """The placement of an RGBA cutout on a ``size`` canvas (see module docstring)."""
    if not 0.05 <= fill <= 1.0:
        raise ValueError(f"fill must be in [0.05, 1], got {fill}")
    x0, y0, x1, y1 = alpha_bbox(cutout[..., 3])
    w, h = x1 - x0, y1 - y0
    scale = fill * size / max(w, h)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    px0, py0 = (size - pw) // 2, (size - ph) // 2
    return Placement(size, px0, py0, px0 + pw, py0 + ph)


def place_product(
    cutout: np.ndarray, size: int, fill: float = DEFAULT_FILL
) -> tuple[np.ndarray, Placement]:
    """Scale and centre an RGBA cutout on a transparent ``size`` x ``size`` layer.

    Returns:
        (layer, placement): layer is (size, size, 4) uint8, transparent outside the product.
    """
    if cutout.ndim != 3 or cutout.shape[2] != 4:
        raise ValueError(f"product cutout must be RGBA (H, W, 4), got shape {cutout.shape}")
    p = compute_placement(cutout, size, fill)
    x0, y0, x1, y1 = alpha_bbox(cutout[..., 3])
    crop = Image.fromarray(np.ascontiguousarray(cutout[y0:y1, x0:x1]), "RGBA")
    # Pillow resizes RGBA in premultiplied form, so transparent colours do not bleed.
    crop = crop.resize((p.width, p.height), Image.Resampling.LANCZOS)
    layer = np.zeros((size, size, 4), np.uint8)
    layer[p.y0 : p.y1, p.x0 : p.x1] = np.asarray(crop)
    return layer, p


def composite(background: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Alpha-composite an RGBA layer over an RGB uint8 background (paste-back)."""
    a = layer[..., 3:4].astype(np.float32) / 255.0
    out = background.astype(np.float32) * (1 - a) + layer[..., :3].astype(np.float32) * a
    return (out + 0.5).astype(np.uint8)


def white_background_to_rgba(rgb: np.ndarray, threshold: int = 245) -> np.ndarray:
    """Turn a product photo on a white background into RGBA, as the reference pipeline does.

    Pixels whose three channels are all >= ``threshold`` become transparent.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    alpha = np.where((rgb >= threshold).all(axis=2), 0, 255).astype(np.uint8)
    return np.dstack([rgb, alpha])


def placed_on_white(cutout: np.ndarray, size: int, fill: float = DEFAULT_FILL) -> np.ndarray:
    """The product as placed on a ``size`` canvas (``place_product``), composited on white,
    with its placement mask as a fourth channel: (size, size, 4) uint8 (RGB on white, alpha).

    This is the aligned input of an early-fusion inspector (``RFNetConfig.aligned``): the
    pixels the generator was asked to keep, in the generated image's frame."""
    layer, _ = place_product(cutout, size, fill)
    a = layer[..., 3:4].astype(np.float32) / 255.0
    rgb = layer[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.concatenate([(rgb + 0.5).astype(np.uint8), layer[..., 3:4]], axis=2)
