"""Product preparation for ad generation, as the reference pipeline does it.

A product photo (RGBA with alpha, or a photo on a white background) is scaled so its longest
side spans ``fill`` of the frame and centred (``world.placement.place_product``: the renderer,
the oracle and the generator put a product on the same pixels). From the placed layer come:

- ``keep``: the product mask (alpha > 0.5), the pixels that must come out untouched;
- ``inpaint``: the region the generator paints, 1 - keep dilated into the product by a square
  kernel (20 px at 512 px in the reference, scaled with the frame) so the seam is repainted;
- ``control``: Canny edges (thresholds 100/200) of the product alone, on black, 3 channels,
  the ControlNet's condition;
- ``product``: the product composited on mid grey, the image whose latent is blended in at
  every denoising step (eq. 2).

``paste_back`` alpha-composites the product layer over a generated image, so the product
pixels of the result equal the placed photo's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from rewardkit.world.placement import (
    DEFAULT_FILL,
    Placement,
    composite,
    place_product,
    white_background_to_rgba,
)

__all__ = ["PreparedProduct", "prepare_product", "paste_back", "stack_products", "canny_edges"]

CANNY_LOW, CANNY_HIGH = 100, 200
REFERENCE_DILATION = 20 / 512  # the reference pipeline's 20x20 kernel at 512 px


@dataclass
class PreparedProduct:
    """One product placed on a ``size`` x ``size`` canvas, with everything generation needs."""

    layer: np.ndarray  # (S, S, 4) uint8, the placed photo (transparent elsewhere)
    placement: Placement
    keep: np.ndarray  # (S, S) float32 {0, 1}: product pixels
    inpaint: np.ndarray  # (S, S) float32 {0, 1}: pixels the generator paints (dilated)
    control: np.ndarray  # (S, S, 3) uint8 Canny edges of the product only
    product: np.ndarray  # (S, S, 3) uint8, the product on mid grey

    @property
    def size(self) -> int:
        return self.placement.size


def canny_edges(layer: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """Canny edges of a placed RGBA product layer, product only (background black).

    The product is composited on black first so its outline is an edge too; edges outside the
    (slightly grown) product mask are cleared. Returns (S, S, 3) uint8 in {0, 255}.
    """
    rgb = composite(np.zeros(layer.shape[:2] + (3,), np.uint8), layer)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    near = cv2.dilate((layer[..., 3] > 0).astype(np.uint8), np.ones((3, 3), np.uint8))
    edges = np.where(near > 0, edges, 0).astype(np.uint8)
    return np.repeat(edges[..., None], 3, axis=2)


def prepare_product(
    photo: np.ndarray,
    size: int,
    fill: float = DEFAULT_FILL,
    dilation: float = REFERENCE_DILATION,
    white_threshold: int = 245,
) -> PreparedProduct:
    """Place a product photo and derive its masks, control image and blend image.

    Args:
        photo: RGBA uint8 (alpha = product), or RGB uint8 on a white background (pixels with
            all channels >= ``white_threshold`` become transparent).
        size: canvas side in pixels (the generator's resolution).
        fill: longest product side / frame side.
        dilation: inpainting-mask dilation kernel as a fraction of ``size`` (>= 1 px once
            positive; 0 turns it off).
    """
    if photo.ndim != 3 or photo.shape[2] not in (3, 4):
        raise ValueError(f"product photo must be RGB or RGBA (H, W, 3|4), got {photo.shape}")
    if photo.dtype != np.uint8:
        raise ValueError(f"product photo must be uint8, got {photo.dtype}")
    rgba = photo if photo.shape[2] == 4 else white_background_to_rgba(photo, white_threshold)
    layer, placement = place_product(rgba, size, fill)
    keep = (layer[..., 3] >= 128).astype(np.float32)
    background = (1 - keep).astype(np.uint8)
    k = max(1, round(dilation * size)) if dilation > 0 else 0
    if k > 1:
        # Grow the painted region into the product by the kernel: the seam is repainted and
        # then covered by paste-back.
        background = cv2.dilate(background, np.ones((k, k), np.uint8))
    grey = np.full((size, size, 3), 128, np.uint8)
    return PreparedProduct(
        layer=layer,
        placement=placement,
        keep=keep,
        inpaint=background.astype(np.float32),
        control=canny_edges(layer),
        product=composite(grey, layer),
    )


def paste_back(image: np.ndarray, prepared: PreparedProduct) -> np.ndarray:
    """Alpha-composite the placed product over a generated RGB uint8 image."""
    if image.shape != (prepared.size, prepared.size, 3):
        raise ValueError(
            f"generated image has shape {image.shape}; expected {(prepared.size, prepared.size, 3)}"
        )
    return composite(image, prepared.layer)


def stack_products(products: list[PreparedProduct]) -> dict[str, torch.Tensor]:
    """Batch tensors: control and product images in [0, 1] (B, 3, S, S); masks (B, 1, S, S)."""
    if not products:
        raise ValueError("no products to stack")
    sizes = {p.size for p in products}
    if len(sizes) != 1:
        raise ValueError(f"products were prepared at different sizes {sorted(sizes)}")

    def images(key: str) -> torch.Tensor:
        arr = np.stack([getattr(p, key) for p in products])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255

    def masks(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(p, key) for p in products]))[:, None].float()

    return {
        "control": images("control"),
        "product": images("product"),
        "keep": masks("keep"),
        "inpaint": masks("inpaint"),
    }
