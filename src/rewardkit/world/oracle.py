"""The AdWorld oracle: labels any image from pixels, given the product photo and its placement.

``label(cutout, image, product_height_cm)`` never reads render parameters; it measures:

===================== ===================================================================
measurement           definition (thresholds in ``Thresholds``)
===================== ===================================================================
truncation            product photo: longest opaque run on a border line of the cutout /
                      the product's extent along it. Catalogue photos have a transparent
                      margin, so > ``truncation`` means the photo frame cut the product.
matte_defect          product photo: share of the product's interior (2 px in from its
                      outline) whose alpha is between 0.15 and 0.85 (bad background removal).
contact_gap           image: (surface top edge row - product bottom row) / frame size. The
                      edge is found in columns at least two ring widths away from the product:
                      median colour per row, scanned from the bottom until it leaves the
                      surface colour (half-way crossing, sub-pixel). > 0 floating, < 0 sunk.
background_similarity image: share of the ring (pixels within ``RING_FRACTION`` of the frame
                      around the product) whose colour is within ``colour_tau`` of the colour
                      of the nearest product pixel. High = the product melts into the scene.
contrast              image: median colour distance between ring pixels and the nearest product
                      pixel; below ``contrast`` the product does not stand out (camouflage).
clutter               image: share of ring pixels whose colour is neither the product's
                      (as above) nor the plain background of their row (median colour of the
                      far columns, within ``colour_tau``): busy surroundings.
hallucinated_area     image: area of product-coloured background (as above, out to 35% of the
                      frame) connected to the product outline, / product area.
scale_error           image: log2(measured / expected height) of the largest reference prop
                      (reserved hue, standing on the surface edge, outside the ring); the
                      expected height follows from the product's real height and pixel
                      height. NaN when no prop is visible.
===================== ===================================================================

Decision order: Unsuitable, Space Mismatch, Indistinctiveness, Shape Hallucination,
Size Mismatch, else Available.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from rewardkit.world.placement import DEFAULT_FILL, Placement, place_product
from rewardkit.world.scene import PROPS, RING_FRACTION


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds; each sits between the Available range and the defect range."""

    truncation: float = 0.03  # clean photos: 0 (transparent margin); truncated: any run
    matte_defect: float = 0.05  # clean: ~0; bad matte: >= 0.15
    contact_gap: float = 0.035  # Available: 0; Space Mismatch: >= 0.07 of the frame
    contrast: float = 0.26  # camouflage renders ~0.1; other classes keep >= 0.38 by design
    clutter: float = 0.25
    hallucinated_area: float = 0.15  # Shape Hallucination renders >= 0.3
    scale_error: float = 0.45  # log2; Available props within x1.08, mismatched beyond x1.7
    colour_tau: float = 0.22  # RGB distance in [0, 1] units under which colours match


MEASUREMENTS = (
    "truncation",
    "matte_defect",
    "contact_gap",
    "background_similarity",
    "contrast",
    "clutter",
    "hallucinated_area",
    "scale_error",
    "prop_kind",
)

# Reserved prop hues (degrees) -> prop kind.
_HUES = {
    "soda can": (-15, 15),
    "floor lamp": (38, 68),
    "potted plant": (95, 150),
    "book": (205, 240),
}


def _rgb_to_hsv(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    mx, mn = img.max(-1), img.min(-1)
    delta = mx - mn + 1e-8
    h = (
        np.where(
            mx == r,
            (g - b) / delta % 6,
            np.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4),
        )
        * 60
    )
    s = np.where(mx > 0, (mx - mn) / (mx + 1e-8), 0)
    return h, s, mx


def photo_measurements(cutout: np.ndarray) -> dict[str, float]:
    """Truncation and matte defect of a product photo (RGBA uint8)."""
    a = cutout[..., 3]
    opaque = a >= 128
    ys, xs = np.nonzero(opaque)
    if len(ys) == 0:
        raise ValueError("product photo has no opaque pixels")
    ext_x, ext_y = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    trunc = max(
        opaque[0].sum() / ext_x,
        opaque[-1].sum() / ext_x,
        opaque[:, 0].sum() / ext_y,
        opaque[:, -1].sum() / ext_y,
    )
    interior = ndimage.binary_erosion(a > 25, iterations=2)
    semi = (a > 38) & (a < 217) & interior
    matte = semi.sum() / max(interior.sum(), 1)
    return {"truncation": float(trunc), "matte_defect": float(matte)}


