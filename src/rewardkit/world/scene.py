"""AdWorld scenes: a wall, a surface with a top edge, reference props, decor, the product.

Geometry is an eye-level side view. The surface (table, floor or counter) fills the frame
below its top edge; an object stands on it when its bottom row is the edge row. The product
is placed by ``placement.place_product`` (centred), so the scene is built around it: for an
Available image the surface edge is the product's bottom row.

Every scene is rendered Available or with exactly one defect of RF1M and its severity:

- Space Mismatch: the surface edge is off the product's bottom by ``severity`` of the frame,
  floating (edge below the product, wall visible under it) or sunk (edge above it).
- Size Mismatch: a reference prop of known real size is drawn ``severity`` (a factor) too big
  or too small for the product's real size.
- Indistinctiveness: the background takes the product's colour (camouflage) or dense clutter
  crowds the product.
- Shape Hallucination: the background extends the product's silhouette in its own colour
  (pedestal, arm or top piece), ``severity`` = extension area / product area.
- Unsuitable: the product photo itself is truncated or badly matted (see products.py).

Reference props are drawn in reserved saturated hues (red can, blue book, green plant, yellow
floor lamp); walls, surfaces and decor are muted so that props are recognisable from pixels.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from rewardkit.world.placement import DEFAULT_FILL, Placement, composite, place_product
from rewardkit.world.products import PRODUCT_COLOURS, Product

CLASSES: tuple[str, ...] = (
    "Available",
    "Space Mismatch",
    "Size Mismatch",
    "Indistinctiveness",
    "Shape Hallucination",
    "Unsuitable",
)

# Reference props: real height (cm), width/height, colour (a reserved saturated hue).
PROPS: dict[str, tuple[float, float, tuple[int, int, int]]] = {
    "soda can": (12.0, 0.55, (205, 30, 35)),
    "book": (24.0, 0.7, (35, 75, 205)),
    "potted plant": (45.0, 0.65, (40, 165, 60)),
    "floor lamp": (150.0, 0.4, (240, 205, 25)),
}
SURFACES = ("table", "floor", "counter")
WALL_NAMES = {  # hue anchors for naming muted wall colours in prompts
    "warm grey": (0.08, 0.12),
    "sage": (0.3, 0.2),
    "sky blue": (0.58, 0.25),
    "cream": (0.12, 0.2),
    "lilac": (0.78, 0.18),
    "terracotta": (0.03, 0.28),
    "mint": (0.42, 0.2),
    "slate": (0.62, 0.12),
}
RING_FRACTION = 0.08  # oracle's ring width around the product, as a fraction of the frame
MIN_PROP_FRACTION = 0.14  # smallest prop height (frame fraction) the oracle can measure at 64 px


@dataclass
class SceneSpec:
    """Everything sampled for one scene; rendering is a pure function of it and the product."""

    label: str
    defect: str  # "" for Available, else e.g. "floating", "too_big", "camouflage", "pedestal"
    severity: float
    size: int
    fill: float
    edge_y: int  # first surface row, in pixels at `size`
    wall_rgb: tuple[float, float, float]
    surface_rgb: tuple[float, float, float]
    surface: str
    wall_pattern: str
    light: tuple[float, float, float]  # brightness, left-right gradient, warmth
    shadow: bool
    props: list[tuple[str, float, float]] = field(default_factory=list)  # kind, x centre, factor
    decor: list[tuple[str, float, float, float, float, tuple[float, float, float]]] = field(
        default_factory=list
    )  # kind, x0, y0, x1, y1 (fractions), colour
    clutter: list[tuple[str, float, float, float, tuple[float, float, float]]] = field(
        default_factory=list
    )  # kind, x, y, radius (fractions), colour
    extension: tuple[str, float, float, float, float] | None = None  # kind + box (fractions)
    extension_rgb: tuple[float, float, float] | None = None


@dataclass
class Render:
    """A rendered scene: the image and its ground truth."""

    image: np.ndarray  # (S, S, 3) uint8
    depth: np.ndarray  # (S, S) uint8, 255 = nearest (disparity-like, as DPT outputs)
    saliency: np.ndarray  # (S, S) uint8
    layer: np.ndarray  # (S, S, 4) uint8 placed product layer
    placement: Placement
    prompt: str
    spec: SceneSpec


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)))


def product_colours(product: Product) -> list[np.ndarray]:
    cs = [np.array(PRODUCT_COLOURS[product.colour], np.float32) / 255]
    if product.accent != "none":
        cs.append(np.array(PRODUCT_COLOURS[product.accent_colour], np.float32) / 255)
    return cs


def _muted(rng: np.random.Generator, v_range: tuple[float, float]) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.04, 0.28), rng.uniform(*v_range)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)


def _far_from(c: np.ndarray, others: list[np.ndarray], d: float) -> bool:
    # Compare also against the shaded extremes of the product colours (x0.8 and x1.08).
    return all(_dist(c, o * k) >= d for o in others for k in (0.8, 1.0, 1.08))


def _muted_batch(rng: np.random.Generator, n: int, v_range: tuple[float, float]) -> np.ndarray:
    h, s, v = rng.uniform(0, 1, n), rng.uniform(0.04, 0.28, n), rng.uniform(*v_range, n)
    return np.array([colorsys.hsv_to_rgb(*x) for x in zip(h, s, v, strict=True)], np.float32)


def _min_dist(cands: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
    refs = np.stack([o * k for o in others for k in (0.8, 1.0, 1.08)])  # (R, 3)
    return np.linalg.norm(cands[:, None] - refs[None], axis=-1).min(1)


def _background_colours(rng: np.random.Generator, pcols: list[np.ndarray], n: int = 256):
    """A (wall, surface) pair: far from the product's colours (also in shade), apart from
    each other, and with the surface's shadow far from the product too. None if no candidate
    among ``n`` works (a product whose colours leave no muted background)."""
    walls = _muted_batch(rng, n, (0.4, 0.95))
    surfs = _muted_batch(rng, n, (0.25, 0.85))
    ok_w = _min_dist(walls, pcols) >= 0.38
    ok_s = (_min_dist(surfs, pcols) >= 0.38) & (_min_dist(surfs * 0.72, pcols) >= 0.3)
    if not ok_w.any() or not ok_s.any():
        return None
    w, sf = walls[ok_w], surfs[ok_s]
    pair_ok = np.linalg.norm(w[:, None] - sf[None], axis=-1) >= 0.3
    if not pair_ok.any():
        return None
    i, j = np.argwhere(pair_ok)[0]
    return w[i], sf[j]


def wall_name(rgb: tuple[float, float, float]) -> str:
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    if s < 0.08:
        return "white" if v > 0.8 else ("grey" if v > 0.45 else "charcoal")
    best = min(
        WALL_NAMES, key=lambda n: min(abs(h - WALL_NAMES[n][0]), 1 - abs(h - WALL_NAMES[n][0]))
    )
    return best


def sample_scene_spec(
    rng: np.random.Generator,
    product: Product,
    placement: Placement,
    label: str,
    layer: np.ndarray,
    size: int,
    fill: float = DEFAULT_FILL,
    spread: bool = False,
) -> SceneSpec | None:
    """Sample a scene of class ``label`` around a placed product, or None if infeasible.

    Returns None when the product cannot carry this defect at this size (e.g. no reference
    prop fits for Size Mismatch); callers resample the product.

    ``spread=True`` draws the strength of a Space Mismatch (contact gap) or Size Mismatch
    (prop scale) across the oracle's threshold instead of well past it, so the scene may
    turn out Available: its class is then the oracle's verdict (see ``sample_item``).
    Generated images land anywhere on that scale; an inspector trained only on clear-cut
    renders calls a slightly-off prop or edge a defect.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    S = size
    pcols = product_colours(product)
    # Background colours well apart from the product's (so only defects make them similar).
    picked = _background_colours(rng, pcols)
    if picked is None:
        return None
    wall, surf = picked
    light = (
        float(rng.uniform(0.9, 1.08)),
        float(rng.uniform(-0.08, 0.08)),
        float(rng.uniform(-1, 1)),
    )
    spec = SceneSpec(
        label=label,
        defect="",
        severity=0.0,
        size=S,
        fill=fill,
        edge_y=placement.y1,
        wall_rgb=tuple(wall.tolist()),
        surface_rgb=tuple(surf.tolist()),
        surface=SURFACES[rng.integers(len(SURFACES))],
        wall_pattern=("plain", "stripes", "gradient")[rng.integers(3)],
        light=light,
        shadow=True,
    )
    ring = RING_FRACTION * S
    if label == "Space Mismatch":
        floating = rng.uniform() < 0.6
        ph = placement.height
        lo = (0.01 if spread else 0.07) * S
        hi = min(0.2 * S, (0.92 * S - placement.y1) if floating else 0.6 * ph)
        if hi < lo:
            floating = not floating
            hi = min(0.2 * S, (0.92 * S - placement.y1) if floating else 0.6 * ph)
            if hi < lo:
                return None
        gap = max(1, int(round(rng.uniform(lo, hi))))
        spec.defect, spec.severity = ("floating", gap / S) if floating else ("sunk", gap / S)
        spec.edge_y = placement.y1 + gap if floating else placement.y1 - gap
        spec.shadow = False if not floating else bool(rng.uniform() < 0.5)
    if label == "Indistinctiveness":
        if rng.uniform() < 0.5:
            spec.defect = "camouflage"
            base = pcols[0]
            jitter = rng.uniform(-0.05, 0.05, 3).astype(np.float32)
            spec.wall_rgb = tuple(np.clip(base + jitter, 0, 1).tolist())
            # The surface keeps a visible edge but stays close to the product too.
            sign = -1 if base.mean() > 0.5 else 1
            spec.surface_rgb = tuple(np.clip(base + sign * 0.2 + jitter, 0, 1).tolist())
            spec.severity = float(_dist(np.array(spec.wall_rgb), base))
        else:
            spec.defect = "clutter"
            n = int(rng.integers(45, 70))
            spec.severity = float(n)
            for _ in range(n):
                # Scatter shapes in a band around the product box, over the wall and surface.
                ang = rng.uniform(0, 2 * np.pi)
                rad_x = placement.width / 2 + rng.uniform(0.0, 1.6 * ring)
                rad_y = placement.height / 2 + rng.uniform(0.0, 1.6 * ring)
                cx = (placement.x0 + placement.x1) / 2 + np.cos(ang) * rad_x
                cy = (placement.y0 + placement.y1) / 2 + np.sin(ang) * rad_y
                if cy > spec.edge_y - 1:
                    cy = spec.edge_y - 1 - rng.uniform(0, ring)
                col = (
                    pcols[rng.integers(len(pcols))]
                    if rng.uniform() < 0.4
                    else np.array(
                        colorsys.hsv_to_rgb(
                            rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 1.0)
                        ),
                        np.float32,
                    )
                )
                spec.clutter.append(
                    (
                        ("disc", "box", "leaf")[rng.integers(3)],
                        cx / S,
                        cy / S,
                        rng.uniform(0.03, 0.06),
                        tuple(col.tolist()),
                    )
                )
    if label == "Shape Hallucination":
        ext = _sample_extension(rng, placement, layer)
        if ext is None:
            return None
        spec.extension, spec.extension_rgb, spec.severity = ext
        spec.defect = spec.extension[0]
    # Reference props on the surface, beside the product, outside the oracle's ring.
    want_prop = label == "Size Mismatch" or (label != "Indistinctiveness" and rng.uniform() < 0.6)
    if want_prop:
        prop = _sample_prop(rng, product, placement, spec, label == "Size Mismatch", spread)
        if prop is None and label == "Size Mismatch":
            return None
        if prop is not None:
            spec.props.append(prop)
            if label == "Size Mismatch":
                spec.defect = "too_big" if prop[2] > 1 else "too_small"
                spec.severity = prop[2]
    if label != "Indistinctiveness" or spec.defect != "camouflage":
        _sample_decor(rng, spec, placement)
    return spec


