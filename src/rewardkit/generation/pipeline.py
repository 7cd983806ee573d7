"""The ad generator: Stable Diffusion + ControlNet inpainting components and our own loop.

Components are the diffusers/transformers classes of a ``StableDiffusionControlNetInpaintPipeline``
folder (``unet``, ``controlnet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``), so a
user's SD 1.5 + ControlNet folder and the embedded small generator load the same way. A
generator folder is one of (:func:`component_folders`):

- a pipeline folder as diffusers saves ``StableDiffusionControlNetInpaintPipeline`` or
  ``StableDiffusionControlNetPipeline`` (9- or 4-channel UNet);
- a folder with some components and a ``rewardkit_generator.json`` whose ``"base"`` names a
  pipeline folder for the rest (what ``rewardkit finetune`` writes), and whose component keys
  (``"controlnet"``, ...) may name component folders elsewhere: e.g. a stock
  ``StableDiffusionInpaintPipeline`` folder (no ControlNet) plus a ``ControlNetModel`` folder,
  as users have them (:func:`combine_generator` writes such a card);
- a ``ControlNetModel`` folder (``config.json`` + weights) whose card names its base pipeline.

Weights are read from safetensors only, and every weight must load: a missing, unexpected or
reshaped weight is an error naming the component folder, never a silent random init.

The denoising loop is written out once, step by step, and shared by generation, Recurrent
Generation and reward fine-tuning (which only decides where gradients flow):

1. noise ``x_T`` per sample from its own seed (a sample does not depend on its batch);
2. for each DDIM timestep t (``scheduler.set_timesteps``), high to low:
   a. ControlNet on the latent, the text and the Canny image -> residuals per UNet block;
   b. UNet on the latent (plus the inpainting mask and masked-image latent when it has 9
      input channels), the text and the residuals -> eps, for the prompt and for the empty
      prompt; classifier-free guidance eps = eps_u + w (eps_c - eps_u);
   c. DDIM step (eq. 1, eta = 0):
      x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
      x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps
   d. product preservation (eq. 2): x_prev = (1 - M) x_prev + M x_o(prev), with x_o(prev)
      the product latent noised to level prev with the sample's own noise;
3. decode the final latent with the VAE; the caller pastes the product pixels back.

Devices and precision: every tensor a step creates lives on the module's device. The
networks run in their own dtype (fp16/bf16 for ``--mixed-precision``); the schedule
arithmetic does not: alpha-bar comes from the scheduler's fp32 ``alphas_cumprod``, network
outputs are cast to fp32 before they are combined (x0_hat, eq. 1, eq. 2, guidance), the
latent state is kept in fp32 and cast to the model's dtype only when fed to a network. In
bf16, ``1 - a_t`` for t <= 1 would round to 0 and the last steps of a 40-step run would be
off by several percent in fp16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from rewardkit.generation.product import PreparedProduct, paste_back, stack_products
from rewardkit.io import to_strict_json, write_folder_atomic, write_text_atomic

__all__ = [
    "AdGenerator",
    "SamplerConfig",
    "combine_generator",
    "component_folders",
    "load_component",
    "SampleOutput",
    "GenerationBatch",
    "prepare_batch",
    "denoise",
    "generate_images",
]

COMPONENTS = ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_CLASS = "StableDiffusionControlNetInpaintPipeline"
_LIBRARY = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "controlnet": ("diffusers", "ControlNetModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "scheduler": ("diffusers", "DDIMScheduler"),
}


CARD = "rewardkit_generator.json"
_EXPECTED = (
    "a Stable Diffusion + ControlNet pipeline folder (unet/, controlnet/, vae/, text_encoder/, "
    f"tokenizer/, scheduler/ as diffusers saves a {PIPELINE_CLASS}), or a {CARD} naming a base "
    'pipeline and a ControlNet folder ({"base": "SD_INPAINT_DIR", "controlnet": "CONTROLNET_DIR"})'
)


def component_folders(folder: Path) -> dict[str, Path]:
    """Where each component of a generator folder lives (module docstring: the layouts). A
    folder's own component subfolders come first, then the folders its ``rewardkit_generator.json``
    names per component, then its ``"base"`` (relative to the folder, recursively).

    Raises:
        FileNotFoundError: one line naming the folder, what it is and what was expected.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: generator folder not found")
    where = _components(folder, ())
    missing = [c for c in COMPONENTS if c not in where]
    if missing:
        raise FileNotFoundError(f"{folder}: {_what_it_is(folder, missing)}; expected {_EXPECTED}")
    return where


