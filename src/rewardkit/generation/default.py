"""The embedded default generator: small instances of the SD + ControlNet inpainting classes.

Same classes as SD 1.5 + ControlNet (UNet2DConditionModel with 9 input channels, ControlNetModel,
AutoencoderKL, CLIPTextModel + CLIPTokenizer, DDIMScheduler), built from configs with fresh
weights; ``rewardkit train generator`` (``training/generator.py``) trains them on AdWorld.

The tokenizer is a CLIP BPE whose vocabulary is every character (so any prompt tokenizes) plus
whole-word tokens for the AdWorld prompt and caption vocabulary, written as vocab.json and
merges.txt (the files CLIPTokenizer reads).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rewardkit.generation.pipeline import AdGenerator

__all__ = ["GeneratorArch", "build_generator", "prompt_vocabulary", "write_clip_tokenizer"]

_TEMPLATE_WORDS = (
    "a an the on in of with and next to front among colourful objects wall light warm cool "
    "soft bright table floor counter frame shelf window soda can book potted plant floor lamp "
    "cm product photo ad background scene studio"
)


def prompt_vocabulary() -> list[str]:
    """Words of AdWorld prompts and captions (colours, categories, materials, props, ...)."""
    from rewardkit.world.products import ACCENTS, CATEGORIES, PRODUCT_COLOURS
    from rewardkit.world.scene import PROPS, SURFACES, WALL_NAMES

    words: set[str] = set(_TEMPLATE_WORDS.split())
    for group in (PRODUCT_COLOURS, PROPS, WALL_NAMES, SURFACES, ACCENTS):
        for name in group:
            words.update(name.split())
    for c in CATEGORIES:
        words.update(c.name.split())
        words.update(c.material.split())
    words.update({"white", "grey", "charcoal"})
    return sorted(w.lower() for w in words)


def write_clip_tokenizer(folder: Path, words: list[str], max_length: int) -> None:
    """vocab.json + merges.txt of a character-level CLIP BPE with whole-word merges."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-&/()\"") | set("".join(words)))
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    seen: set[str] = set()
    for w in words:
        # Every split of every substring of the word is a merge, so whatever pairs BPE merges
        # first, a known word always ends as one token (rank order cannot strand a prefix).
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        n = len(syms)
        for i in range(n):
            for k in range(i + 2, n + 1):
                for j in range(i + 1, k):
                    rule = f"{''.join(syms[i:j])} {''.join(syms[j:k])}"
                    if rule not in seen:
                        seen.add(rule)
                        merges.append(rule)
                vocab.setdefault("".join(syms[i:k]), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"})
    )


@dataclass
class GeneratorArch:
    """Sizes of the embedded generator (SD 1.5: 512 px, VAE x8, UNet 320-640-1280-1280)."""

    resolution: int = 64
    vae_channels: tuple[int, ...] = (32, 64)  # len - 1 halvings: latent = resolution / 2
    latent_channels: int = 4
    # `python benchmarks/bench_generator.py steps` (batch 32, one training step, 1 thread):
    # (64, 128, 192) with attention at 16 and 8 px 6.55 s; (32, 64, 128) at 8 px only 1.92 s.
    unet_channels: tuple[int, ...] = (32, 64, 128)
    cross_attention_levels: tuple[bool, ...] = (False, False, True)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    # GroupNorm groups. With as many groups as channels the norm removes each channel's
    # spatial mean, i.e. the flat colours these scenes are made of: a VAE built so reached
    # only 20.7 dB after 1,500 steps and its reconstructions fooled the oracle on 26% of
    # renders. Keep several channels per group (SD: 32 groups over 128-512 channels).
    norm_num_groups: int = 8
    vae_norm_groups: int = 8
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_tokens: int = 48
    inpainting: bool = True  # 9-channel UNet (noisy latent + mask + masked-image latent)
    prediction_type: str = "v_prediction"

    def __post_init__(self) -> None:
        if len(self.cross_attention_levels) != len(self.unet_channels):
            raise ValueError("cross_attention_levels: one flag per UNet level")
        factor = 2 ** (len(self.vae_channels) - 1)
        if self.resolution % (factor * 2 ** (len(self.unet_channels) - 1)):
            raise ValueError(f"resolution {self.resolution} does not divide into the levels")


def build_generator(arch: GeneratorArch | None = None, seed: int = 0) -> AdGenerator:
    """Fresh components of the given sizes (random weights, seeded)."""
    arch = arch if arch is not None else GeneratorArch()
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    n_vae = len(arch.vae_channels)
    factor = 2 ** (n_vae - 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=min(arch.vae_norm_groups, arch.vae_channels[0]),
        sample_size=arch.resolution,
        mid_block_add_attention=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp), prompt_vocabulary(), arch.max_tokens)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=arch.max_tokens)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.text_width,
            intermediate_size=arch.text_width * 2,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=arch.max_tokens,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    down = tuple(
        "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.cross_attention_levels
    )
    up = tuple(
        "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.cross_attention_levels)
    )
    common = dict(
        block_out_channels=arch.unet_channels,
        down_block_types=down,
        layers_per_block=arch.layers_per_block,
        cross_attention_dim=arch.text_width,
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_num_groups,
    )
    latent = arch.resolution // factor
    unet = UNet2DConditionModel(
        sample_size=latent,
        in_channels=9 if arch.inpainting else arch.latent_channels,
        out_channels=arch.latent_channels,
        up_block_types=up,
        **common,
    )
    # The ControlNet takes the noisy latent only (4 channels, as diffusers' inpaint pipeline
    # feeds it) and the Canny image, embedded down by the VAE factor.
    cond_channels = tuple(16 * 2**i for i in range(n_vae))
    controlnet = ControlNetModel(
        in_channels=arch.latent_channels,
        conditioning_embedding_out_channels=cond_channels,
        **common,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=arch.prediction_type,
        timestep_spacing="trailing",
        steps_offset=0,
    )
    gen = AdGenerator(unet, controlnet, vae, text_encoder, tokenizer, scheduler)
    gen.arch = asdict(arch)  # type: ignore[attr-defined]
    return gen


def count_parameters(gen: AdGenerator) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in getattr(gen, name).parameters())
        for name in ("unet", "controlnet", "vae", "text_encoder")
    }
