import numpy as np
import pytest

from rewardkit.generation.product import paste_back, prepare_product, stack_products
from rewardkit.world.placement import place_product

from .conftest import product_photo


def test_masks_control_and_blend_image():
    photo = product_photo(1)
    pp = prepare_product(photo, 64, 0.5)
    layer, placement = place_product(photo, 64, 0.5)
    assert pp.placement == placement
    np.testing.assert_array_equal(pp.keep, (layer[..., 3] >= 128).astype(np.float32))
    # The paint mask covers all background and reaches into the product (dilated seam).
    assert (pp.inpaint[pp.keep == 0] == 1).all()
    assert 0 < pp.inpaint[pp.keep == 1].sum() < pp.keep.sum()
    # Canny edges exist, only on or right next to the product.
    edges = pp.control[..., 0] > 0
    assert edges.sum() > 10
    assert (
        not edges[layer[..., 3] == 0].any()
        or (edges & (layer[..., 3] == 0)).sum() < 0.2 * edges.sum()
    )
    far = np.ones((64, 64), bool)
    far[placement.y0 - 2 : placement.y1 + 2, placement.x0 - 2 : placement.x1 + 2] = False
    assert not edges[far].any()
    assert set(np.unique(pp.control)) <= {0, 255}


def test_paste_back_restores_product_pixels_exactly():
    photo = product_photo(2)
    pp = prepare_product(photo, 64)
    rng = np.random.default_rng(0)
    generated = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = paste_back(generated, pp)
    opaque = pp.layer[..., 3] == 255
    np.testing.assert_array_equal(out[opaque], pp.layer[..., :3][opaque])
    clear = pp.layer[..., 3] == 0
    np.testing.assert_array_equal(out[clear], generated[clear])


def test_white_background_photo_and_errors():
    photo = product_photo(3)
    white = np.full(photo.shape[:2] + (3,), 255, np.uint8)
    a = photo[..., 3:4].astype(np.float32) / 255
    rgb = (photo[..., :3] * a + white * (1 - a)).astype(np.uint8)
    pp = prepare_product(rgb, 64)
    assert pp.keep.sum() > 0
    with pytest.raises(ValueError, match="RGB or RGBA"):
        prepare_product(np.zeros((8, 8), np.uint8), 64)
    with pytest.raises(ValueError, match="shape"):
        paste_back(np.zeros((32, 32, 3), np.uint8), pp)
    with pytest.raises(ValueError, match="different sizes"):
        stack_products([pp, prepare_product(photo, 32)])