def _read_card(folder: Path) -> dict:
    card = folder / CARD
    if not card.is_file():
        return {}
    try:
        info = json.loads(card.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{card}: invalid JSON ({err})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{card}: expected a JSON object")
    return info


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _components(folder: Path, chain: tuple[Path, ...]) -> dict[str, Path]:
    """The components ``folder`` supplies, directly or through its card (see above)."""
    folder = folder.resolve()
    if folder in chain:
        raise ValueError(f"{folder / CARD}: its base leads back to {folder} (a cycle)")
    card = _read_card(folder)
    where: dict[str, Path] = {}
    if _class_name(folder / "config.json") == "ControlNetModel":
        where["controlnet"] = folder  # a ControlNet folder itself
    where.update({c: folder / c for c in COMPONENTS if (folder / c).is_dir()})
    for c in COMPONENTS:
        if isinstance(card.get(c), str):  # a component folder the card names
            named = (folder / card[c]).resolve()
            if not named.is_dir():
                raise FileNotFoundError(f"{folder / CARD}: its {c} folder {named} is not a folder")
            where[c] = named
    base = card.get("base")
    if base and any(c not in where for c in COMPONENTS):
        base_dir = (folder / base).resolve()
        if not base_dir.is_dir():
            raise FileNotFoundError(f"{folder}: its base generator {base_dir} is not a folder")
        for c, path in _components(base_dir, (*chain, folder)).items():
            where.setdefault(c, path)
    return where


def _what_it_is(folder: Path, missing: list[str]) -> str:
    """A short description of a folder that is not a whole generator, for the error."""
    if _class_name(folder / "config.json") == "ControlNetModel":
        return (
            f"a ControlNet folder without the pipeline it goes with (put a {CARD} with "
            '{"base": "SD_INPAINT_DIR"} in it)'
        )
    pipeline = _class_name(folder / "model_index.json")
    if pipeline and missing == ["controlnet"]:
        return f"a {pipeline} folder without a ControlNet (combine it with a ControlNet folder)"
    kind = f"a {pipeline} folder" if pipeline else "not a generator folder"
    return f"{kind}; missing component folder(s) {missing}"


def combine_generator(
    folder: str | Path, base: str | Path, controlnet: str | Path | None = None
) -> Path:
    """Write ``folder/rewardkit_generator.json`` naming ``base`` (a pipeline folder, e.g. a
    stock SD 1.5 inpainting pipeline) and ``controlnet`` (a ``ControlNetModel`` folder), with
    paths relative to ``folder``, so ``AdGenerator.from_pretrained(folder)`` (and ``rewardkit
    generate --generator folder``) loads them as one generator. ``folder`` may be the
    ControlNet folder itself (``controlnet`` None). Checks the result loads as a layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = _read_card(folder)
    card["base"] = _relative(base, folder)
    if controlnet is not None:
        card["controlnet"] = _relative(controlnet, folder)
    write_text_atomic(folder / CARD, to_strict_json(card, indent=2) + "\n")
    component_folders(folder)
    return folder


def _relative(path: str | Path, start: Path) -> str:
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder")
    try:
        return os.path.relpath(path, start.resolve())
    except ValueError:  # another drive (Windows)
        return str(path)


def load_component(cls, folder: Path, name: str | None = None):
    """``cls.from_pretrained(folder)`` (a diffusers model or transformers model, tokenizer or
    scheduler class) offline, from safetensors only, refusing partial loads.

    Raises:
        ValueError: one line naming the folder (and component) when it cannot load, or when a
            weight is missing, unexpected or of another shape (a silent random init otherwise).
    """
    name = name or cls.__name__
    kw: dict = {"local_files_only": True}
    is_model = hasattr(cls, "load_state_dict")
    if is_model:
        kw.update(use_safetensors=True, output_loading_info=True)
    try:
        loaded = cls.from_pretrained(folder, **kw)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder}: cannot load the {name} ({cls.__name__}): {first}") from err
    if not is_model:
        return loaded
    model, info = loaded
    problems = {
        k: sorted(map(str, info.get(k) or []))
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        detail = ", ".join(
            f"{len(v)} {k.removesuffix('_keys')} ({', '.join(v[:3])}{', ...' * (len(v) > 3)})"
            for k, v in problems.items()
            if v
        )
        raise ValueError(f"{folder}: the {name} weights do not fit its config: {detail}")
    return model


def generator_resolution(folder: str | Path) -> int:
    """A generator folder's image size, from its UNet and VAE configs (no weights loaded)."""
    where = component_folders(Path(folder))
    unet = json.loads((where["unet"] / "config.json").read_text())
    vae = json.loads((where["vae"] / "config.json").read_text())
    size = unet["sample_size"]
    size = size[0] if isinstance(size, list | tuple) else size
    return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)