def _sample_extension(rng: np.random.Generator, p: Placement, layer: np.ndarray):
    S = p.size
    area = float((layer[..., 3] > 127).sum())
    frac = float(rng.uniform(0.3, 0.6))
    target = frac * area
    kind = ("pedestal", "arm", "top")[rng.integers(3)]
    cx = (p.x0 + p.x1) / 2
    if kind == "pedestal":
        h = max(0.05 * S, min(0.3 * p.height, 0.08 * S))
        w = p.width + target / h  # the part behind the product is hidden: count what shows
        box = (cx - w / 2, p.y1 - h, cx + w / 2, p.y1)
        zone = layer[p.y1 - max(2, int(h)) : p.y1, p.x0 : p.x1]
    elif kind == "arm":
        t = max(0.05 * S, min(0.25 * p.height, 0.08 * S))
        length = target / t
        # Attach where the silhouette reaches the side of its box, so the arm shows whole.
        right = rng.uniform() < 0.5
        col = p.x1 - 1 if right else p.x0
        rows = np.nonzero(layer[p.y0 : p.y1, col, 3] > 127)[0] + p.y0
        rows = rows[(rows >= p.y0 + t) & (rows <= p.y1 - t)]
        if len(rows) == 0:
            return None
        ym = float(rows[rng.integers(len(rows))])
        box = (
            (col - 1, ym - t / 2, col + length, ym + t / 2)
            if right
            else (col - length, ym - t / 2, col + 2, ym + t / 2)
        )
        zone = layer[int(ym - t / 2) : int(ym + t / 2) + 1, max(0, col - 3) : col + 4]
    else:
        t = max(0.05 * S, min(0.35 * p.width, 0.1 * S))
        length = target / t
        # Attach at the product's highest point.
        top = p.y0
        cols = np.nonzero(layer[top, :, 3] > 127)[0]
        if len(cols) == 0:
            return None
        tx = float(np.median(cols))
        box = (tx - t / 2, top - length, tx + t / 2, top + 2)
        zone = layer[top : top + 3, int(tx - t / 2) : int(tx + t / 2) + 1]
    x0, y0, x1, y1 = box
    if x0 < 1 or y0 < 1 or x1 > S - 1 or y1 > S - 1:
        return None
    pix = zone[zone[..., 3] > 200][:, :3]
    if len(pix) == 0:
        return None
    rgb = np.median(pix, axis=0) / 255
    return (kind, x0 / S, y0 / S, x1 / S, y1 / S), tuple(rgb.tolist()), frac