def _edge_row(img: np.ndarray, cols: np.ndarray) -> float | None:
    """Row (continuous) where the surface starts, from the median colour of ``cols``."""
    if cols.sum() < 2:
        return None
    prof = np.median(img[:, cols], axis=1)  # (S, 3)
    S = len(prof)
    ref = prof[-2:].mean(0)
    d = np.linalg.norm(prof - ref, axis=1)
    crude = np.nonzero(d > 0.12)[0]
    if len(crude) == 0:
        return None
    r = int(crude.max())  # last non-surface row scanning from the bottom
    wall_rows = d[max(0, r - max(3, S // 16)) : r + 1]
    d_wall = float(np.median(wall_rows))
    tau = max(d_wall / 2, 0.06)
    above = np.nonzero(d[: r + 2] > tau)[0]
    r = int(above.max()) if len(above) else r
    return r + min(1.0, float(d[r]) / max(d_wall, 1e-6))


def label(
    cutout: np.ndarray,
    image: np.ndarray,
    product_height_cm: float,
    placement: Placement | None = None,
    fill: float = DEFAULT_FILL,
    thresholds: Thresholds = Thresholds(),
) -> tuple[str, dict[str, float | str]]:
    """Judge one image. Returns (class name, measurements).

    Args:
        cutout: the product photo, RGBA uint8 (alpha = mask).
        image: the ad image, RGB uint8 (S, S, 3).
        product_height_cm: the product's real height (from the catalogue or caption).
        placement: where the product sits; recomputed from the cutout with ``fill`` if None.
        fill: placement fill used when ``placement`` is None.
        thresholds: decision thresholds.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square RGB (S, S, 3), got shape {image.shape}")
    S = image.shape[0]
    m: dict[str, float | str] = dict(photo_measurements(cutout))
    layer, p = place_product(cutout, S, fill)
    if placement is not None and (placement.x0, placement.y0, placement.x1, placement.y1) != (
        p.x0,
        p.y0,
        p.x1,
        p.y1,
    ):
        raise ValueError(f"placement {placement} does not match the cutout placed at fill={fill}")
    # A 3x3 median per channel removes sensor/JPEG noise but keeps edges.
    img = ndimage.median_filter(image, size=(3, 3, 1)).astype(np.float32) / 255
    mask = layer[..., 3] > 127
    ring_r = max(2.0, RING_FRACTION * S)
    dist = ndimage.distance_transform_edt(~mask)
    # Colour source: the product photo itself (clean, unlike the image whose thin parts blur
    # into the background), one step in from the outline where alpha is mixed.
    core = ndimage.binary_erosion(mask) if mask.sum() > 20 else mask
    if not core.any():  # a thin product erodes away at small sizes: keep its pixels
        core = mask
    _, (iy, ix) = ndimage.distance_transform_edt(~core, return_indices=True)
    photo = layer[..., :3].astype(np.float32) / 255
    nearest = photo[iy, ix]
    d_prod = np.linalg.norm(img - nearest, axis=-1)
    sim = d_prod < thresholds.colour_tau

    # Contact gap, from columns well clear of the product on each side.
    far_cols = (dist <= 2 * ring_r).sum(0) == 0
    xs = np.arange(S)
    cx = (p.x0 + p.x1) / 2
    edges = [
        e
        for e in (_edge_row(img, far_cols & (xs < cx)), _edge_row(img, far_cols & (xs > cx)))
        if e is not None
    ]
    edge = float(np.mean(edges)) if edges else float("nan")
    m["contact_gap"] = (edge - p.y1) / S if edges else float("nan")

    ring = (dist > 1.5) & (dist <= ring_r + 1.5)
    m["background_similarity"] = float(sim[ring].mean())
    # Contrast against the nearest product pixel and against the product's dominant colour
    # (for striped or dotted products the nearest pixel may be an accent).
    dominant = np.median(photo[core], axis=0)
    m["contrast"] = float(
        min(np.median(d_prod[ring]), np.median(np.linalg.norm(img[ring] - dominant, axis=-1)))
    )
    # Clutter: ring pixels that look neither like the product nor like the plain background
    # of their row (the row's median colour in the far columns).
    if far_cols.sum() >= 2:
        bg_row = np.median(img[:, far_cols], axis=1)  # (S, 3)
        foreign = (np.linalg.norm(img - bg_row[:, None], axis=-1) > thresholds.colour_tau) & ~sim
    else:
        gy, gx = np.gradient(img, axis=(0, 1))
        foreign = np.sqrt((gx**2 + gy**2).sum(-1)) > 0.25
    m["clutter"] = float(foreign[ring].mean())
    # Skip the first ~2.5 px: blur and JPEG chroma leave a product-coloured halo there.
    near = (dist > 2.5) & (dist <= 0.35 * S)
    comp, n = ndimage.label(sim & near, structure=np.ones((3, 3)))
    touching = np.unique(comp[(dist > 2.5) & (dist <= 3.6) & (comp > 0)])
    touching = touching[touching > 0]
    m["hallucinated_area"] = float(np.isin(comp, touching).sum() / max(mask.sum(), 1)) if n else 0.0

    m["scale_error"], m["prop_kind"] = _scale_error(img, dist, ring_r, edge, p, product_height_cm)
    return decide(m, thresholds), m


def _scale_error(img, dist, ring_r, edge, p: Placement, product_height_cm):
    S = img.shape[0]
    if math.isnan(edge):
        return float("nan"), ""
    h, s, v = _rgb_to_hsv(img)
    h = np.where(h > 330, h - 360, h)  # so the red window is one interval around 0
    allowed = (dist > ring_r + 1) & (np.arange(S)[:, None] < edge + 1)
    best = (0, float("nan"), "")
    for kind, (lo, hi) in _HUES.items():
        cand = allowed & (s >= 0.5) & (v >= 0.3) & (h >= lo) & (h <= hi)
        # Bridge small vertical gaps (a thin lamp pole loses saturation when blurred).
        cand = ndimage.binary_closing(cand, structure=np.ones((5, 1))) & allowed
        comp, n = ndimage.label(cand, structure=np.ones((3, 3)))
        if n == 0:
            continue
        for sl, idx in zip(ndimage.find_objects(comp), range(1, n + 1), strict=True):
            top, bottom = sl[0].start, sl[0].stop
            height = edge - top
            if abs(bottom - edge) > 2 + 0.03 * S or height < 0.08 * S:
                continue
            area = int((comp[sl] == idx).sum())
            if area > best[0]:
                expected = PROPS[kind][0] * p.height / product_height_cm
                best = (area, math.log2(height / expected), kind)
    return best[1], best[2]


def decide(m: dict[str, float | str], t: Thresholds = Thresholds()) -> str:
    """Map measurements to a class, in the documented order."""

    def over(key: str, limit: float) -> bool:
        v = m[key]
        return isinstance(v, float) and not math.isnan(v) and abs(v) > limit

    if over("truncation", t.truncation) or over("matte_defect", t.matte_defect):
        return "Unsuitable"
    if over("contact_gap", t.contact_gap):
        return "Space Mismatch"
    low_contrast = isinstance(m.get("contrast"), float) and m["contrast"] < t.contrast
    if low_contrast or over("clutter", t.clutter):
        return "Indistinctiveness"
    if over("hallucinated_area", t.hallucinated_area):
        return "Shape Hallucination"
    if over("scale_error", t.scale_error):
        return "Size Mismatch"
    return "Available"


def thresholds_table(t: Thresholds = Thresholds()) -> dict[str, float]:
    return asdict(t)


# The oracle's measurements as regression targets for an inspector's measurement heads
# (``RFNetConfig.measurements``, ``train rfnet`` with ``measurement_weight``): each in units of
# its decision threshold, so one loss weighs them alike. "signed": v / limit (|t| > 1 crosses
# it); "offset": (v - limit) / limit (contrast and clutter); "log2": log2 of the ratio to the
# limit (an area of 0 is kept finite by ``TARGET_EPS``). Targets are clipped to +-TARGET_CLIP;
# a measurement the oracle could not take (NaN, e.g. no prop for scale_error) is no target.
TARGET_KINDS = {
    "contact_gap": "signed", "contrast": "offset", "clutter": "offset",
    "hallucinated_area": "log2", "scale_error": "signed", "truncation": "signed",
    "matte_defect": "signed",
}  # fmt: skip
TARGET_EPS = 0.01
TARGET_CLIP = 4.0
# The column a training manifest (``world label --training-manifest``) carries each in.
TARGET_COLUMN_PREFIX = "oracle_"


def measurement_target(values: np.ndarray, name: str, t: Thresholds = Thresholds()) -> np.ndarray:
    """Raw oracle measurements ``values`` (N,) of ``name`` -> targets (N,) float32, NaN kept.

    Raises:
        ValueError: ``name`` is not in :data:`TARGET_KINDS`.
    """
    if name not in TARGET_KINDS:
        raise ValueError(f"measurement {name!r}: expected one of {sorted(TARGET_KINDS)}")
    v = np.asarray(values, dtype=np.float64)
    limit = getattr(t, name)
    kind = TARGET_KINDS[name]
    if kind == "signed":
        out = v / limit
    elif kind == "offset":
        out = (v - limit) / limit
    else:
        with np.errstate(invalid="ignore"):
            out = np.log2((np.maximum(v, 0) + TARGET_EPS) / (limit + TARGET_EPS))
        out[np.isnan(v)] = np.nan
    return np.clip(out, -TARGET_CLIP, TARGET_CLIP).astype(np.float32)