class AdGenerator:
    """The components of an SD + ControlNet inpainting pipeline, loaded from one folder."""

    def __init__(self, unet, controlnet, vae, text_encoder, tokenizer, scheduler) -> None:
        self.unet, self.controlnet, self.vae = unet, controlnet, vae
        self.text_encoder, self.tokenizer, self.scheduler = text_encoder, tokenizer, scheduler
        if unet.config.in_channels not in (vae.config.latent_channels, 9):
            raise ValueError(
                f"unet has {unet.config.in_channels} input channels; expected the VAE's "
                f"{vae.config.latent_channels} or 9 (inpainting)"
            )
        # A ControlNet feeds residuals into the UNet's blocks: it must be made for this UNet
        # (e.g. an SD 1.5 ControlNet for an SD 1.5 base), with the noisy latent as its input.
        for key in ("block_out_channels", "cross_attention_dim", "layers_per_block"):
            mine, its = unet.config.get(key), controlnet.config.get(key)
            if _plain(mine) != _plain(its):
                raise ValueError(
                    f"controlnet {key} {_plain(its)} differs from the unet's {_plain(mine)}: "
                    "a ControlNet made for another base model"
                )
        if controlnet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"controlnet has {controlnet.config.in_channels} input channels; expected the "
                f"VAE's {vae.config.latent_channels} (the noisy latent)"
            )
        if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
            raise ValueError(
                f"text_encoder width {text_encoder.config.hidden_size} differs from the unet's "
                f"cross_attention_dim {unet.config.cross_attention_dim}"
            )
        for m in self.modules():
            m.eval()

    # -- loading and saving -------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype=torch.float32
    ) -> AdGenerator:
        """Load every component from ``folder``, laid out as the module docstring lists
        (e.g. a stock SD 1.5 inpainting folder combined with a ControlNet folder); nothing is
        downloaded, weights come from safetensors only and must all fit. The scheduler's
        config (any of SD's: PNDM, DDIM, ...) is read as a ``DDIMScheduler``'s.

        Raises:
            FileNotFoundError / ValueError: naming the folder and what is missing or wrong.
        """
        from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        where = component_folders(Path(folder))
        classes = {
            "unet": UNet2DConditionModel,
            "controlnet": ControlNetModel,
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel,
            "tokenizer": CLIPTokenizer,
            "scheduler": DDIMScheduler,
        }
        parts = {name: load_component(c, where[name], name) for name, c in classes.items()}
        try:
            gen = cls(**parts)
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None
        return gen.to(device, None if dtype == torch.float32 else dtype)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the folder as diffusers lays out the pipeline (atomic: a temp folder renamed)."""
        import diffusers

        def write(tmp: Path) -> None:
            for name in COMPONENTS:
                getattr(self, name).save_pretrained(tmp / name)
            index = {
                "_class_name": PIPELINE_CLASS,
                "_diffusers_version": diffusers.__version__,
                **{k: list(v) for k, v in _LIBRARY.items()},
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

        return write_folder_atomic(folder, write)

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.controlnet, self.vae, self.text_encoder]

    def to(self, device, dtype=None) -> AdGenerator:
        """Move every network to ``device`` (and cast its weights to ``dtype`` if given)."""
        for m in self.modules():
            m.to(device=device) if dtype is None else m.to(device=device, dtype=dtype)
        return self

    # -- properties ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, list | tuple) else size
        return int(size) * self.vae_factor

    @property
    def inpainting(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    # -- encoders -----------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text states (B, L, D) from the text encoder's last hidden layer, as SD uses them."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tok.input_ids.to(_device(self.text_encoder))
        return self.text_encoder(ids)[0].to(self.device, self.dtype)

    def encode_images(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> scaled latents (the posterior mean by default),
        in the VAE's dtype."""
        vae = self.vae
        dist = vae.encode(images.to(_device(vae), _dtype(vae)) * 2 - 1).latent_dist
        z = dist.sample() if sample else dist.mean
        return z * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> fp32 images in [0, 1]; differentiable when called with grad."""
        z = latents / self.vae.config.scaling_factor
        x = self.vae.decode(z.to(_device(self.vae), _dtype(self.vae))).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    # -- noise-schedule helpers -----------------------------------------------------------

    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    def timesteps(self, steps: int) -> list[int]:
        self.scheduler.set_timesteps(steps)
        return [int(t) for t in self.scheduler.timesteps]

    def to_eps_x0(self, out: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor):
        """The network output (epsilon, v or sample prediction) -> (eps, x0_hat), in fp32
        whatever the network's dtype (``a_t`` from the fp32 ``alphas_cumprod``)."""
        out, x_t, a_t = out.float(), x_t.float(), torch.as_tensor(a_t).float()
        sa, s1 = a_t.sqrt(), (1 - a_t).sqrt()
        kind = self.prediction_type
        if kind == "epsilon":
            return out, (x_t - s1 * out) / sa
        if kind == "v_prediction":
            return sa * out + s1 * x_t, sa * x_t - s1 * out
        if kind == "sample":
            return (x_t - sa * out) / s1, out
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported")


