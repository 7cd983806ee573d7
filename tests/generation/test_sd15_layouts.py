"""Generator folders as users bring them: stock SD 1.5 layouts saved by diffusers itself.

A ``StableDiffusionInpaintPipeline`` folder (9-channel UNet, no ControlNet) and a
``ControlNetModel`` folder, combined by a ``rewardkit_generator.json``; the stock
``StableDiffusionControlNetPipeline`` and ``StableDiffusionControlNetInpaintPipeline`` layouts;
and one-line errors for folders that are none of these.
"""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rewardkit.commands.generate import generate_command
from rewardkit.generation.default import build_generator
from rewardkit.generation.pipeline import (
    AdGenerator,
    SamplerConfig,
    combine_generator,
    generate_images,
)
from rewardkit.generation.product import prepare_product
from rewardkit.io import write_png_atomic

from .conftest import TINY, product_photo, sd15_scheduler

TWO_STEPS = SamplerConfig(steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """``sd15-inpainting/`` and ``control-canny/`` as diffusers saves them, plus the same
    components in one ``StableDiffusionControlNetInpaintPipeline`` folder for reference."""
    from diffusers import StableDiffusionControlNetInpaintPipeline, StableDiffusionInpaintPipeline

    g = build_generator(TINY, seed=1)
    root = tmp_path_factory.mktemp("stock")
    common = dict(
        vae=g.vae, text_encoder=g.text_encoder, tokenizer=g.tokenizer, unet=g.unet,
        scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    StableDiffusionInpaintPipeline(**common).save_pretrained(root / "sd15-inpainting")
    g.controlnet.save_pretrained(root / "control-canny")
    StableDiffusionControlNetInpaintPipeline(controlnet=g.controlnet, **common).save_pretrained(
        root / "whole"
    )
    return root


def test_saved_as_users_have_them(stock):
    assert not (stock / "sd15-inpainting" / "controlnet").exists()
    index = json.loads((stock / "sd15-inpainting" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert {p.name for p in (stock / "control-canny").iterdir()} == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
    }


def test_each_stock_folder_alone_is_refused_in_one_line(stock):
    with pytest.raises(FileNotFoundError) as err:
        AdGenerator.from_pretrained(stock / "sd15-inpainting")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(stock / "sd15-inpainting"))
    assert "StableDiffusionInpaintPipeline folder without a ControlNet" in msg
    assert '"controlnet": "CONTROLNET_DIR"' in msg
    with pytest.raises(FileNotFoundError, match="a ControlNet folder without the pipeline") as err:
        AdGenerator.from_pretrained(stock / "control-canny")
    assert "\n" not in str(err.value) and str(stock / "control-canny") in str(err.value)


def _products(folder, n=2):
    for s in range(n):
        write_png_atomic(folder / f"p{s}.png", product_photo(s))
    return folder


def test_generate_through_a_folder_that_combines_them(stock, tmp_path):
    combo = tmp_path / "sd15-canny"
    combo.mkdir()
    # What a user writes by hand: the base pipeline and the ControlNet, relative to the folder.
    (combo / "rewardkit_generator.json").write_text(
        json.dumps({"base": str(stock / "sd15-inpainting"), "controlnet": "../no-such-dir"})
    )
    with pytest.raises(FileNotFoundError, match="its controlnet folder .* is not a folder"):
        AdGenerator.from_pretrained(combo)
    combine_generator(combo, stock / "sd15-inpainting", stock / "control-canny")
    card = json.loads((combo / "rewardkit_generator.json").read_text())
    assert not card["base"].startswith("/") and card["controlnet"].endswith("control-canny")
    gen = AdGenerator.from_pretrained(combo)
    assert gen.inpainting and gen.resolution == TINY.resolution
    assert gen.prediction_type == "epsilon" and gen.scheduler.config.steps_offset == 1
    # Every weight is the saved one: the UNet from the pipeline, the ControlNet from its folder.
    saved = load_file(stock / "control-canny" / "diffusion_pytorch_model.safetensors")
    for name, value in gen.controlnet.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    unet = load_file(stock / "sd15-inpainting" / "unet" / "diffusion_pytorch_model.safetensors")
    for name, value in gen.unet.state_dict().items():
        torch.testing.assert_close(value, unet[name], rtol=0, atol=0)
    # `generate --generator DIR`: 2 DDIM steps at 32 px.
    stats = generate_command(
        combo, _products(tmp_path / "products"), tmp_path / "out", prompt="a mug on a table",
        sampler=TWO_STEPS, batch_size=2, progress=False,
    )  # fmt: skip
    assert stats["products"] == 2 and stats["images_generated"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["p0.png", "p1.png"]
    # The same components in one stock ControlNet-inpaint folder paint the same images.
    whole = AdGenerator.from_pretrained(stock / "whole")
    pp = [prepare_product(product_photo(s), 32) for s in range(2)]
    prompts = ["a mug on a table"] * 2
    a = generate_images(gen, pp, prompts, [3, 4], TWO_STEPS)
    b = generate_images(whole, pp, prompts, [3, 4], TWO_STEPS)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_controlnet_folder_that_names_its_base(stock, tmp_path):
    import shutil

    cn = tmp_path / "control-canny"
    shutil.copytree(stock / "control-canny", cn)
    combine_generator(cn, stock / "sd15-inpainting")
    card = json.loads((cn / "rewardkit_generator.json").read_text())
    assert card == {"base": os.path.relpath(stock / "sd15-inpainting", cn)}
    gen = AdGenerator.from_pretrained(cn)
    pp = [prepare_product(product_photo(0), gen.resolution)]
    (img,) = generate_images(gen, pp, ["a lamp"], [0], TWO_STEPS)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_stock_controlnet_pipeline_with_a_4_channel_unet(tmp_path, photos):
    from diffusers import StableDiffusionControlNetPipeline

    g = build_generator(replace(TINY, inpainting=False), seed=2)
    StableDiffusionControlNetPipeline(
        vae=g.vae, text_encoder=g.text_encoder, tokenizer=g.tokenizer, unet=g.unet,
        controlnet=g.controlnet, scheduler=sd15_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(tmp_path / "sd15-controlnet")  # fmt: skip
    gen = AdGenerator.from_pretrained(tmp_path / "sd15-controlnet")
    assert not gen.inpainting and gen.unet.config.in_channels == 4
    pp = [prepare_product(p, gen.resolution) for p in photos[:2]]
    images = generate_images(gen, pp, ["a cup", "a vase"], [0, 1], TWO_STEPS)
    for img, p in zip(images, pp, strict=True):
        opaque = p.layer[..., 3] == 255
        np.testing.assert_array_equal(img[opaque], p.layer[..., :3][opaque])


def test_folders_that_are_none_of_these(stock, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        AdGenerator.from_pretrained(empty)
    msg = str(err.value)
    assert msg.startswith(f"{empty}: not a generator folder; missing component folder(s)")
    assert "expected a Stable Diffusion + ControlNet pipeline folder" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="generator folder not found"):
        AdGenerator.from_pretrained(tmp_path / "nowhere")
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "rewardkit_generator.json").write_text(json.dumps({"base": "."}))
    with pytest.raises(ValueError, match="a cycle"):
        AdGenerator.from_pretrained(loop)


def test_controlnet_for_another_base_is_refused(stock, tmp_path):
    other = build_generator(replace(TINY, unet_channels=(8, 16)), seed=0)
    other.controlnet.save_pretrained(tmp_path / "cn-other")
    combine_generator(tmp_path / "combo", stock / "sd15-inpainting", tmp_path / "cn-other")
    with pytest.raises(ValueError, match=r"combo: controlnet block_out_channels \[8, 16\] differs"):
        AdGenerator.from_pretrained(tmp_path / "combo")


def test_weights_that_do_not_fit_or_are_pickled_are_refused(stock, tmp_path):
    import shutil

    base = tmp_path / "sd15-inpainting"
    shutil.copytree(stock / "sd15-inpainting", base)
    combine_generator(tmp_path / "combo", base, stock / "control-canny")
    unet_file = base / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet_file)
    weights.pop("conv_in.bias")
    save_file(weights, str(unet_file))
    with pytest.raises(
        ValueError, match=r"unet: the unet weights do not fit .*1 missing \(conv_in"
    ):
        AdGenerator.from_pretrained(tmp_path / "combo")
    # Weights only as a pickle (.bin): refused, never unpickled.
    unet_file.unlink()
    build_generator(TINY).unet.save_pretrained(base / "unet", safe_serialization=False)
    assert (base / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match=r"unet: cannot load the unet"):
        AdGenerator.from_pretrained(tmp_path / "combo")