def _sample_prop(
    rng, product: Product, p: Placement, spec: SceneSpec, mismatch: bool, spread: bool = False
):
    S = p.size
    px_per_cm = p.height / product.height_cm
    ring = RING_FRACTION * S
    sides = [(1.0, p.x0 - ring - 2.0), (p.x1 + ring + 2.0, S - 1.0)]  # free x ranges
    options = []
    for kind, (h_cm, aspect, _) in PROPS.items():
        if mismatch and spread:  # log2 scale across the oracle's +-0.45 on both sides
            factors = [float(2 ** rng.uniform(0.0, 1.2)), float(2 ** -rng.uniform(0.0, 1.25))]
        elif mismatch:
            factors = [float(rng.uniform(1.7, 2.3)), float(rng.uniform(0.42, 0.58))]
        else:
            factors = [float(rng.uniform(0.92, 1.08))]
        for k in factors:
            h = h_cm * px_per_cm * k
            w = aspect * h
            if h < MIN_PROP_FRACTION * S or h > spec.edge_y - 0.05 * S:
                continue
            for a, b in sides:
                if b - a >= w + 1:
                    options.append((kind, a, b, w, k))
    if not options:
        return None
    kind, a, b, w, k = options[rng.integers(len(options))]
    xc = rng.uniform(a + w / 2, b - w / 2)
    return (kind, xc / S, k)