def _plain(value):
    """Config values as JSON gives them back (tuples as lists)."""
    return list(value) if isinstance(value, tuple | list) else value


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@dataclass
class SamplerConfig:
    """Settings of the denoising loop (the reference pipeline: DDIM 40 steps, CFG 7.5)."""

    steps: int = 40
    guidance_scale: float = 7.5
    controlnet_scale: float = 1.0
    blend: bool = True  # eq. 2, product latent blended in after every step
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1; got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale: must be >= 0; got {self.guidance_scale}")


@dataclass
class GenerationBatch:
    """Conditioning of one batch, in latent space where it applies. What the networks read
    is in the model's dtype; what eq. 2 and the paste-back combine is fp32."""

    text: torch.Tensor  # (B, L, D) prompt states (model dtype)
    uncond: torch.Tensor  # (B, L, D) negative-prompt states (model dtype)
    control: torch.Tensor  # (B, 3, H, W) Canny image in [0, 1] (model dtype)
    inpaint_lat: torch.Tensor  # (B, 1, h, w) 1 = paint, for a 9-channel UNet (model dtype)
    masked_lat: torch.Tensor  # (B, C, h, w) latent of the image, painted region blanked (model)
    keep_lat: torch.Tensor  # (B, 1, h, w) M of eq. 2: latent cells wholly inside the product
    product_lat: torch.Tensor  # (B, C, h, w) x_o of eq. 2 (fp32)
    noise: torch.Tensor  # (B, C, h, w) x_T, one seed per sample (fp32)
    keep: torch.Tensor  # (B, 1, H, W) product alpha, for a differentiable paste-back (fp32)
    product: torch.Tensor  # (B, 3, H, W) product on grey in [0, 1] (fp32)

    def __len__(self) -> int:
        return self.noise.shape[0]

    def to(self, device: str | torch.device) -> GenerationBatch:
        """The batch with every tensor on ``device`` (dtypes kept)."""
        return GenerationBatch(**{k: v.to(device) for k, v in vars(self).items()})


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """One noise tensor per seed, independent of the batch it is drawn in."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(device, dtype)


def prepare_batch(
    gen: AdGenerator,
    products: Sequence[PreparedProduct],
    prompts: Sequence[str],
    seeds: Sequence[int],
    negative_prompt: str = "",
) -> GenerationBatch:
    """Encode prompts and products of one batch (always without gradients: they are inputs)."""
    if not (len(products) == len(prompts) == len(seeds)):
        raise ValueError(
            f"products, prompts and seeds differ in length "
            f"({len(products)}, {len(prompts)}, {len(seeds)})"
        )
    if products[0].size != gen.resolution:
        raise ValueError(
            f"products prepared at {products[0].size} px; the generator works at "
            f"{gen.resolution} px"
        )
    dev, dt = gen.device, gen.dtype
    t = {k: v.to(dev, torch.float32) for k, v in stack_products(list(products)).items()}
    f = gen.vae_factor
    h = gen.resolution // f
    with torch.no_grad():
        text = gen.encode_prompts(prompts)
        uncond = gen.encode_prompts([negative_prompt] * len(prompts))
        # SD inpainting conditioning: the image with the painted region blanked (0 in [-1, 1],
        # i.e. mid grey in [0, 1]), and the paint mask at latent size.
        masked = t["product"] * (1 - t["inpaint"]) + 0.5 * t["inpaint"]
        masked_lat = gen.encode_images(masked).to(dev, dt)
        product_lat = gen.encode_images(t["product"]).to(dev, torch.float32)
    inpaint_lat = F.interpolate(t["inpaint"], size=(h, h), mode="nearest")
    # A latent cell is blended only if every pixel under it is product (min-pool of keep).
    keep_lat = -F.max_pool2d(-t["keep"], kernel_size=f, stride=f)
    noise = seeded_noise(seeds, (gen.latent_channels, h, h), dev, torch.float32)
    return GenerationBatch(
        text=text,
        uncond=uncond,
        control=t["control"].to(dt),
        inpaint_lat=inpaint_lat.to(dt),
        masked_lat=masked_lat,
        keep_lat=keep_lat,
        product_lat=product_lat,
        noise=noise,
        keep=t["keep"],
        product=t["product"],
    )


def predict(
    gen: AdGenerator,
    x_t: torch.Tensor,
    t: int,
    batch: GenerationBatch,
    text: torch.Tensor,
    controlnet_scale: float = 1.0,
    unet=None,
    controlnet=None,
) -> torch.Tensor:
    """One network evaluation: ControlNet residuals, then the UNet; returns its raw output
    in fp32 (the networks run in their own dtype: ``x_t`` is cast to it here).

    ``unet``/``controlnet`` override the generator's (a fine-tuned copy vs the reference)."""
    unet = unet or gen.unet
    controlnet = controlnet or gen.controlnet
    n = x_t.shape[0] // batch.noise.shape[0]  # 2 under classifier-free guidance
    rep = (lambda v: v.repeat(n, *([1] * (v.dim() - 1)))) if n > 1 else (lambda v: v)
    x_t = x_t.to(_dtype(unet))
    timestep = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    down, mid = controlnet(
        x_t,
        timestep,
        encoder_hidden_states=text,
        controlnet_cond=rep(batch.control),
        conditioning_scale=controlnet_scale,
        return_dict=False,
    )
    model_in = x_t
    if gen.inpainting:
        model_in = torch.cat([x_t, rep(batch.inpaint_lat), rep(batch.masked_lat)], dim=1)
    return unet(
        model_in,
        timestep,
        encoder_hidden_states=text,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0].float()


