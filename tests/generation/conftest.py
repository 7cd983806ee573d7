"""Tiny generator components for the generation tests (random weights, built from configs)."""

from __future__ import annotations

import numpy as np
import pytest

from rewardkit.generation.default import GeneratorArch, build_generator
from rewardkit.world.placement import DEFAULT_FILL
from rewardkit.world.products import render_cutout, sample_product

TINY = GeneratorArch(
    resolution=32,
    vae_channels=(8, 16),
    unet_channels=(16, 32),
    cross_attention_levels=(False, True),
    norm_num_groups=8,
    text_width=32,
    text_layers=1,
    text_heads=2,
    max_tokens=24,
)


@pytest.fixture(scope="session")
def tiny_generator():
    return build_generator(TINY, seed=0)


def product_photo(seed: int = 0, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return render_cutout(sample_product(rng, f"t{seed}"), size)


@pytest.fixture(scope="session")
def photos():
    return [product_photo(s) for s in range(3)]


FILL = DEFAULT_FILL


def sd15_scheduler():
    """The scheduler as SD 1.5 folders ship it (PNDM, epsilon, ``scheduler_config.json`` of
    runwayml/stable-diffusion-inpainting), which the generator reads as DDIM."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
