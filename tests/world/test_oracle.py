import pytest

from rewardkit.world.agreement import oracle_agreement
from rewardkit.world.oracle import label
from rewardkit.world.sampler import sample_item
from rewardkit.world.scene import CLASSES, render_scene


def test_oracle_agrees_with_render_truth_on_a_sample():
    clean = oracle_agreement(150, seed=11, size=64)
    assert clean["agreement"] >= 0.96, clean["confusion"]
    assert all(v["n"] > 0 for v in clean["per_class"].values())


def test_oracle_agrees_on_degraded_renders():
    degraded = oracle_agreement(120, seed=12, size=64, degraded=True)
    assert degraded["agreement"] >= 0.92, degraded["confusion"]


@pytest.mark.parametrize("cls", CLASSES)
def test_each_class_is_named_from_pixels(cls):
    hits = 0
    for i in range(3):
        item = sample_item(5, i, 64, cls)
        pred, m = label(item.cutout, item.render.image, item.product.height_cm)
        hits += pred == cls
        assert set(m) >= {"contact_gap", "contrast", "clutter", "hallucinated_area", "scale_error"}
    assert hits >= 2


def test_oracle_reads_pixels_not_render_parameters():
    # Same product and spec except the surface edge: only the pixels differ.
    item = sample_item(7, 0, 64, "Available")
    spec = item.render.spec
    spec.edge_y = item.render.placement.y1 + 8  # move the table down: the product floats
    spec.props, spec.shadow = [], False
    floating = render_scene(item.product, item.cutout, spec)
    pred, m = label(item.cutout, floating.image, item.product.height_cm)
    assert pred == "Space Mismatch"
    assert m["contact_gap"] == pytest.approx(8 / 64, abs=1.5 / 64)


def test_oracle_rejects_non_square_images():
    item = sample_item(7, 1, 64, "Available")
    with pytest.raises(ValueError, match="square RGB"):
        label(item.cutout, item.render.image[:, :50], item.product.height_cm)