def _sample_decor(rng: np.random.Generator, spec: SceneSpec, p: Placement) -> None:
    """Wall decor (frames, shelves) away from the product ring, the borders and the edge."""
    S = spec.size
    ring = RING_FRACTION * S
    for _ in range(int(rng.integers(0, 3))):
        w, h = rng.uniform(0.1, 0.22) * S, rng.uniform(0.08, 0.18) * S
        x0 = rng.uniform(0.1 * S, 0.9 * S - w)
        y0 = rng.uniform(0.04 * S, max(0.05 * S, spec.edge_y - 0.1 * S - h))
        # Keep clear of the product's ring.
        if x0 < p.x1 + 2 * ring and x0 + w > p.x0 - 2 * ring and y0 + h > p.y0 - 2 * ring:
            continue
        if y0 + h > spec.edge_y - 0.06 * S:
            continue
        col = _muted(rng, (0.3, 0.9))
        spec.decor.append(
            (
                ("frame", "shelf", "window")[rng.integers(3)],
                x0 / S,
                y0 / S,
                (x0 + w) / S,
                (y0 + h) / S,
                tuple(col.tolist()),
            )
        )


SUPERSAMPLE = 4


def render_scene(product: Product, cutout: np.ndarray, spec: SceneSpec) -> Render:
    """Render the image, depth and saliency maps of a scene (deterministic given the spec)."""
    S = spec.size
    layer, placement = place_product(cutout, S, spec.fill)
    ss = SUPERSAMPLE
    T = S * ss
    yy, xx = np.mgrid[0:T, 0:T].astype(np.float32) / T
    edge = spec.edge_y * ss
    bright, grad, warmth = spec.light
    wall = np.array(spec.wall_rgb, np.float32)
    surf = np.array(spec.surface_rgb, np.float32)
    img = np.empty((T, T, 3), np.float32)
    img[:] = wall
    if spec.wall_pattern == "stripes":
        img *= (1 + 0.025 * np.sign(np.sin(xx * 2 * np.pi * 9)))[..., None]
    elif spec.wall_pattern == "gradient":
        img *= (1.04 - 0.08 * yy)[..., None]
    below = np.arange(T) >= edge
    if spec.surface == "table":
        tex = 1 + 0.02 * np.sin(yy * 260 + 3 * np.sin(xx * 20))
    elif spec.surface == "floor":
        tex = 1 - 0.035 * ((np.mod(xx * 8, 1) < 0.03) | (np.mod(yy * 8, 1) < 0.03))
    else:
        tex = 1 + 0.015 * np.sin(xx * 40 + yy * 70)
    img[below] = surf * tex[below][..., None]
    # Lighting: global brightness, a left-right gradient, a warm/cool tint.
    img *= (bright * (1 + grad * (xx - 0.5) * 2))[..., None]
    img *= np.array([1 + 0.04 * warmth, 1.0, 1 - 0.04 * warmth], np.float32)

    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for kind, x0, y0, x1, y1, col in spec.decor:
        c = tuple(int(v * 255) for v in col)
        box = (x0 * T, y0 * T, x1 * T, y1 * T)
        if kind == "frame":
            d.rectangle(box, outline=c, width=max(1, int(0.015 * T)))
        elif kind == "shelf":
            d.rectangle((box[0], box[3] - 0.02 * T, box[2], box[3]), fill=c)
        else:
            d.rectangle(box, fill=c)
            d.line(
                ((box[0] + box[2]) / 2, box[1], (box[0] + box[2]) / 2, box[3]),
                fill=tuple(int(v * 0.8) for v in c),
                width=max(1, int(0.01 * T)),
            )
    if spec.shadow:
        sy = edge
        sw = placement.width * ss * 0.6
        cx = (placement.x0 + placement.x1) / 2 * ss
        sc = tuple(int(v * 255 * 0.72 * bright) for v in surf)
        d.ellipse((cx - sw, sy - 0.01 * T, cx + sw, sy + 0.025 * T), fill=sc)
    for kind, xc, k in spec.props:
        h_cm, aspect, col = PROPS[kind]
        h = placement.height / product.height_cm * h_cm * k * ss
        w = aspect * h
        x0, x1 = xc * T - w / 2, xc * T + w / 2
        _draw_prop(d, kind, x0, edge - h, x1, edge, col)
    if spec.extension is not None:
        _, x0, y0, x1, y1 = spec.extension
        d.rectangle(
            (x0 * T, y0 * T, x1 * T, y1 * T), fill=tuple(int(v * 255) for v in spec.extension_rgb)
        )
    for kind, x, y, r, col in spec.clutter:
        c = tuple(int(v * 255) for v in col)
        bx = (x * T - r * T, y * T - r * T, x * T + r * T, y * T + r * T)
        if kind == "disc":
            d.ellipse(bx, fill=c)
        elif kind == "box":
            d.rectangle(bx, fill=c)
        else:
            d.polygon([(bx[0], y * T), (x * T, bx[1]), (bx[2], y * T), (x * T, bx[3])], fill=c)
    background = np.asarray(pil.resize((S, S), Image.Resampling.BOX))
    image = composite(background, layer)
    depth, saliency = _truth_maps(spec, placement, layer, product)
    return Render(image, depth, saliency, layer, placement, scene_prompt(product, spec), spec)


