import numpy as np
import pytest

from rewardkit.world.placement import composite, place_product, white_background_to_rgba
from rewardkit.world.products import render_cutout, sample_product


def _cutout(cat="bottle"):
    return render_cutout(sample_product(np.random.default_rng(0), "x", category=cat), 160)


def test_placement_centres_and_scales_longest_side():
    layer, p = place_product(_cutout("sofa"), 64, fill=0.5)
    assert p.width == 32  # sofa is wider than tall
    assert abs((p.x0 + p.x1) / 2 - 32) <= 1 and abs((p.y0 + p.y1) / 2 - 32) <= 1
    ys, xs = np.nonzero(layer[..., 3] > 0)
    assert xs.min() >= p.x0 and xs.max() < p.x1 and ys.min() >= p.y0 and ys.max() < p.y1


def test_paste_back_keeps_opaque_product_pixels_identical():
    layer, _ = place_product(_cutout(), 64)
    bg = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = composite(bg, layer)
    opaque = layer[..., 3] == 255
    assert opaque.sum() > 50
    assert np.array_equal(out[opaque], layer[..., :3][opaque])
    clear = layer[..., 3] == 0
    assert np.array_equal(out[clear], bg[clear])


def test_white_background_photo_becomes_rgba():
    rgb = np.full((40, 40, 3), 255, np.uint8)
    rgb[10:30, 15:25] = (200, 20, 20)
    rgba = white_background_to_rgba(rgb)
    assert rgba[20, 20, 3] == 255 and rgba[0, 0, 3] == 0
    with pytest.raises(ValueError, match="RGB"):
        white_background_to_rgba(rgb[..., 0])


def test_bad_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="RGBA"):
        place_product(np.zeros((10, 10, 3), np.uint8), 64)
    with pytest.raises(ValueError, match="no opaque pixels"):
        place_product(np.zeros((10, 10, 4), np.uint8), 64)
    with pytest.raises(ValueError, match="fill"):
        place_product(_cutout(), 64, fill=2.0)
