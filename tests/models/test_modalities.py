"""Modality extractors: tiny instances through from_pretrained, the shipped defaults,
gradients, strict loading, the map cache and the recipe on a tiny rendered world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, DPTConfig, SegformerConfig

from rewardkit.models.modalities import (
    CaptionEncoder,
    DepthEstimator,
    SaliencyEstimator,
    SpectralResidualSaliency,
    load_modality,
)
from rewardkit.training.modalities import (
    MapTrainConfig,
    extract_maps,
    map_metrics,
    train_map_model,
)
from rewardkit.world.export import render_world


def tiny_depth_config() -> DPTConfig:
    return DPTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=4,
        num_attention_heads=2, intermediate_size=32, backbone_out_indices=(0, 1, 2, 3),
        reassemble_factors=(2, 1, 0.5, 0.25), neck_hidden_sizes=(8, 8, 8, 8),
        fusion_hidden_size=8,
    )  # fmt: skip


def tiny_saliency_config() -> SegformerConfig:
    return SegformerConfig(
        num_labels=1, hidden_sizes=(8, 8, 16, 16), depths=(1, 1, 1, 1), strides=(2, 2, 2, 2),
        num_attention_heads=(1, 1, 2, 2), sr_ratios=(4, 2, 1, 1), decoder_hidden_size=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    depth = DepthEstimator.from_config(tiny_depth_config(), seed=1)
    saliency = SaliencyEstimator.from_config(tiny_saliency_config(), image_size=32, seed=1)
    return {
        "depth": depth.save_pretrained(root / "depth"),
        "saliency": saliency.save_pretrained(root / "saliency"),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    render_world(root, 24, seed=3, size=32, progress=False)
    return root / "manifest.parquet"


def _images(b: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _read(path: Path, mode: str) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert(mode)))


# ---------------------------------------------------------------------------------------
# Learned extractors: save, load back, interface.


@pytest.mark.parametrize("kind", ["depth", "saliency"])
def test_tiny_model_round_trips_through_from_pretrained(tiny_folders, kind):
    cls = {"depth": DepthEstimator, "saliency": SaliencyEstimator}[kind]
    model = cls.from_pretrained(tiny_folders[kind])
    assert model.image_size == (32, 32)
    assert (tiny_folders[kind] / "preprocessor_config.json").is_file()
    images = _images()
    with torch.no_grad():
        maps = model(images)
    assert maps.shape == (2, 1, 40, 48)
    assert maps.dtype == torch.float32
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1
    again = load_modality(kind, tiny_folders[kind])
    assert not any(p.requires_grad for p in again.parameters())
    torch.testing.assert_close(again(images), maps)


def test_depth_convention_min_max_nearest_is_one(tiny_folders):
    model = DepthEstimator.from_pretrained(tiny_folders["depth"])
    maps = model(_images(3))
    flat = maps.flatten(1)
    torch.testing.assert_close(flat.amax(1), torch.ones(3))
    torch.testing.assert_close(flat.amin(1), torch.zeros(3))
    flipped = DepthEstimator(model.model, 32, larger_is_nearer=False)(_images(3))
    torch.testing.assert_close(flipped, 1 - maps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["depth", "saliency"])
def test_shipped_defaults_load_and_map_to_unit_range(kind):
    model = load_modality(kind)
    maps = model(_images(2, 50, 70))
    assert maps.shape == (2, 1, 50, 70)
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1
    assert model.model.config.model_type == {"depth": "dpt", "saliency": "segformer"}[kind]


def test_shipped_saliency_finds_the_product(world):
    """On AdWorld renders the shipped saliency model overlaps the ground truth."""
    table = pq.read_table(world).slice(0, 8)
    root = world.parent
    images = torch.stack([_read(root / p, "RGB") for p in table["path"].to_pylist()]).permute(
        0, 3, 1, 2
    )  # (B, 3, 32, 32)
    truth = torch.stack(
        [_read(root / p, "L") for p in table["saliency_path"].to_pylist()]
    ).unsqueeze(1)
    with torch.no_grad():
        pred = load_modality("saliency")(images.float() / 255)
    assert map_metrics("saliency", pred, truth.float() / 255)["cc"] > 0.5


@pytest.mark.parametrize("kind", ["depth", "saliency", "spectral-residual"])
def test_gradients_flow_from_maps_to_pixels(tiny_folders, kind):
    model = load_modality(kind, tiny_folders.get(kind))
    images = _images(2, 36, 44).requires_grad_(True)
    weights = torch.rand(1, 1, 36, 44, generator=torch.Generator().manual_seed(1))
    (model(images) * weights).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert float(images.grad.abs().sum()) > 0


@pytest.mark.parametrize("kind", ["depth", "saliency"])
def test_strict_loading_refuses_a_missing_weight(tiny_folders, tmp_path, kind):
    cls = {"depth": DepthEstimator, "saliency": SaliencyEstimator}[kind]
    folder = cls.from_pretrained(tiny_folders[kind]).save_pretrained(tmp_path / kind)
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(weights)[-1]
    del weights[dropped]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing_keys"):
        cls.from_pretrained(folder)


def test_loading_errors_name_the_folder(tmp_path, tiny_folders):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DepthEstimator.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no depth-estimation model"):
        DepthEstimator.from_pretrained(tiny_folders["saliency"])  # a Segformer
    with pytest.raises(ValueError, match="unknown modality"):
        load_modality("normals")


def test_saliency_needs_one_label():
    from transformers import SegformerForSemanticSegmentation

    config = tiny_saliency_config()
    config.num_labels = 3
    with pytest.raises(ValueError, match="num_labels=1"):
        SaliencyEstimator(SegformerForSemanticSegmentation(config), 32)


def test_save_replaces_an_existing_folder_atomically(tiny_folders, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    DepthEstimator.from_pretrained(tiny_folders["depth"]).save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------------------------------
# Spectral residual.


def test_spectral_residual_settings_round_trip(tmp_path):
    folder = SpectralResidualSaliency(size=32, blur_sigma=4.0).save_pretrained(tmp_path / "sr")
    loaded = load_modality("saliency", folder)  # a saliency folder may be spectral residual
    assert isinstance(loaded, SpectralResidualSaliency)
    assert (loaded.size, loaded.blur_sigma, loaded.blur_kernel) == (32, 4.0, 5)
    maps = loaded(_images())
    assert maps.shape == (2, 1, 40, 48)
    assert float(maps.max()) <= 1 and float(maps.min()) >= 0


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_spectral_residual_matches_opencv(size):
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "saliency"):
        pytest.skip("OpenCV without the contrib saliency module")
    rng = np.random.default_rng(0)
    # Blocks on a grey field; equal channels so OpenCV's uint8 greyscale is exact.
    grey = np.full(size, 120, np.uint8)
    grey[10:30, 12:40] = 230
    grey[size[0] - 25 : size[0] - 8, 20:30] = 15
    grey = np.clip(grey + rng.integers(-6, 7, size), 0, 255).astype(np.uint8)
    image = np.repeat(grey[..., None], 3, axis=2)
    ok, ref = cv2.saliency.StaticSaliencySpectralResidual_create().computeSaliency(image)
    assert ok
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    ours = SpectralResidualSaliency()(x)[0, 0].numpy()
    assert ours.shape == ref.shape
    tol = 2e-3 if size == (64, 64) else 3e-2  # resizing rounds to uint8 in OpenCV
    assert np.abs(ours - ref).max() < tol
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999


# ---------------------------------------------------------------------------------------
# Caption encoder.


@pytest.fixture(scope="module")
def tiny_caption_folder(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from rewardkit.models.modalities import _minilm_path

    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    encoder = CaptionEncoder(BertModel(config), tokenizer)
    return encoder.save_pretrained(tmp_path_factory.mktemp("caption") / "caption")


def test_caption_encoder_tokens_mask_and_pooling(tiny_caption_folder):
    encoder = load_modality("caption", tiny_caption_folder)
    captions = ["black metal table lamp, 57 cm", "a chair"]
    tokens, mask = encoder.encode(captions)
    assert tokens.shape[:2] == mask.shape and tokens.shape[2] == encoder.hidden_size == 16
    assert mask[1].sum() < mask[0].sum()  # padded
    pooled = encoder.pooled(captions)
    assert pooled.shape == (2, 16)
    expected = tokens[1, : int(mask[1].sum())].mean(0)
    torch.testing.assert_close(pooled[1], expected)
    with pytest.raises(TypeError):
        encoder.encode("not a list")


def test_caption_encoder_is_frozen_by_default(tiny_caption_folder):
    encoder = CaptionEncoder.from_pretrained(tiny_caption_folder)
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    tokens, _ = encoder.encode(["a lamp"])
    assert not tokens.requires_grad
    trainable = CaptionEncoder.from_pretrained(tiny_caption_folder, frozen=False)
    trainable.train()
    assert trainable.model.training
    assert trainable.encode(["a lamp"])[0].requires_grad


def test_default_caption_encoder_is_minilm():
    encoder = load_modality("caption")
    assert encoder.hidden_size == 384
    assert encoder.pooled(["a red chair"]).shape == (1, 384)


# ---------------------------------------------------------------------------------------
# Map cache and training.


def test_extract_maps_writes_pngs_skips_bad_images_and_resumes(world, tiny_folders, tmp_path):
    # A copy of the world's manifest with one corrupt image, beside the original files.
    table = pq.read_table(world).slice(0, 6)
    root = world.parent
    (root / "images" / "corrupt.png").write_bytes(b"not a png")
    paths = table["path"].to_pylist()
    paths[2] = "images/corrupt.png"
    manifest = root / "subset.parquet"
    pq.write_table(table.set_column(1, "path", [paths]), manifest)
    depth = load_modality("depth", tiny_folders["depth"])
    out = tmp_path / "maps"

    spectral = load_modality("spectral-residual")
    result = extract_maps(manifest, out, depth, spectral, batch_size=4, progress=False)
    summary = json.loads((out / "maps_summary.json").read_text())
    assert (summary["rows"], summary["written"], summary["skipped"]) == (6, 5, 1)
    assert summary["skipped_rows"][0]["row"] == 2
    pred = result["pred_depth_path"].to_pylist()
    assert pred[2] is None and pred[0] == "depth/000000.png"
    assert result["pred_saliency_path"].to_pylist()[1] == "saliency/000001.png"
    written = np.asarray(Image.open(out / pred[0]))
    assert written.dtype == np.uint8 and written.shape == (32, 32) and written.max() == 255
    # Paths in the copy are relative to out_dir and still point at the images.
    assert (out / result["path"][0].as_py()).is_file()
    assert pq.read_table(out / "manifest.parquet").equals(result)

    before = (out / pred[0]).stat().st_mtime_ns
    again = extract_maps(manifest, out, depth, spectral, progress=False)
    assert (out / pred[0]).stat().st_mtime_ns == before  # kept, not recomputed
    assert json.loads((out / "maps_summary.json").read_text())["reused"] == 5
    assert again["pred_depth_path"].to_pylist() == pred
    with pytest.raises(ValueError, match="must differ"):
        extract_maps(manifest, root, depth=depth, kinds=("depth",), progress=False)


def test_map_metrics_perfect_and_inverted():
    truth = torch.linspace(0.1, 0.9, 64).view(1, 1, 8, 8).repeat(2, 1, 1, 1)
    perfect = map_metrics("depth", (truth - 0.1) / 0.8, truth)
    assert perfect["spearman"] == pytest.approx(1.0)
    assert perfect["mae"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert map_metrics("depth", 1 - (truth - 0.1) / 0.8, truth)["spearman"] == pytest.approx(-1)
    mask = (truth > 0.5).float()
    sal = map_metrics("saliency", mask, mask)
    assert sal["iou@0.5"] == 1.0 and sal["mae"] == 0.0 and sal["cc"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["depth", "saliency"])
def test_train_map_model_runs_and_resumes(world, tiny_folders, tmp_path, kind):
    config = MapTrainConfig(
        init=str(tiny_folders[kind]), batch_size=4, epochs=1, max_steps=2, val_rows=4
    )
    first = train_map_model(kind, world, tmp_path / "run", config, progress=False)
    assert first.steps == 2 and first.resumed_from == 0
    key = "val_spearman" if kind == "depth" else "val_iou@0.5"
    assert key in first.metrics
    config.max_steps = 3
    second = train_map_model(kind, world, tmp_path / "run", config, progress=False)
    assert second.resumed_from == 2 and second.steps == 3
    model = load_modality(kind, tmp_path / "run" / "model")
    assert model(_images(1, 32, 32)).shape == (1, 1, 32, 32)


def test_map_train_config_from_yaml(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("lr: 0.001\nepochs: 2\nval_rows: 10\n")
    config = MapTrainConfig.from_yaml(file)
    assert (config.lr, config.epochs, config.val_rows) == (0.001, 2, 10)
    file.write_text("lr: 0.001\nlearning_rate: 2\n")
    with pytest.raises(ValueError, match="learning_rate"):
        MapTrainConfig.from_yaml(file)