def _draw_prop(d: ImageDraw.ImageDraw, kind: str, x0, y0, x1, y1, col) -> None:
    w, h = x1 - x0, y1 - y0
    dark = tuple(int(v * 0.8) for v in col)
    if kind == "soda can":
        d.rounded_rectangle((x0, y0, x1, y1), radius=0.15 * w, fill=col)
        d.rectangle((x0, y0 + 0.45 * h, x1, y0 + 0.55 * h), fill=dark)
    elif kind == "book":
        d.rectangle((x0, y0, x1, y1), fill=col)
        d.rectangle((x0 + 0.08 * w, y0, x0 + 0.16 * w, y1), fill=dark)
    elif kind == "potted plant":
        d.polygon(
            [
                (x0 + 0.2 * w, y1),
                (x0 + 0.1 * w, y0 + 0.6 * h),
                (x1 - 0.1 * w, y0 + 0.6 * h),
                (x1 - 0.2 * w, y1),
            ],
            fill=dark,
        )
        d.ellipse((x0, y0, x1, y0 + 0.7 * h), fill=col)
    else:  # floor lamp: shade, pole, base
        d.polygon(
            [(x0, y0 + 0.3 * h), (x0 + 0.2 * w, y0), (x1 - 0.2 * w, y0), (x1, y0 + 0.3 * h)],
            fill=col,
        )
        d.rectangle((x0 + 0.3 * w, y0 + 0.3 * h, x1 - 0.3 * w, y1), fill=dark)
        d.rectangle((x0 + 0.15 * w, y1 - 0.05 * h, x1 - 0.15 * w, y1), fill=col)


