"""Every registered scorer on tiny random weights, plus aesthetic head fitting."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from rewardkit.models.scorers import (
    AestheticPredictor,
    available_scorers,
    create_scorer,
    fit_aesthetic_head,
    fit_linear_head,
    laion_mlp_head,
)
from rewardkit.models.social_reward import SocialReward
from tests.models.test_social_reward import images, make_tiny_clip, make_tiny_vtde

PROMPTS = ["a red shoe", "a cat on a mat", "blue bag"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorers")
    clip = make_tiny_clip(root / "clip")
    vtde = make_tiny_vtde(root / "vtde", pooling="mean")
    AestheticPredictor.from_backbone(vtde, head_kind="linear").save_pretrained(root / "aes")
    laion = AestheticPredictor.from_backbone(clip, head_kind="laion-mlp")
    laion.save_pretrained(root / "laion")
    return {
        "social-reward": vtde,
        "clip-score": clip,
        "pickscore": clip,
        "aesthetic": root / "aes",
        "laion-aesthetic": root / "laion",
    }


def test_registry_names():
    assert available_scorers() == [
        "aesthetic",
        "clip-score",
        "laion-aesthetic",
        "pickscore",
        "social-reward",
    ]


@pytest.mark.parametrize(
    "name", ["social-reward", "clip-score", "pickscore", "aesthetic", "laion-aesthetic"]
)
def test_every_scorer_has_the_reward_signature(folders, name):
    scorer = create_scorer(name, folders[name])
    assert scorer.name == name and scorer.lower_better is False and not scorer.training
    x = images(h=48, w=36).requires_grad_(True)
    scores = scorer(x, PROMPTS)
    assert scores.shape == (3,) and torch.all(torch.isfinite(scores))
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable w.r.t. pixels
    assert all(p.grad is None and not p.requires_grad for p in scorer.parameters())
    # score_batch: no grad, chunked, same values.
    batch = scorer.score_batch(x.detach(), PROMPTS, batch_size=2)
    assert not batch.requires_grad
    torch.testing.assert_close(batch, scores.detach().float(), rtol=1e-5, atol=1e-5)


def test_pickscore_is_logit_scaled_clip_score(folders):
    x = images()
    clip = create_scorer("clip-score", folders["clip-score"])
    pick = create_scorer("pickscore", folders["pickscore"])
    scale = pick.reward.model.logit_scale.exp()
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's initial temperature
    torch.testing.assert_close(pick.score_batch(x, PROMPTS), scale * clip.score_batch(x, PROMPTS))
    with pytest.raises(ValueError, match="CLIPModel"):
        create_scorer("pickscore", folders["social-reward"])


def test_aesthetic_ignores_the_prompt(folders):
    scorer = create_scorer("aesthetic", folders["aesthetic"])
    x = images()
    torch.testing.assert_close(scorer.score_batch(x, PROMPTS), scorer.score_batch(x))


def test_laion_head_layout(folders):
    head = laion_mlp_head(768)
    keys = {k for k in head.state_dict()}
    assert keys == {f"{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert head[0].in_features == 768 and head[0].out_features == 1024 and head[7].in_features == 16
    scorer = create_scorer("laion-aesthetic", folders["laion-aesthetic"])
    assert scorer.head.layers[0].in_features == 16  # sized from the tiny CLIP's projection dim
    meta = json.loads((folders["laion-aesthetic"] / "aesthetic.json").read_text())
    assert meta["head"] == "laion-mlp" and meta["input_dim"] == 16
    with pytest.raises(ValueError, match="laion-mlp"):
        create_scorer("laion-aesthetic", folders["aesthetic"])


def test_scorer_errors(folders, tmp_path):
    with pytest.raises(ValueError, match="available: aesthetic"):
        create_scorer("imagereward", folders["clip-score"])
    with pytest.raises(ValueError, match="needs a path"):
        create_scorer("clip-score")
    with pytest.raises(FileNotFoundError, match="aesthetic.json"):
        create_scorer("aesthetic", folders["clip-score"])
    with pytest.raises(FileNotFoundError, match="missing"):
        create_scorer("clip-score", tmp_path / "missing")
    # The backbone pointer can be overridden; a head of another width is refused.
    other = make_tiny_clip(tmp_path / "other")
    assert create_scorer("aesthetic", folders["aesthetic"], backbone=other).name == "aesthetic"
    wide = tmp_path / "wide"
    shutil.copytree(folders["aesthetic"], wide)
    meta = json.loads((wide / "aesthetic.json").read_text())
    meta["input_dim"] = 32
    (wide / "aesthetic.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="32-d"):
        create_scorer("aesthetic", wide, backbone=other)


def test_fit_linear_head_recovers_a_linear_function():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=gen)
    w_true, b_true = torch.tensor([1.0, -2.0, 0.5, 3.0]), 0.7
    w, b = fit_linear_head(x, x @ w_true + b_true, l2=1e-8)
    torch.testing.assert_close(w, w_true, atol=1e-4, rtol=0)
    assert b.item() == pytest.approx(b_true, abs=1e-4)
    # The ridge penalty shrinks the weights.
    w_ridge, _ = fit_linear_head(x, x @ w_true + b_true, l2=100.0)
    assert w_ridge.norm() < w.norm()
    with pytest.raises(ValueError, match="targets"):
        fit_linear_head(x, torch.zeros(49))


def test_fit_aesthetic_head_and_round_trip(folders, tmp_path):
    backbone = SocialReward.from_pretrained(folders["clip-score"])
    x = images(n=24, h=32, w=32, seed=3)
    with torch.no_grad():
        emb = backbone.embed_images(x)  # (24, 16)
    direction = torch.linspace(-1, 1, emb.shape[1])
    targets = emb @ direction + 5.0  # exactly linear in the embedding
    predictor = fit_aesthetic_head(
        backbone, x, targets, l2=1e-8, batch_size=7, backbone_path=folders["clip-score"]
    )
    assert isinstance(predictor.head, nn.Linear)
    fitted = predictor.score_batch(x)
    torch.testing.assert_close(fitted, targets, atol=1e-3, rtol=0)
    predictor.save_pretrained(tmp_path / "aes")
    loaded = create_scorer("aesthetic", tmp_path / "aes")
    torch.testing.assert_close(loaded.score_batch(x), fitted, atol=0, rtol=0)


def test_aesthetic_saves_its_backbone_when_it_has_no_folder(folders, tmp_path):
    backbone = SocialReward.from_pretrained(folders["social-reward"])
    predictor = AestheticPredictor(backbone, nn.Linear(16, 1))
    predictor.save_pretrained(tmp_path / "aes")
    assert (tmp_path / "aes" / "backbone" / "model.safetensors").is_file()
    loaded = create_scorer("aesthetic", tmp_path / "aes")
    x = images()
    torch.testing.assert_close(loaded.score_batch(x), predictor.score_batch(x), atol=0, rtol=0)
