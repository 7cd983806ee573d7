"""RFNet: config, forward over every variant, gradients, strict save/load, a few steps."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ResNetConfig, ResNetForImageClassification

from rewardkit.models.rfnet import MODALITIES, RESNET50, RFNet, RFNetConfig
from rewardkit.world.scene import CLASSES

B, T, CAPTION_DIM = 3, 5, 16


def tiny_config(**overrides) -> RFNetConfig:
    base = dict(
        backbone={"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                  "layer_type": "basic"},
        width=32, heads=2, n_filter=1, n_fusion=1, resolution=32, caption_dim=CAPTION_DIM,
        dropout=0.0,
    )  # fmt: skip
    return RFNetConfig(**{**base, **overrides})


def inputs(batch: int = B, side: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[0, 3:] = 0  # a shorter caption
    return {
        "product": torch.rand(batch, 3, side, side, generator=g),
        "generated": torch.rand(batch, 3, side, side, generator=g),
        "depth": torch.rand(batch, 1, side, side, generator=g),
        "saliency": torch.rand(batch, 1, side, side, generator=g),
        "caption_tokens": torch.randn(batch, T, CAPTION_DIM, generator=g),
        "caption_mask": mask,
    }


def model(config: RFNetConfig | None = None, seed: int = 0) -> RFNet:
    torch.manual_seed(seed)
    return RFNet(config or tiny_config()).eval()


# -- config ------------------------------------------------------------------------------


def test_config_defaults_presets_and_round_trips(tmp_path):
    small = RFNetConfig.small()
    assert small == RFNetConfig()
    assert small.classes == CLASSES and small.modalities == MODALITIES
    paper = RFNetConfig.paper()
    assert (paper.width, paper.heads, paper.n_filter, paper.n_fusion, paper.resolution) == (
        384, 8, 1, 3, 384,
    )  # fmt: skip
    assert paper.backbone == RESNET50
    assert paper.image_only().modalities == ("generated",)
    assert small.without("depth").modalities == ("product", "generated", "saliency", "caption")
    # Order-insensitive and list-tolerant (YAML/JSON give lists).
    cfg = RFNetConfig(modalities=["caption", "generated"], classes=list(CLASSES[:5]))
    assert cfg.modalities == ("generated", "caption") and len(cfg.classes) == 5
    assert RFNetConfig.from_dict(json.loads(json.dumps(paper.to_dict()))) == paper
    assert RFNetConfig.from_yaml(cfg.to_yaml(tmp_path / "rfnet.yaml")) == cfg


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("modalities", ("generated", "audio"), "modalities"),
        ("modalities", ("caption",), "at least one image"),
        ("classes", ("Space Mismatch", "Size Mismatch"), "Available"),
        ("width", 30, "multiple of 4"),
        ("heads", 3, "divisible"),
        ("resolution", 16, "resolution"),
        ("backbone", {"depth": [1]}, "unknown key"),
        ("backbone", {"depths": [1, 1], "hidden_sizes": [8]}, "equal length"),
        ("dropout", 1.0, "dropout"),
    ],
)
def test_config_rejects_invalid_fields(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_config(**{field: value})


def test_config_from_dict_and_yaml_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        RFNetConfig.from_dict({"widht": 64})
    bad = tmp_path / "bad.yaml"
    bad.write_text("width: 30\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        RFNetConfig.from_yaml(bad)


# -- forward -----------------------------------------------------------------------------

VARIANTS = {
    "full": MODALITIES,
    "image-only": ("generated",),
    **{f"no-{m}": tuple(x for x in MODALITIES if x != m) for m in MODALITIES},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_shapes_for_every_variant(variant):
    net = model(tiny_config(modalities=VARIANTS[variant]))
    x = inputs()
    used = {k: v for k, v in x.items() if k.removesuffix("_tokens").removesuffix("_mask")
            in net.config.modalities}  # fmt: skip
    with torch.no_grad():
        logits = net(**used)
        assert logits.shape == (B, len(CLASSES))
        assert torch.isfinite(logits).all()
        # Inputs of unused modalities are ignored.
        torch.testing.assert_close(net(**x), logits)
        reward = net.available_log_prob(**x)
    assert reward.shape == (B,) and (reward <= 0).all()
    # The model only owns the embeddings of the inputs it uses.
    assert net.type_embed.shape[0] == len(VARIANTS[variant])
    assert (len(net.filters) == 1) == ("product" in net.config.modalities and "caption" in
                                       net.config.modalities)  # fmt: skip


def test_caption_padding_is_ignored():
    for mods in (MODALITIES, ("generated", "caption")):  # filtered, or fused directly
        net = model(tiny_config(modalities=mods))
        x = inputs()
        y = dict(x, caption_tokens=x["caption_tokens"].clone())
        y["caption_tokens"][0, 3:] = 100.0  # padded positions of row 0
        with torch.no_grad():
            torch.testing.assert_close(net(**x), net(**y))
            x["caption_tokens"][0, 0] += 1.0  # a real token does matter
            assert not torch.allclose(net(**x)[0], net(**y)[0])


def test_available_log_prob_gradient_reaches_every_image_input():
    net = model()
    x = inputs()
    for k in ("product", "generated", "depth", "saliency", "caption_tokens"):
        x[k].requires_grad_(True)
    net.available_log_prob(**x).sum().backward()
    for k in ("product", "generated", "depth", "saliency", "caption_tokens"):
        assert x[k].grad is not None and x[k].grad.abs().sum() > 0, k


def test_input_errors_name_the_input():
    net = model()
    x = inputs()
    with pytest.raises(ValueError, match="'depth'"):
        net(**dict(x, depth=None))
    with pytest.raises(ValueError, match="saliency: expected"):
        net(**dict(x, saliency=torch.rand(B, 3, 32, 32)))
    with pytest.raises(ValueError, match="generated: batch size"):
        net(**dict(x, generated=torch.rand(B + 1, 3, 32, 32)))
    with pytest.raises(ValueError, match="product: expected.*uint8"):
        net(**dict(x, product=torch.zeros(B, 3, 32, 32, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="caption_tokens"):
        net(**dict(x, caption_tokens=torch.randn(B, T, CAPTION_DIM + 1)))
    with pytest.raises(ValueError, match="caption_mask"):
        net(**dict(x, caption_mask=torch.ones(B, T + 1)))
    with pytest.raises(ValueError, match="no valid token"):
        net(**dict(x, caption_mask=torch.zeros(B, T)))


# -- save / load -------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    net = model(tiny_config(modalities=("product", "generated", "caption")))
    net.train()
    with torch.no_grad():  # move BatchNorm running stats off their defaults
        net(**inputs(batch=4, seed=1))
    net.eval()
    folder = net.save_pretrained(tmp_path / "rfnet")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["model_type"] == "rfnet"
    net.save_pretrained(folder)  # replacing an existing folder works
    state = torch.random.get_rng_state()
    loaded = RFNet.from_pretrained(folder)
    assert torch.equal(torch.random.get_rng_state(), state)  # loading leaves the RNG alone
    assert loaded.config == net.config and not loaded.training
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), net(**x), rtol=0, atol=0)


def test_strict_loading_names_missing_unexpected_and_mismatched_keys(tmp_path):
    folder = model().save_pretrained(tmp_path / "rfnet")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    key = "head.1.weight"
    save_file({k: v for k, v in state.items() if k != key}, str(weights))
    with pytest.raises(ValueError, match=r"missing_keys.*head\.1\.weight"):
        RFNet.from_pretrained(folder)
    save_file({**state, "extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match=r"unexpected_keys.*extra\.weight"):
        RFNet.from_pretrained(folder)
    save_file({**state, key: torch.zeros(2, 2)}, str(weights))
    with pytest.raises(ValueError, match=r"mismatched_keys.*head\.1\.weight"):
        RFNet.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        RFNet.from_pretrained(tmp_path)


def test_backbone_from_pretrained_resnet_classifier(tmp_path):
    torch.manual_seed(0)
    resnet_config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    ResNetForImageClassification(resnet_config).save_pretrained(tmp_path / "resnet")
    reference = ResNetForImageClassification.from_pretrained(tmp_path / "resnet").resnet
    net = RFNet.backbone_from_pretrained(tmp_path / "resnet", tiny_config(backbone={}))
    assert net.config.backbone["hidden_sizes"] == [8, 16]
    for k, v in reference.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError):
        RFNet.backbone_from_pretrained(tmp_path / "nothing")


# -- training ----------------------------------------------------------------------------


def test_a_few_training_steps_reduce_the_loss():
    """Class = whether the generated image is bright: learnable from pixels in a few steps."""
    torch.manual_seed(0)
    net = RFNet(tiny_config(classes=("Available", "Indistinctiveness")))
    n = 8
    x = inputs(batch=n, side=32, seed=2)
    labels = torch.arange(n) % 2
    x["generated"] = x["generated"] * 0.5 + labels.view(n, 1, 1, 1) * 0.5
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(net(**x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
