import numpy as np
import pytest

from rewardkit.world.oracle import photo_measurements
from rewardkit.world.products import CATEGORIES, damage_cutout, render_cutout, sample_product


def test_catalogue_has_twelve_categories_with_real_sizes():
    assert len(CATEGORIES) >= 12
    sizes = {c.name: c.height_cm for c in CATEGORIES}
    assert 8 <= sizes["mug"][0] and sizes["mug"][1] <= 12.5
    assert sizes["massage chair"][0] >= 100


def test_caption_names_colour_category_and_size():
    p = sample_product(np.random.default_rng(1), "x", category="mug")
    assert "mug" in p.caption and p.colour in p.caption
    assert p.caption.endswith(f"{p.height_cm:.0f} cm")


@pytest.mark.parametrize("cat", [c.name for c in CATEGORIES])
def test_cutout_is_rgba_with_transparent_margin(cat):
    p = sample_product(np.random.default_rng(2), "x", category=cat)
    c = render_cutout(p, 96)
    assert c.shape == (96, 96, 4) and c.dtype == np.uint8
    a = c[..., 3]
    assert a[0].max() == 0 and a[-1].max() == 0 and a[:, 0].max() == 0 and a[:, -1].max() == 0
    assert (a > 127).mean() > 0.05
    m = photo_measurements(c)
    assert m["truncation"] == 0 and m["matte_defect"] < 0.02


def test_damaged_photos_are_measurably_unsuitable():
    rng = np.random.default_rng(3)
    p = sample_product(rng, "x", category="speaker")
    c = render_cutout(p, 128)
    t = photo_measurements(damage_cutout(c, "truncated", 0.3, rng))
    m = photo_measurements(damage_cutout(c, "matte", 0.3, rng))
    assert t["truncation"] > 0.2
    assert m["matte_defect"] > 0.1
    with pytest.raises(ValueError, match="damage kind"):
        damage_cutout(c, "torn", 0.3, rng)
