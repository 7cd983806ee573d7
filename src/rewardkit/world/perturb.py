"""Image degradations that stand in for the imperfections of generated images.

``degrade`` blurs, adds Gaussian noise and JPEG-compresses an image, each with a strength
drawn from documented ranges. The oracle is checked against render truth on degraded images.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

BLUR_RADIUS = (0.3, 0.7)  # Gaussian blur radius in pixels at 64 px, scaled with image size
NOISE_STD = (2.0, 5.0)  # Gaussian noise std in 0-255 units
JPEG_QUALITY = (70, 95)


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, noise and JPEG-compress an RGB uint8 image (all three, random strengths)."""
    S = image.shape[0]
    radius = float(rng.uniform(*BLUR_RADIUS)) * S / 64
    im = Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(im).astype(np.float32)
    arr += rng.normal(0, rng.uniform(*NOISE_STD), arr.shape).astype(np.float32)
    im = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(rng.integers(*JPEG_QUALITY)))
    with Image.open(io.BytesIO(buf.getvalue())) as out:
        return np.asarray(out.convert("RGB"))
