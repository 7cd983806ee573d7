"""Background diversity and appeal measures of generated images."""

import numpy as np
import pytest

from rewardkit.generation.metrics import appeal_scores, background_diversity


def _keep(p, size=32):
    keep = np.zeros((p, size, size), np.float32)
    keep[:, 12:20, 12:20] = 1
    return keep


def test_identical_backgrounds_have_zero_diversity():
    rng = np.random.default_rng(0)
    one = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    images = np.broadcast_to(one, (3, 2, 32, 32, 3)).copy()
    d = background_diversity(images, _keep(3))
    assert d["across_seeds"] == 0 and d["across_products"] == 0


def test_diversity_ignores_the_product_and_counts_backgrounds():
    rng = np.random.default_rng(0)
    images = np.full((3, 2, 32, 32, 3), 128, np.uint8)
    images[:, :, 12:20, 12:20] = rng.integers(0, 255, (3, 2, 8, 8, 3))  # product pixels only
    assert background_diversity(images, _keep(3))["diversity"] == 0
    varied = rng.integers(0, 255, (3, 2, 32, 32, 3), dtype=np.uint8)
    plain = np.broadcast_to(varied[:1, :1], varied.shape).copy()  # the collapse: one background
    d_var = background_diversity(varied, _keep(3))
    d_plain = background_diversity(plain, _keep(3))
    assert d_var["across_products"] > 0.05 and d_plain["across_products"] == 0
    assert d_var["diversity"] > d_plain["diversity"]


def test_diversity_checks_shapes():
    with pytest.raises(ValueError, match="products, seeds"):
        background_diversity(np.zeros((2, 32, 32, 3), np.uint8), _keep(2))
    with pytest.raises(ValueError, match="keep"):
        background_diversity(np.zeros((2, 2, 32, 32, 3), np.uint8), _keep(3))


def test_appeal_matches_the_community_truth_and_prefers_its_taste():
    import pyarrow as pa

    from rewardkit.world.community import CommunityConfig, expected_appeal, simulate_community

    rng = np.random.default_rng(1)
    feats = rng.uniform(-1, 1, (40, 8)).astype(np.float32)
    images = pa.table({"image_id": np.arange(40), "prompt_id": np.arange(40) // 4,
                       "prompt": ["p"] * 40, "path": ["x.png"] * 40})  # fmt: skip
    cfg = CommunityConfig(n_users=3000, seed=3)
    truth = simulate_community(images, feats, cfg).truth_images["appeal"].to_numpy()
    ours = expected_appeal(feats, cfg)
    assert np.abs(ours - truth).max() < 0.01  # same quantity, fresh users: Monte Carlo error
    liked = np.array([[0.75, 0.9, 0.6, 0.45, 0.9, -1.0, 1.0, 0.9]], np.float32)
    assert expected_appeal(liked)[0] > expected_appeal(-liked)[0]


def test_appeal_scores_per_image():
    rng = np.random.default_rng(0)
    out = appeal_scores(rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8))
    assert out["appeal"].shape == (3,) and np.all((out["appeal"] > 0) & (out["appeal"] < 1))
    assert out["aesthetic"].shape == (3,)


def test_palette_falls_when_every_background_takes_one_palette():
    """Two-tone backgrounds whose horizon moves keep the grid diversity high; only the palette
    measure sees that every image uses the same two colours."""
    from rewardkit.generation.metrics import palette_diversity

    rng = np.random.default_rng(0)

    def two_tone(wall, floor, horizon):
        img = np.empty((32, 32, 3), np.uint8)
        img[:horizon], img[horizon:] = wall, floor
        return img

    horizons = rng.integers(8, 24, (4, 3))
    one = np.stack([[two_tone((150, 180, 210), (40, 50, 60), h) for h in row] for row in horizons])
    many = np.stack([[two_tone(rng.integers(0, 255, 3), rng.integers(0, 255, 3), h) for h in row]
                     for row in horizons])  # fmt: skip
    same = np.broadcast_to(one[:1, :1], one.shape).copy()
    keep = _keep(4)
    assert background_diversity(one, keep)["diversity"] > 0.1  # the grid measure is fooled
    assert palette_diversity(same, keep) == 0
    assert palette_diversity(many, keep) > 2 * palette_diversity(one, keep)
    assert np.isnan(palette_diversity(many[:1, :1], keep[:1]))
    with pytest.raises(ValueError, match="keep"):
        palette_diversity(many, _keep(3))


def test_prompt_props_inverts_scene_prompt():
    from rewardkit.world.scene import PROPS, prompt_props

    assert prompt_props("a red bottle on a desk, in front of a grey wall, soft light") == ()
    p = "a red bottle on a desk, in front of a grey wall, next to a soda can and a book, cool light"
    assert prompt_props(p) == ("soda can", "book")
    assert all(prompt_props(f"x, next to a {k}, y") == (k,) for k in PROPS)