def guided_eps(
    gen: AdGenerator,
    x_t: torch.Tensor,
    t: int,
    a_t: torch.Tensor,
    batch: GenerationBatch,
    config: SamplerConfig,
    unet=None,
    controlnet=None,
) -> torch.Tensor:
    """Step 2a-b: eps under classifier-free guidance (one doubled batch), in fp32."""
    if config.guidance_scale == 1.0:
        out = predict(gen, x_t, t, batch, batch.text, config.controlnet_scale, unet, controlnet)
        return gen.to_eps_x0(out, x_t, a_t)[0]
    x2 = torch.cat([x_t, x_t])
    text = torch.cat([batch.uncond, batch.text])
    out = predict(gen, x2, t, batch, text, config.controlnet_scale, unet, controlnet)
    eps_u, eps_c = gen.to_eps_x0(out, x2, a_t)[0].chunk(2)
    return eps_u + config.guidance_scale * (eps_c - eps_u)


def ddim_step(x_t, eps, a_t, a_prev):
    """Eq. 1 (DDIM, eta = 0), in fp32 whatever the inputs' dtype: returns (x_prev, x0_hat)."""
    x_t, eps = x_t.float(), eps.float()
    a_t, a_prev = torch.as_tensor(a_t).float(), torch.as_tensor(a_prev).float()
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0


