"""The generator loads from a folder diffusers saved, runs our loop, and lets gradients flow."""

import numpy as np
import pytest
import torch

from rewardkit.generation.pipeline import (
    AdGenerator,
    SamplerConfig,
    ddim_step,
    denoise,
    generate_images,
    prepare_batch,
)
from rewardkit.generation.product import prepare_product

from .conftest import TINY, product_photo

FAST = SamplerConfig(steps=4, guidance_scale=2.0)


@pytest.fixture(scope="module")
def saved_by_diffusers(tmp_path_factory, tiny_generator):
    """The tiny components saved through diffusers' own pipeline class."""
    from diffusers import StableDiffusionControlNetInpaintPipeline

    g = tiny_generator
    pipe = StableDiffusionControlNetInpaintPipeline(
        vae=g.vae,
        text_encoder=g.text_encoder,
        tokenizer=g.tokenizer,
        unet=g.unet,
        controlnet=g.controlnet,
        scheduler=g.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("pipe") / "sd-controlnet-inpaint"
    pipe.save_pretrained(folder)
    return folder


def test_loads_a_pipeline_saved_by_diffusers_and_generates(saved_by_diffusers, photos):
    gen = AdGenerator.from_pretrained(saved_by_diffusers)
    assert gen.resolution == TINY.resolution and gen.inpainting
    products = [prepare_product(p, gen.resolution) for p in photos]
    images = generate_images(gen, products, ["a red mug on a table"] * 3, [0, 1, 2], FAST)
    assert len(images) == 3 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    for img, pp in zip(images, products, strict=True):
        opaque = pp.layer[..., 3] == 255
        np.testing.assert_array_equal(img[opaque], pp.layer[..., :3][opaque])
    # Different seeds paint different backgrounds.
    assert not np.array_equal(images[0][products[0].keep == 0], images[1][products[0].keep == 0])


def test_same_seed_same_image_whatever_the_batch(tiny_generator, photos):
    gen = tiny_generator
    pp = [prepare_product(p, gen.resolution) for p in photos]
    prompts = ["a blue bottle on a floor"] * 3
    together = generate_images(gen, pp, prompts, [5, 6, 7], FAST, batch_size=3)
    alone = generate_images(gen, pp[1:2], prompts[1:2], [6], FAST, batch_size=1)
    np.testing.assert_allclose(together[1].astype(int), alone[0].astype(int), atol=1)


def test_own_ddim_step_matches_diffusers_scheduler(tiny_generator):
    sched = tiny_generator.scheduler
    sched.set_timesteps(10)
    t = int(sched.timesteps[3])
    prev = t - sched.config.num_train_timesteps // 10
    torch.manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    acp = sched.alphas_cumprod
    mine, _ = ddim_step(x, eps, acp[t], acp[prev])
    # Feed diffusers the same eps: convert to the scheduler's prediction type (v).
    a = acp[t]
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    ref = sched.step(v, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


def test_product_cells_follow_eq2_blend(tiny_generator, photos):
    gen = tiny_generator
    batch = prepare_batch(gen, [prepare_product(photos[0], gen.resolution)], ["x"], [3])
    with torch.no_grad():
        z = denoise(gen, batch, FAST).latents
    final = float(gen.scheduler.final_alpha_cumprod)
    expected = final**0.5 * batch.product_lat + (1 - final) ** 0.5 * batch.noise
    keep = batch.keep_lat.bool().expand_as(z)
    assert keep.any()
    torch.testing.assert_close(z[keep], expected[keep])


def _grad_norm(module) -> float:
    return sum(float(p.grad.norm()) for p in module.parameters() if p.grad is not None)


def test_gradients_truncated_checkpointed_and_one_step(tiny_generator, photos):
    gen = tiny_generator
    batch = prepare_batch(gen, [prepare_product(photos[1], gen.resolution)], ["y"], [4])
    grads = []
    for ckpt in (False, True):
        gen.controlnet.zero_grad(set_to_none=True)
        gen.controlnet.requires_grad_(True)
        out = denoise(gen, batch, FAST, grad_last=2, checkpoint=ckpt)
        images = gen.decode_latents(out.latents)
        images.mean().backward()
        grads.append([p.grad.clone() for p in gen.controlnet.parameters()])
        assert _grad_norm(gen.controlnet) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Without grad steps nothing reaches the weights; stop_at returns that step's x0_hat.
    gen.controlnet.zero_grad(set_to_none=True)
    out = denoise(gen, batch, FAST, grad_last=0)
    assert not out.latents.requires_grad
    out = denoise(gen, batch, FAST, grad_last=2, stop_at=2)
    assert out.x0_hat.requires_grad and out.timestep == gen.timesteps(4)[2]
    gen.controlnet.requires_grad_(False)
    gen.controlnet.zero_grad(set_to_none=True)


def test_clear_errors(tmp_path, tiny_generator, photos):
    with pytest.raises(FileNotFoundError, match="missing component"):
        (tmp_path / "unet").mkdir()
        AdGenerator.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="prepared at 64 px"):
        prepare_batch(tiny_generator, [prepare_product(photos[0], 64)], ["x"], [0])
    with pytest.raises(ValueError, match="differ in length"):
        prepare_batch(tiny_generator, [prepare_product(photos[0], 32)], ["x", "y"], [0])


class _Brightness:
    """A toy differentiable reward: mean brightness."""

    name = "toy"
    metric = "brightness"

    def __call__(self, images, jobs):
        score = images.mean(dim=(1, 2, 3))
        return -score, score


def test_a_finetuned_model_samples_as_its_base(tmp_path, tiny_generator):
    import json

    from rewardkit.generation.recurrent import ProductJob
    from rewardkit.generation.run import sampler_for
    from rewardkit.training.rfft import FinetuneConfig, finetune_generator

    base = tmp_path / "base"
    tiny_generator.save_pretrained(base)
    (base / "rewardkit_generator.json").write_text(
        json.dumps({"sampler": {"steps": 3, "guidance_scale": 1.5}})
    )
    jobs = [
        ProductJob(f"p{i}", p, prepare_product(p, TINY.resolution), "a mug", "mug, 10 cm", 10.0,
                   0.4)
        for i, p in enumerate(product_photo(s) for s in range(4))
    ]  # fmt: skip
    # The fine-tune runs with its own steps and guidance...
    config = FinetuneConfig(
        lr=1e-3, batch_size=2, max_steps=1, regularizer="none", sample_steps=2,
        guidance_scale=4.0, grad_window=1, probe_every=0, probe_size=2,
    )  # fmt: skip
    run = tmp_path / "run"
    summary = finetune_generator(
        base, jobs[:2], jobs[2:], _Brightness(), config, run, sampler_for(base), False
    )
    assert summary["sampler"]["steps"] == 2 and summary["sampler"]["guidance_scale"] == 4.0
    # ...but the model recommends its base's sampler; the run's is kept apart.
    card = json.loads((run / "model" / "rewardkit_generator.json").read_text())
    assert (card["sampler"]["steps"], card["sampler"]["guidance_scale"]) == (3, 1.5)
    assert (card["finetune_sampler"]["steps"], card["finetune_sampler"]["guidance_scale"]) == (
        2, 4.0,
    )  # fmt: skip
    assert sampler_for(run / "model") == sampler_for(base) == SamplerConfig(3, 1.5)
    assert sampler_for(run / "model", steps=5, guidance=2.0) == SamplerConfig(5, 2.0)
    # Cards written before the fix held the fine-tune's steps under "sampler": the base's win.
    legacy = {k: v for k, v in card.items() if k != "finetune_sampler"}
    legacy["sampler"] = card["finetune_sampler"]
    (run / "model" / "rewardkit_generator.json").write_text(json.dumps(legacy))
    assert sampler_for(run / "model") == SamplerConfig(3, 1.5)
    # A folder that only combines others samples as its base; without any card, as SD does.
    combo = tmp_path / "combo"
    combo.mkdir()
    (combo / "rewardkit_generator.json").write_text(json.dumps({"base": "../run/model"}))
    assert sampler_for(combo) == SamplerConfig(3, 1.5)
    (base / "rewardkit_generator.json").unlink()
    assert sampler_for(combo) == SamplerConfig() and SamplerConfig().steps == 40
    (combo / "rewardkit_generator.json").write_text(json.dumps({"base": "."}))
    assert sampler_for(combo) == SamplerConfig()  # a cycle ends at the default


def test_repainting_an_image_keeps_it_closer_the_lower_the_strength(tiny_generator, photos):
    """SDEdit (``init_latents`` + ``strength``): strength 1 is plain generation; a low
    strength starts late in the schedule from the image's own latents, so the result stays
    near them; without them a strength below 1 is refused."""
    gen = tiny_generator
    pp = [prepare_product(p, gen.resolution) for p in photos[:2]]
    prompts, seeds = ["a red mug on a table"] * 2, [3, 4]
    config = SamplerConfig(steps=8, guidance_scale=2.0, blend=False)
    init = generate_images(gen, pp, prompts, [11, 12], config)  # some other painting
    plain = generate_images(gen, pp, prompts, seeds, config)
    whole = generate_images(gen, pp, prompts, seeds, config, init_images=init, strength=1.0)
    np.testing.assert_array_equal(np.stack(plain), np.stack(whole))
    again = generate_images(gen, pp, prompts, seeds, config, init_images=init, strength=0.25)
    light = generate_images(gen, pp, prompts, seeds, config, init_images=init, strength=0.25)
    np.testing.assert_array_equal(np.stack(light), np.stack(again))
    assert not np.array_equal(np.stack(light), np.stack(plain))

    batch = prepare_batch(gen, pp, prompts, seeds)
    pixels = torch.from_numpy(np.stack(init)).permute(0, 3, 1, 2).float() / 255
    z = gen.encode_images(pixels).float().detach()

    def distance(strength):
        out = denoise(gen, batch, config, init_latents=z, strength=strength).latents
        return float((out - z).pow(2).mean())

    assert distance(0.125) < distance(0.5) < distance(1.0)
    with pytest.raises(ValueError, match="init_latents"):
        denoise(gen, batch, config, strength=0.5)
    with pytest.raises(ValueError, match="strength"):
        denoise(gen, batch, config, strength=0.0)
