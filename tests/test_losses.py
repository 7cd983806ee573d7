"""Losses against values computed by hand."""

import math

import pytest
import torch

from rewardkit.losses import (
    bradley_terry_loss,
    contrastive_clip_loss,
    triplet_loss,
    weighted_mean,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_triplet_hand_computed():
    # Row 0: a=(1,0), p=(0,1): d=2; n=(-1,0): d=4 -> max(0, 2 - 4 + 0.3) = 0.
    # Row 1: a=(1,0), p=(-1,0): d=4; n=(0,1): d=2 -> 4 - 2 + 0.3 = 2.3.
    # Row 2: a=(3,0) -> (1,0); p=(0,5) -> (0,1): d=2; n=(0.6,-0.8): d=0.16+0.64=0.8
    #        -> 2 - 0.8 + 0.3 = 1.5 (inputs are normalised first).
    anchor = t([[1, 0], [1, 0], [3, 0]])
    positive = t([[0, 1], [-1, 0], [0, 5]])
    negative = t([[-1, 0], [0, 1], [0.6, -0.8]])
    loss = triplet_loss(anchor, positive, negative)
    assert loss.item() == pytest.approx((0 + 2.3 + 1.5) / 3, abs=1e-6)
    # Weighted mean: (1*0 + 3*2.3 + 0*1.5) / 4.
    w = t([1, 3, 0])
    assert triplet_loss(anchor, positive, negative, weight=w).item() == pytest.approx(
        6.9 / 4, abs=1e-6
    )
    # Margin 0: row 1 gives 2.0, row 2 gives 1.2.
    assert triplet_loss(anchor, positive, negative, margin=0.0).item() == pytest.approx(
        3.2 / 3, abs=1e-6
    )


def test_triplet_gradient_only_from_active_triplets():
    anchor = t([[1, 0], [1, 0]]).requires_grad_(True)
    positive = t([[0, 1], [-1, 0]])
    negative = t([[-1, 0], [0, 1]])
    triplet_loss(anchor, positive, negative).backward()
    assert torch.all(anchor.grad[0] == 0)  # satisfied triplet: no gradient
    assert anchor.grad[1].abs().sum() > 0


def test_triplet_shape_mismatch_raises():
    with pytest.raises(ValueError, match="positive"):
        triplet_loss(torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 3))


def test_bradley_terry_hand_computed():
    pos, neg = t([2.0, 1.0]), t([0.0, 1.0])
    expected = [math.log1p(math.exp(-2.0)), math.log(2.0)]
    assert bradley_terry_loss(pos, neg).item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    w = t([3.0, 1.0])
    assert bradley_terry_loss(pos, neg, weight=w).item() == pytest.approx(
        (3 * expected[0] + expected[1]) / 4, abs=1e-6
    )
    # scale multiplies the difference: 2 * (0.5 - 0) = 1.
    assert bradley_terry_loss(t([0.5]), t([0.0]), scale=2.0).item() == pytest.approx(
        math.log1p(math.exp(-1.0)), abs=1e-6
    )


def test_bradley_terry_is_stable_for_large_margins():
    loss = bradley_terry_loss(t([0.0, 1000.0]), t([1000.0, 0.0]))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(500.0, rel=1e-6)


def test_contrastive_clip_loss_hand_computed():
    emb = torch.eye(2)
    # logits = identity; each row's CE = -log(e / (e + 1)) = log(1 + e^-1), both directions.
    expected = math.log1p(math.exp(-1.0))
    assert contrastive_clip_loss(emb, emb, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # Scale 10 on unnormalised inputs: log(1 + e^-10).
    loss = contrastive_clip_loss(3 * emb, 0.5 * emb, torch.tensor(10.0))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-10.0)), abs=1e-7)
    # Swapped pairs: CE = -log(1 / (1 + e)) = log(1 + e).
    swapped = contrastive_clip_loss(emb, emb.flip(0), 1.0)
    assert swapped.item() == pytest.approx(math.log1p(math.e), abs=1e-6)


def test_weighted_mean_validates_shape():
    with pytest.raises(ValueError, match="weight"):
        weighted_mean(torch.ones(3), torch.ones(2))
    assert weighted_mean(torch.ones(2), torch.zeros(2)).item() == 0.0


def test_consistent_condition_loss_compares_guidance_directions():
    from rewardkit.losses import consistent_condition_loss, one_step_kl_loss

    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    # Same direction (even with another unconditional prediction): no penalty.
    assert consistent_condition_loss(u, c, u + 1, c + 1, 0.5) < 1e-12
    # A direction off by d everywhere costs d^2 / (1 - a_t).
    got = consistent_condition_loss(u, c + 0.1, u, c, 0.75)
    assert torch.isclose(got, torch.tensor(0.01 / 0.25))
    assert torch.isclose(one_step_kl_loss(u, u + 0.2), torch.tensor(0.04))