def blend_product(x: torch.Tensor, batch: GenerationBatch, a: torch.Tensor) -> torch.Tensor:
    """Eq. 2, in fp32: keep the product cells on the product latent noised to the same
    level."""
    a = torch.as_tensor(a).float()
    noised = a.sqrt() * batch.product_lat.float() + (1 - a).sqrt() * batch.noise.float()
    keep = batch.keep_lat.float()
    return (1 - keep) * x.float() + keep * noised


@dataclass
class SampleOutput:
    latents: torch.Tensor  # final (or, with stop_at, the step's x0_hat) latents
    x0_hat: torch.Tensor | None  # the one-step prediction at ``stop_at``
    timestep: int | None  # the timestep of ``stop_at``


def denoise(
    gen: AdGenerator,
    batch: GenerationBatch,
    config: SamplerConfig,
    grad_last: int = 0,
    checkpoint: bool = False,
    stop_at: int | None = None,
    unet=None,
    controlnet=None,
    stop_before: int | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
) -> SampleOutput:
    """The loop (module docstring). Gradients flow only through the last ``grad_last`` steps
    (0: none, ``config.steps``: all, i.e. full backprop); earlier steps run under no_grad and
    their result is detached (truncated backprop). ``checkpoint`` recomputes each grad step in
    the backward pass instead of storing its activations. ``stop_at`` (a step index) ends the
    loop at that step and returns its one-step prediction x0_hat (RFFT's objective);
    ``stop_before`` (a step index) returns the latents x_t that step would take as input.
    ``init_latents`` with ``strength`` < 1 repaints an existing image (SDEdit): the loop
    starts at the step ``strength`` of the way from the end, from those latents noised to that
    step's level with the batch's noise; ``strength`` 1 (the default) ignores them.
    Latents and the schedule are fp32 (module docstring), whatever the networks' dtype."""
    steps = gen.timesteps(config.steps)
    acp = gen.alphas_cumprod()  # fp32
    final = torch.tensor(
        float(gen.scheduler.final_alpha_cumprod), device=acp.device, dtype=torch.float32
    )
    stride = gen.scheduler.config.num_train_timesteps // config.steps
    x = batch.noise.float().clone()
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: must be in (0, 1]; got {strength}")
    first = 0
    if strength < 1.0:
        if init_latents is None or init_latents.shape != x.shape:
            got = None if init_latents is None else tuple(init_latents.shape)
            raise ValueError(
                f"strength < 1 needs init_latents of shape {tuple(x.shape)}; got {got}"
            )
        if stop_at is not None or stop_before is not None:
            raise ValueError("strength < 1 repaints whole: no stop_at or stop_before")
        first = len(steps) - max(1, round(strength * len(steps)))
        a0 = acp[steps[first]]
        x = a0.sqrt() * init_latents.float().to(x.device) + (1 - a0).sqrt() * x
    if stop_at is not None and stop_before is not None:
        raise ValueError("give stop_at or stop_before, not both")
    last = len(steps) if stop_at is None else stop_at + 1
    if not 0 < last <= len(steps):
        raise ValueError(f"stop_at: must be in [0, {len(steps) - 1}]; got {stop_at}")
    if stop_before is not None:
        if not 0 <= stop_before < len(steps):
            raise ValueError(f"stop_before: must be in [0, {len(steps) - 1}]; got {stop_before}")
        last = stop_before
    x0 = None
    for i, t in enumerate(steps[:last]):
        if i < first:
            continue
        a_t = acp[t]
        prev = t - stride
        a_prev = acp[prev] if prev >= 0 else final
        with_grad = i >= len(steps) - grad_last and torch.is_grad_enabled()

        def step(x_in, t=t, a_t=a_t, a_prev=a_prev):
            eps = guided_eps(gen, x_in, t, a_t, batch, config, unet, controlnet)
            x_out, x0_out = ddim_step(x_in, eps, a_t, a_prev)
            if config.blend:
                x_out = blend_product(x_out, batch, a_prev)
            return x_out, x0_out

        ctx = nullcontext() if with_grad else torch.no_grad()
        with ctx:
            if with_grad and checkpoint:
                x, x0 = grad_checkpoint(step, x, use_reentrant=False)
            else:
                x, x0 = step(x)
        if not with_grad:
            x, x0 = x.detach(), x0.detach()
    if stop_at is not None:
        return SampleOutput(latents=x0, x0_hat=x0, timestep=steps[stop_at])
    return SampleOutput(latents=x, x0_hat=None, timestep=None)


