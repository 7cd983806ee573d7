"""AdWorld's product catalogue: categories with real-world sizes, parametric silhouettes, cutouts.

A product is a category instance with a real height/width in cm, a main colour, an accent
(stripe, band or dots) and a caption such as "white ceramic mug with a red stripe, 10 cm".
``render_cutout`` draws it as an RGBA photo with a transparent margin (alpha = product mask),
shaded like a lit object. ``damage_cutout`` makes the two kinds of Unsuitable source photo:
truncated by the photo frame, or with a bad matte (semi-transparent holes in the product).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Named colours (sRGB, 0-255). Products use all of them; scenes pick wall/surface colours
# from their own muted palettes (see scene.py) and keep a distance from the product's.
PRODUCT_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 232),
    "black": (34, 34, 38),
    "red": (200, 40, 40),
    "blue": (40, 80, 190),
    "green": (50, 150, 70),
    "yellow": (235, 200, 40),
    "orange": (235, 120, 30),
    "pink": (235, 130, 170),
    "grey": (128, 128, 132),
    "brown": (120, 75, 40),
    "navy": (30, 40, 90),
    "teal": (30, 140, 140),
    "purple": (120, 50, 150),
    "beige": (215, 195, 160),
}

Draw = Callable[[ImageDraw.ImageDraw, float, float, float, float], None]


def _mug(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w = x1 - x0
    body_x1 = x0 + 0.78 * w
    d.rounded_rectangle((x0, y0, body_x1, y1), radius=0.08 * w, fill=255)
    # Handle: a ring on the right whose hole stays transparent.
    hx0, hx1 = body_x1 - 0.1 * w, x1
    hy0, hy1 = y0 + 0.2 * (y1 - y0), y0 + 0.7 * (y1 - y0)
    d.ellipse((hx0, hy0, hx1, hy1), fill=255)
    t = 0.07 * w
    d.ellipse((hx0 + t, hy0 + t, hx1 - t, hy1 - t), fill=0)
    d.rectangle((x0, y0, body_x1, y1), fill=255)


def _bottle(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    d.rounded_rectangle((x0, y0 + 0.38 * h, x1, y1), radius=0.15 * w, fill=255)
    d.polygon(
        [
            (x0, y0 + 0.42 * h),
            (cx - 0.17 * w, y0 + 0.22 * h),
            (cx + 0.17 * w, y0 + 0.22 * h),
            (x1, y0 + 0.42 * h),
        ],
        fill=255,
    )
    d.rectangle((cx - 0.17 * w, y0, cx + 0.17 * w, y0 + 0.25 * h), fill=255)


def _perfume(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    d.rounded_rectangle((x0, y0 + 0.3 * h, x1, y1), radius=0.1 * w, fill=255)
    d.rectangle((cx - 0.12 * w, y0 + 0.18 * h, cx + 0.12 * w, y0 + 0.32 * h), fill=255)
    d.rounded_rectangle((cx - 0.25 * w, y0, cx + 0.25 * w, y0 + 0.2 * h), radius=0.05 * w, fill=255)


def _sneaker(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    d.polygon(
        [
            (x0, y1),
            (x0, y0 + 0.45 * h),
            (x0 + 0.08 * w, y0 + 0.05 * h),
            (x0 + 0.35 * w, y0),
            (x0 + 0.45 * w, y0 + 0.35 * h),
            (x0 + 0.8 * w, y0 + 0.5 * h),
            (x1, y0 + 0.7 * h),
            (x1, y1),
        ],
        fill=255,
    )


def _handbag(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    d.polygon(
        [(x0, y1), (x0 + 0.1 * w, y0 + 0.35 * h), (x1 - 0.1 * w, y0 + 0.35 * h), (x1, y1)],
        fill=255,
    )
    d.arc(
        (x0 + 0.25 * w, y0, x1 - 0.25 * w, y0 + 0.7 * h),
        180,
        360,
        fill=255,
        width=max(2, int(0.06 * w)),
    )


def _table_lamp(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    d.polygon(
        [(x0, y0 + 0.45 * h), (cx - 0.28 * w, y0), (cx + 0.28 * w, y0), (x1, y0 + 0.45 * h)],
        fill=255,
    )
    d.rectangle((cx - 0.05 * w, y0 + 0.45 * h, cx + 0.05 * w, y1 - 0.08 * h), fill=255)
    d.ellipse((cx - 0.35 * w, y1 - 0.14 * h, cx + 0.35 * w, y1), fill=255)


def _chair(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    leg = 0.1 * w
    d.rectangle((x0, y0, x0 + 0.16 * w, y0 + 0.62 * h), fill=255)  # back
    d.rectangle((x0, y0 + 0.5 * h, x1, y0 + 0.62 * h), fill=255)  # seat
    d.rectangle((x0, y0 + 0.6 * h, x0 + leg, y1), fill=255)
    d.rectangle((x1 - leg, y0 + 0.6 * h, x1, y1), fill=255)


def _massage_chair(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    d.rounded_rectangle((x0, y0, x0 + 0.45 * w, y0 + 0.8 * h), radius=0.2 * w, fill=255)
    d.rounded_rectangle((x0 + 0.2 * w, y0 + 0.45 * h, x1, y0 + 0.75 * h), radius=0.1 * w, fill=255)
    d.polygon(
        [(x0 + 0.55 * w, y0 + 0.7 * h), (x1, y0 + 0.7 * h), (x1, y1), (x0 + 0.75 * w, y1)], fill=255
    )
    d.rectangle((x0 + 0.1 * w, y0 + 0.75 * h, x0 + 0.6 * w, y1), fill=255)


def _sofa(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    d.rounded_rectangle((x0 + 0.05 * w, y0, x1 - 0.05 * w, y0 + 0.6 * h), radius=0.1 * h, fill=255)
    d.rounded_rectangle(
        (x0, y0 + 0.35 * h, x0 + 0.12 * w, y0 + 0.85 * h), radius=0.05 * h, fill=255
    )
    d.rounded_rectangle(
        (x1 - 0.12 * w, y0 + 0.35 * h, x1, y0 + 0.85 * h), radius=0.05 * h, fill=255
    )
    d.rectangle((x0 + 0.05 * w, y0 + 0.5 * h, x1 - 0.05 * w, y0 + 0.85 * h), fill=255)
    for fx in (0.07, 0.9):
        d.rectangle((x0 + fx * w, y0 + 0.85 * h, x0 + (fx + 0.03) * w, y1), fill=255)


def _headphones(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    d.arc(
        (x0 + 0.05 * w, y0, x1 - 0.05 * w, y0 + 1.2 * h),
        180,
        360,
        fill=255,
        width=max(2, int(0.1 * w)),
    )
    d.rounded_rectangle((x0, y0 + 0.5 * h, x0 + 0.28 * w, y1), radius=0.08 * w, fill=255)
    d.rounded_rectangle((x1 - 0.28 * w, y0 + 0.5 * h, x1, y1), radius=0.08 * w, fill=255)


def _backpack(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    d.rounded_rectangle((x0, y0 + 0.08 * h, x1, y1), radius=0.25 * w, fill=255)
    d.arc(
        (x0 + 0.3 * w, y0, x1 - 0.3 * w, y0 + 0.2 * h),
        180,
        360,
        fill=255,
        width=max(2, int(0.05 * w)),
    )


def _laptop(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    d.rectangle((x0 + 0.1 * w, y0, x1 - 0.1 * w, y0 + 0.85 * h), fill=255)
    d.polygon(
        [(x0, y1), (x0 + 0.08 * w, y0 + 0.85 * h), (x1 - 0.08 * w, y0 + 0.85 * h), (x1, y1)],
        fill=255,
    )


def _kettle(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    w, h = x1 - x0, y1 - y0
    d.ellipse((x0 + 0.15 * w, y0 + 0.2 * h, x1 - 0.15 * w, y1 + 0.3 * h), fill=255)
    d.polygon(
        [
            (x0 + 0.2 * w, y0 + 0.6 * h),
            (x0, y0 + 0.3 * h),
            (x0 + 0.05 * w, y0 + 0.25 * h),
            (x0 + 0.3 * w, y0 + 0.45 * h),
        ],
        fill=255,
    )
    d.arc(
        (x0 + 0.3 * w, y0, x1 - 0.1 * w, y0 + 0.6 * h),
        200,
        340,
        fill=255,
        width=max(2, int(0.06 * w)),
    )
    # Flat base: cut the ellipse at y1.
    d.rectangle((x0, y1, x1, y1 + h), fill=0)


def _speaker(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    d.rounded_rectangle((x0, y0, x1, y1), radius=0.12 * (x1 - x0), fill=255)


def _washing_machine(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    d.rounded_rectangle((x0, y0, x1, y1), radius=0.05 * (x1 - x0), fill=255)


@dataclass(frozen=True)
class Category:
    """A product category: real-size range, silhouette and caption words."""

    name: str
    height_cm: tuple[float, float]  # real height range of the product
    aspect: tuple[float, float]  # width / height range
    material: str
    draw: Draw


CATEGORIES: tuple[Category, ...] = (
    Category("mug", (8.5, 12.0), (1.15, 1.3), "ceramic", _mug),
    Category("bottle", (22.0, 32.0), (0.28, 0.36), "glass", _bottle),
    Category("perfume", (9.0, 14.0), (0.6, 0.8), "glass", _perfume),
    Category("sneaker", (10.0, 13.0), (2.2, 2.6), "canvas", _sneaker),
    Category("handbag", (24.0, 34.0), (1.0, 1.25), "leather", _handbag),
    Category("table lamp", (40.0, 60.0), (0.55, 0.7), "metal", _table_lamp),
    Category("chair", (80.0, 100.0), (0.5, 0.62), "wooden", _chair),
    Category("massage chair", (110.0, 130.0), (0.75, 0.9), "leather", _massage_chair),
    Category("sofa", (80.0, 95.0), (2.0, 2.4), "fabric", _sofa),
    Category("headphones", (17.0, 22.0), (0.8, 0.95), "plastic", _headphones),
    Category("backpack", (40.0, 50.0), (0.68, 0.8), "nylon", _backpack),
    Category("laptop", (20.0, 25.0), (1.3, 1.45), "aluminium", _laptop),
    Category("kettle", (20.0, 26.0), (1.0, 1.2), "steel", _kettle),
    Category("speaker", (20.0, 40.0), (0.55, 0.7), "plastic", _speaker),
    Category("washing machine", (82.0, 88.0), (0.68, 0.72), "enamel", _washing_machine),
)
CATEGORY_BY_NAME = {c.name: c for c in CATEGORIES}
ACCENTS = ("none", "stripe", "band", "dots")


@dataclass(frozen=True)
class Product:
    """One product instance. Sizes are real-world centimetres."""

    product_id: str
    category: str
    height_cm: float
    width_cm: float
    colour: str
    accent_colour: str
    accent: str  # one of ACCENTS
    texture_seed: int

    @property
    def caption(self) -> str:
        c = CATEGORY_BY_NAME[self.category]
        extra = "" if self.accent == "none" else f" with {self.accent_colour} {self.accent}"
        return f"{self.colour} {c.material} {self.category}{extra}, {self.height_cm:.0f} cm"


def sample_product(
    rng: np.random.Generator, product_id: str, category: str | None = None
) -> Product:
    """Sample a product (optionally of a given category) with colours and real size."""
    cat = CATEGORY_BY_NAME[category] if category else CATEGORIES[rng.integers(len(CATEGORIES))]
    h = float(rng.uniform(*cat.height_cm))
    w = h * float(rng.uniform(*cat.aspect))
    names = list(PRODUCT_COLOURS)
    colour = names[rng.integers(len(names))]
    accent_colour = colour
    while accent_colour == colour:
        accent_colour = names[rng.integers(len(names))]
    accent = ACCENTS[rng.integers(len(ACCENTS))]
    return Product(
        product_id,
        cat.name,
        round(h, 1),
        round(w, 1),
        colour,
        accent_colour,
        accent,
        int(rng.integers(2**31)),
    )


def product_mask(
    product: Product, size: int, margin: float = 0.08, supersample: int = 4
) -> np.ndarray:
    """The product silhouette as float alpha (size, size) in [0, 1], anti-aliased.

    The longest side spans ``1 - 2 * margin`` of the square cutout, centred.
    """
    s = size * supersample
    cat = CATEGORY_BY_NAME[product.category]
    aspect = product.width_cm / product.height_cm
    span = (1 - 2 * margin) * s
    w, h = (span, span / aspect) if aspect >= 1 else (span * aspect, span)
    x0, y0 = (s - w) / 2, (s - h) / 2
    im = Image.new("L", (s, s), 0)
    cat.draw(ImageDraw.Draw(im), x0, y0, x0 + w, y0 + h)
    im = im.resize((size, size), Image.Resampling.BOX)
    return np.asarray(im, dtype=np.float32) / 255.0


def render_cutout(product: Product, size: int = 192) -> np.ndarray:
    """Render the product photo as RGBA uint8 (size, size, 4) with a transparent margin.

    Shading: a cylinder-like horizontal falloff (light from the upper left) plus a slight
    vertical gradient; accents are drawn in the accent colour; a faint texture breaks flatness.
    """
    alpha = product_mask(product, size)
    ys, xs = np.nonzero(alpha > 0.5)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (xx - x0) / max(x1 - x0, 1)  # 0..1 across the product
    v = (yy - y0) / max(y1 - y0, 1)
    base = np.array(PRODUCT_COLOURS[product.colour], np.float32) / 255
    acc = np.array(PRODUCT_COLOURS[product.accent_colour], np.float32) / 255
    rgb = np.broadcast_to(base, (size, size, 3)).copy()
    if product.accent == "stripe":
        sel = (v > 0.45) & (v < 0.58)
    elif product.accent == "band":
        sel = (v > 0.12) & (v < 0.3)
    elif product.accent == "dots":
        sel = (np.sin(u * 40) * np.sin(v * 40)) > 0.75
    else:
        sel = np.zeros((size, size), bool)
    rgb[sel] = acc
    shade = 1.08 - 0.28 * (u - 0.35) ** 2 - 0.1 * v
    rng = np.random.default_rng(product.texture_seed)
    tex = 1 + 0.025 * rng.standard_normal((size, size)).astype(np.float32)
    rgb = np.clip(rgb * (shade * tex)[..., None], 0, 1)
    out = np.dstack([rgb, alpha])
    return (out * 255 + 0.5).astype(np.uint8)


def damage_cutout(
    cutout: np.ndarray, kind: str, severity: float, rng: np.random.Generator
) -> np.ndarray:
    """Make an Unsuitable product photo.

    Args:
        cutout: RGBA uint8 from ``render_cutout``.
        kind: ``"truncated"`` (the photo frame cuts off ``severity`` of the product along one
            side, so the product touches the photo border) or ``"matte"`` (a blob covering about
            ``severity`` of the product becomes semi-transparent, as after bad background removal).
        severity: fraction in (0, 1).
        rng: random source.
    """
    out = cutout.copy()
    a = out[..., 3]
    ys, xs = np.nonzero(a > 127)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if kind == "truncated":
        side = rng.integers(4)
        if side == 0:  # cut on the left: shift the product so its cut edge lies on column 0
            cut = x0 + int(severity * (x1 - x0))
            out = np.roll(out, -cut, axis=1)
            out[:, out.shape[1] - cut :] = 0
        elif side == 1:  # right
            cut = x1 - int(severity * (x1 - x0))
            shift = out.shape[1] - cut
            out = np.roll(out, shift, axis=1)
            out[:, :shift] = 0
        elif side == 2:  # top
            cut = y0 + int(severity * (y1 - y0))
            out = np.roll(out, -cut, axis=0)
            out[out.shape[0] - cut :] = 0
        else:  # bottom
            cut = y1 - int(severity * (y1 - y0))
            shift = out.shape[0] - cut
            out = np.roll(out, shift, axis=0)
            out[:shift] = 0
        return out
    if kind == "matte":
        area = float((a > 127).sum())
        yy, xx = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
        cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
        # Grow an elliptic blob until it covers `severity` of the product.
        ry = rx = 1.0
        ratio = rng.uniform(0.6, 1.6)
        inside = a > 127
        for _ in range(200):
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / (rx * ratio)) ** 2 <= 1
            if (blob & inside).sum() >= severity * area:
                break
            ry += 1
            rx += 1
        level = rng.uniform(0.3, 0.6)
        out[..., 3] = np.where(blob & inside, (a * level).astype(np.uint8), a)
        return out
    raise ValueError(f"damage kind must be 'truncated' or 'matte', got {kind!r}")