def _truth_maps(spec: SceneSpec, p: Placement, layer: np.ndarray, product: Product):
    S = spec.size
    rows = np.arange(S, dtype=np.float32)[:, None]
    # Disparity-like depth: the wall is far (0.15), the surface comes nearer towards the bottom.
    surf_d = 0.3 + 0.7 * (rows - spec.edge_y) / max(S - spec.edge_y, 1)
    depth = np.where(rows >= spec.edge_y, surf_d, 0.15) * np.ones((1, S), np.float32)
    contact = 0.3 + 0.7 * max(0, p.y1 - spec.edge_y) / max(S - spec.edge_y, 1)
    sal = np.zeros((S, S), np.float32)
    for kind, xc, k in spec.props:
        h_cm, aspect, _ = PROPS[kind]
        h = p.height / product.height_cm * h_cm * k
        w = aspect * h
        xs = slice(max(0, int(xc * S - w / 2)), int(np.ceil(xc * S + w / 2)))
        ys = slice(max(0, int(spec.edge_y - h)), spec.edge_y)
        depth[ys, xs] = 0.3
        sal[ys, xs] = np.maximum(sal[ys, xs], 0.35)
    if spec.extension is not None:
        _, x0, y0, x1, y1 = spec.extension
        ys, xs = slice(int(y0 * S), int(np.ceil(y1 * S))), slice(int(x0 * S), int(np.ceil(x1 * S)))
        depth[ys, xs] = contact
        sal[ys, xs] = 0.8
    a = layer[..., 3].astype(np.float32) / 255
    depth = depth * (1 - a) + contact * a
    visibility = {"camouflage": 0.3, "clutter": 0.5}.get(spec.defect, 1.0)
    sal = np.maximum(sal * (1 - a), a * visibility)
    for _, x, y, r, _ in spec.clutter:
        ys = slice(max(0, int((y - r) * S)), int((y + r) * S) + 1)
        xs = slice(max(0, int((x - r) * S)), int((x + r) * S) + 1)
        sal[ys, xs] = np.maximum(sal[ys, xs], 0.3)
    to8 = lambda m: (np.clip(m, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    return to8(depth), to8(sal)


def prompt_props(prompt: str) -> tuple[str, ...]:
    """The reference props a prompt asks for ("next to a soda can and a book"), as
    ``scene_prompt`` writes them; () when it names none."""
    marker = "next to a "
    at = prompt.find(marker)
    if at < 0:
        return ()
    rest = prompt[at + len(marker) :].split(",")[0]
    return tuple(k for k in (part.strip() for part in rest.split(" and a ")) if k in PROPS)


def scene_prompt(product: Product, spec: SceneSpec) -> str:
    """A text prompt describing the scene (what a designer would write for the generator)."""
    parts = [
        f"a {product.colour} {product.category} on a {spec.surface}",
        f"in front of a {wall_name(spec.wall_rgb)} wall",
    ]
    if spec.props:
        parts.append("next to a " + " and a ".join(k for k, _, _ in spec.props))
    if spec.decor:
        parts.append("with " + ", ".join(sorted({k for k, *_ in spec.decor})) + " on the wall")
    if spec.clutter:
        parts.append("among colourful objects")
    bright, _, warmth = spec.light
    light = ("warm" if warmth > 0.3 else "cool" if warmth < -0.3 else "soft") + (
        " bright" if bright > 1.02 else ""
    )
    parts.append(f"{light} light")
    return ", ".join(parts)