def paste_back_tensor(images: torch.Tensor, batch: GenerationBatch) -> torch.Tensor:
    """Differentiable paste-back: product pixels (alpha) over generated images in [0, 1].
    Uses the binary keep mask; ``generate_images`` pastes the exact anti-aliased layer."""
    return images * (1 - batch.keep) + batch.product * batch.keep


def generate_images(
    gen: AdGenerator,
    products: Sequence[PreparedProduct],
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SamplerConfig | None = None,
    batch_size: int = 16,
    init_images: Sequence[np.ndarray] | None = None,
    strength: float = 1.0,
) -> list[np.ndarray]:
    """Generate one image per (product, prompt, seed), pasted back: RGB uint8 arrays.
    ``init_images`` (RGB uint8 at the generator's resolution, one per product) with
    ``strength`` < 1: repaint them instead of painting from noise (``denoise``)."""
    config = config if config is not None else SamplerConfig()
    if init_images is not None and len(init_images) != len(products):
        raise ValueError(f"{len(init_images)} init_images for {len(products)} products")
    out: list[np.ndarray] = []
    for i in range(0, len(products), batch_size):
        sl = slice(i, i + batch_size)
        batch = prepare_batch(gen, products[sl], prompts[sl], seeds[sl], config.negative_prompt)
        init = None
        if init_images is not None and strength < 1.0:
            pixels = np.stack([np.asarray(a)[..., :3] for a in init_images[sl]])
            pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
            with torch.no_grad():
                init = gen.encode_images(pixels.to(gen.device)).float()
        with torch.no_grad():
            latents = denoise(gen, batch, config, init_latents=init, strength=strength).latents
            images = gen.decode_latents(latents)
        arr = (images.float().permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        out.extend(paste_back(a, p) for a, p in zip(arr, products[sl], strict=True))
    return out
