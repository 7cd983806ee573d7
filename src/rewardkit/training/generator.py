"""Recipe: train the embedded ad generator on AdWorld renders (``rewardkit train generator``).

Two stages, each a resumable run of the shared loop (``training/loop.py``):

1. VAE (``AutoencoderKL``): L1 + L2 reconstruction and a small KL term on the renders; its
   ``scaling_factor`` is then set to 1 / std of the training latents, as SD's is.
2. Diffusion: the 9-channel inpainting UNet, the ControlNet and the text encoder together, from
   scratch, on the cached latents: a random timestep, the noised latent, the prompt (dropped to
   "" with ``prompt_dropout`` so classifier-free guidance works), the product's Canny image,
   the paint mask and masked-image latent (as ``generation.pipeline`` feeds them at sampling
   time) -> MSE to the target of the scheduler's prediction type (v by default). An EMA of the
   weights is kept (in the checkpoints, so resume is exact) and is what gets saved. Every
   ``probe_every`` steps the EMA model generates one image per probe product (the same
   products, prompts and seeds each time), the oracle judges them, and the available rate
   and class counts are logged to the history, so the curve shows what the model can do.

The training renders carry defects in a chosen mix, so the model learns scenes with their
failures: like a real base model, it fails often (see the recipe's README for the measured rate).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from rewardkit.generation.default import GeneratorArch, build_generator
from rewardkit.generation.pipeline import (
    AdGenerator,
    SamplerConfig,
    generate_images,
    load_component,
)
from rewardkit.generation.product import PreparedProduct, prepare_product
from rewardkit.io import atomic_path, read_image_rgb, to_strict_json, write_json_atomic
from rewardkit.training.loop import (
    MicroBatch,
    TrainConfigBase,
    is_main_process,
    keyed_generator,
    on_main,
    read_table,
    resumable,
    run_training,
    shared_accelerator,
    summarize_names,
)
from rewardkit.world.export import load_product_photo

__all__ = [
    "VAETrainConfig",
    "DiffusionTrainConfig",
    "GeneratorData",
    "prepare_generator_data",
    "train_vae",
    "finetune_vae_decoder",
    "train_diffusion",
    "train_generator",
    "DenoisingSet",
    "denoising_loss",
]

MANIFEST_COLUMNS = ("path", "product_path", "prompt", "fill")
# Caches are safetensors files whose header metadata holds this key's JSON (format, content
# key, prompts); files of another format (the pickles of earlier versions) are never read.
CACHE_META = "rewardkit_cache"
CACHE_FORMAT = 2
LEGACY_CACHES = ("data.pt", "latents.pt")  # pickled caches of earlier versions: removed


@dataclass
class VAETrainConfig(TrainConfigBase):
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 1
    kl_weight: float = 1e-6
    checkpoint_every: int = 200


@dataclass
class DiffusionTrainConfig(TrainConfigBase):
    lr: float = 5e-4
    batch_size: int = 32
    epochs: int = 100  # a budget in steps (max_steps) usually ends training first
    warmup_steps: int = 100
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    probe_every: int = 400  # steps between probe generations (0: off)
    probe_steps: int = 20  # DDIM steps of probe generations
    probe_guidance: float = 3.0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"prompt_dropout: must be in [0, 1); got {self.prompt_dropout}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay: must be in (0, 1); got {self.ema_decay}")


@dataclass
class GeneratorData:
    """Training renders with their prepared products, as uint8 tensors (N, C, S, S)."""

    images: torch.Tensor
    control: torch.Tensor  # (N, 1, S, S) Canny of the product
    inpaint: torch.Tensor  # (N, 1, S, S) paint mask
    product: torch.Tensor  # (N, 3, S, S) product on grey
    prompts: list[str]
    fingerprint: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def _resolve(root: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else root / p


def content_digest(manifest: Path, rows: list[dict]) -> str:
    """sha256 over the manifest file's bytes and the bytes of every image and product photo
    its rows name (each file once, streamed): the same renders give the same digest wherever
    they lie, and a re-render with the same names and sizes does not.

    Raises:
        ValueError: naming the manifest, row and file that cannot be read.
    """
    h = hashlib.sha256()
    with open(manifest, "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
    seen: set[Path] = set()
    for i, r in enumerate(rows):
        for column in ("path", "product_path"):
            path = _resolve(manifest.parent, r[column])
            if path in seen:
                continue
            seen.add(path)
            try:
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").digest()
            except FileNotFoundError:
                raise ValueError(f"{manifest}: row {i}: {path}: image file not found") from None
            except OSError as err:
                raise ValueError(f"{manifest}: row {i}: {path}: unreadable ({err})") from None
            h.update(f"{column}\0{r[column]}\0".encode())
            h.update(digest)
    return h.hexdigest()


def read_cache(path: Path, key: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Tensors and metadata of a cache :func:`write_cache` wrote under ``key``; None when the
    file is missing, keyed otherwise, or not such a file (an old pickle is never unpickled)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(CACHE_META, "null"))
            if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
                return None
            if meta.get("key") != json.loads(to_strict_json(key)):
                return None
            return {name: f.get_tensor(name) for name in f.keys()}, meta
    except (SafetensorError, OSError, ValueError):
        return None


def write_cache(path: Path, tensors: dict[str, torch.Tensor], key: dict, **meta) -> None:
    """``tensors`` as one safetensors file (atomic), keyed by ``key``; ``meta`` (plain JSON
    values) is stored beside the key in the file's header."""
    header = to_strict_json({"format": CACHE_FORMAT, "key": key, **meta})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CACHE_META: header})


def prepare_generator_data(
    manifest: str | Path, size: int, cache: Path | None = None, progress: bool = True
) -> GeneratorData:
    """Read a render manifest (``world render``): images, products (placed and prepared at
    ``size``) and prompts. With ``cache``, kept there as a safetensors file keyed by the
    content (:func:`content_digest`) and ``size``, and reused while that key holds."""
    manifest = Path(manifest)
    table = read_table(manifest, MANIFEST_COLUMNS)
    rows = table.to_pylist()
    fingerprint = {
        "content_sha256": content_digest(manifest, rows),
        "rows": table.num_rows,
        "size": size,
    }
    if cache is not None and (hit := read_cache(cache, fingerprint)) is not None:
        tensors, meta = hit
        return GeneratorData(
            images=tensors["images"],
            control=tensors["control"],
            inpaint=tensors["inpaint"],
            product=tensors["product"],
            prompts=list(meta["prompts"]),
            fingerprint=fingerprint,
        )
    root = manifest.parent
    images, control, inpaint, product = [], [], [], []
    for i, r in enumerate(tqdm(rows, desc="prepare", disable=not progress, unit="img")):
        try:
            img = read_image_rgb(_resolve(root, r["path"]))
            cut = load_product_photo(_resolve(root, r["product_path"]))
        except (OSError, ValueError) as err:
            raise ValueError(f"{manifest}: row {i}: {err}") from None
        if img.shape[:2] != (size, size):
            raise ValueError(f"{manifest}: row {i}: image is {img.shape[:2]}, expected {size} px")
        pp = prepare_product(cut, size, float(r["fill"]))
        images.append(img)
        control.append(pp.control[..., :1])
        inpaint.append(pp.inpaint[..., None] > 0.5)
        product.append(pp.product)

    def t(arrs):
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()

    data = GeneratorData(
        images=t(images),
        control=t(control),
        inpaint=t(inpaint),
        product=t(product),
        prompts=[str(r["prompt"]) for r in rows],
        fingerprint=fingerprint,
    )
    if cache is not None:
        tensors = {
            "images": data.images,
            "control": data.control,
            "inpaint": data.inpaint,
            "product": data.product,
        }
        if is_main_process():
            write_cache(cache, tensors, fingerprint, prompts=data.prompts)
    return data


# ---------------------------------------------------------------------------------------
# Stage 1: the VAE.


def train_vae(
    gen: AdGenerator,
    data: GeneratorData,
    out_dir: Path,
    config: VAETrainConfig | None = None,
    progress: bool = True,
) -> dict:
    """Train ``gen.vae`` in place; returns reconstruction figures on the first 512 images."""
    config = config if config is not None else VAETrainConfig()
    vae = gen.vae
    vae.requires_grad_(True)

    def step_loss(rows: torch.Tensor) -> torch.Tensor:
        x = _pixels(data.images[rows], vae) * 2 - 1
        post = vae.encode(x).latent_dist
        # Decode the mean: sampling adds noise of std exp(logvar / 2) ~ 1 at init, as large as
        # the latents themselves, and the decoder then learns to blur (measured: 19.9 dB after
        # 400 steps with samples). Diffusion only ever uses the mean; the small KL term keeps
        # the latents bounded.
        rec = vae.decode(post.mean).sample
        return (
            F.l1_loss(rec, x) + F.mse_loss(rec, x) + config.kl_weight * post.kl().mean()
        )  # fmt: skip

    signature = {"stage": "vae", **resumable(config), **data.fingerprint}
    result = run_training(
        vae,
        len(data),
        step_loss,
        config,
        out_dir,
        signature,
        evaluate=None,
        save_model=lambda path: vae.save_pretrained(path),
        progress=progress,
    )
    vae.requires_grad_(False)
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(_pixels(data.images[:512], vae) * 2 - 1).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    if is_main_process():
        vae.save_pretrained(out_dir / "model")
    return {"steps": result.steps, "psnr_db": _psnr(gen, data), "latent_std": std}


def finetune_vae_decoder(
    gen: AdGenerator,
    data: GeneratorData,
    out_dir: Path,
    config: VAETrainConfig | None = None,
    progress: bool = True,
) -> dict:
    """Stage 3 (optional): train the VAE decoder alone, as SD's ft-MSE decoder was. The
    encoder and the scaling factor stay, so the latent space the UNet learned is unchanged;
    only the pixels it decodes to get sharper. Returns figures as ``train_vae`` does."""
    config = config if config is not None else VAETrainConfig()
    vae = gen.vae
    vae.requires_grad_(False)
    trainable = [vae.decoder, vae.post_quant_conv]
    for m in trainable:
        m.requires_grad_(True)
    vae.train()

    def step_loss(rows: torch.Tensor) -> torch.Tensor:
        x = _pixels(data.images[rows], vae) * 2 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x)

    signature = {"stage": "vae-decoder", **resumable(config), **data.fingerprint}
    result = run_training(vae, len(data), step_loss, config, out_dir, signature, evaluate=None,
                          save_model=lambda path: vae.save_pretrained(path),
                          progress=progress)  # fmt: skip
    vae.requires_grad_(False)
    vae.eval()
    return {"steps": result.steps, "psnr_db": _psnr(gen, data)}


def _pixels(images: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """uint8 images -> float [0, 1] on ``module``'s device."""
    device = next(module.parameters()).device
    return images.to(device, non_blocking=True).float().div_(255.0)


def _psnr(gen: AdGenerator, data: GeneratorData, n: int = 512) -> float:
    """Reconstruction PSNR (dB) of the VAE on the first ``n`` training images."""
    with torch.no_grad():
        x = _pixels(data.images[:n], gen.vae)
        mse = float(F.mse_loss(gen.decode_latents(gen.encode_images(x)), x))
    return float(10 * np.log10(1 / mse))


# ---------------------------------------------------------------------------------------
# Stage 2: UNet + ControlNet + text encoder.


class DiffusionTrainee(nn.Module):
    """The trained parts, and their EMA as buffers (saved in checkpoints)."""

    def __init__(self, gen: AdGenerator) -> None:
        super().__init__()
        self.unet, self.controlnet, self.text_encoder = gen.unet, gen.controlnet, gen.text_encoder
        self.ema = nn.Module()
        self.ema.unet = copy.deepcopy(gen.unet).requires_grad_(False)
        self.ema.controlnet = copy.deepcopy(gen.controlnet).requires_grad_(False)
        self.ema.text_encoder = copy.deepcopy(gen.text_encoder).requires_grad_(False)
        for name, param in list(self.ema.named_parameters()):
            # Parameters of the EMA copy become buffers (not trained, but checkpointed).
            owner = self.ema.get_submodule(name.rsplit(".", 1)[0])
            leaf = name.rsplit(".", 1)[1]
            delattr(owner, leaf)
            owner.register_buffer(leaf, param.detach().clone())

    def live(self) -> list[nn.Module]:
        return [self.unet, self.controlnet, self.text_encoder]

    def shadows(self) -> list[nn.Module]:
        return [self.ema.unet, self.ema.controlnet, self.ema.text_encoder]

    @torch.no_grad()
    def update_ema(self, step: int, decay: float) -> None:
        d = min(decay, (1 + step) / (10 + step))  # short warm-up, as diffusers' EMAModel
        for live, shadow in zip(self.live(), self.shadows(), strict=True):
            params, buffers = dict(live.named_parameters()), dict(shadow.named_buffers())
            names = list(params)
            torch._foreach_lerp_(
                [buffers[n] for n in names], [params[n].detach() for n in names], 1 - d
            )


def _remove_legacy_caches(folder: Path) -> None:
    """Delete the pickled caches earlier versions left in ``folder`` (never read: unpickling
    a file from a run folder can run code); the safetensors caches replace them."""
    for name in LEGACY_CACHES:
        (folder / name).unlink(missing_ok=True)


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _latents(
    gen: AdGenerator, images: torch.Tensor, paint: torch.Tensor | None = None, batch: int = 256
) -> torch.Tensor:
    """Scaled latents of uint8 images; with ``paint``, of the images with that region grey
    (the inpainting UNet's masked-image input, as ``prepare_batch`` builds it)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i : i + batch].float() / 255
            if paint is not None:
                m = paint[i : i + batch].float()
                x = x * (1 - m) + 0.5 * m
            out.append(gen.encode_images(x).cpu())
    return torch.cat(out)


@dataclass
class Probe:
    """Fixed products, prompts and seeds generated during training and judged by the oracle."""

    products: list[PreparedProduct]
    cutouts: list[np.ndarray]
    prompts: list[str]
    heights: list[float]
    fills: list[float]

    @classmethod
    def from_manifest(cls, manifest: str | Path, size: int, n: int) -> Probe:
        manifest = Path(manifest)
        table = read_table(manifest, (*MANIFEST_COLUMNS, "product_height_cm"))
        rows = table.slice(0, n).to_pylist()
        cutouts = [load_product_photo(_resolve(manifest.parent, r["product_path"])) for r in rows]
        return cls(
            products=[
                prepare_product(c, size, float(r["fill"]))
                for c, r in zip(cutouts, rows, strict=True)
            ],
            cutouts=cutouts,
            prompts=[str(r["prompt"]) for r in rows],
            heights=[float(r["product_height_cm"]) for r in rows],
            fills=[float(r["fill"]) for r in rows],
        )

    def judge(self, gen: AdGenerator, config: SamplerConfig, seed: int = 0) -> dict:
        from rewardkit.world.oracle import label

        seeds = [seed * 100_003 + i for i in range(len(self.products))]
        images = generate_images(gen, self.products, self.prompts, seeds, config, batch_size=32)
        labels = [
            label(c, img, h, fill=f)[0]
            for c, img, h, f in zip(self.cutouts, images, self.heights, self.fills, strict=True)
        ]
        counts = Counter(labels)
        return {
            "probe_available": counts.get("Available", 0) / len(labels),
            "probe_counts": dict(counts),
        }


@dataclass
class DenoisingSet:
    """What the denoising loss needs of a :class:`GeneratorData`, computed once: the images'
    scaled latents, the masked-image latents and paint masks of the inpainting UNet, the
    prompts' token ids (and the empty prompt's) and the Canny controls."""

    latents: torch.Tensor
    masked: torch.Tensor
    inpaint: torch.Tensor  # paint mask at latent size
    ids: torch.Tensor
    empty: torch.Tensor
    control: torch.Tensor  # uint8 (N, 1, S, S)

    def __len__(self) -> int:
        return len(self.latents)

    @classmethod
    def build(
        cls,
        gen: AdGenerator,
        data: GeneratorData,
        latents: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
    ) -> DenoisingSet:
        """Encode ``data`` with ``gen``'s VAE (unless the latents are given) and tokenise."""
        if latents is None:
            latents = _latents(gen, data.images)
        if masked is None:
            masked = _latents(gen, data.product, paint=data.inpaint)
        h = latents.shape[-1]
        tok = gen.tokenizer
        ids = tok(
            data.prompts, padding="max_length", max_length=tok.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        empty = tok(
            [""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids[0]
        inpaint = F.interpolate(data.inpaint.float(), size=(h, h), mode="nearest")
        return cls(latents, masked, inpaint, ids, empty, data.control)


def denoising_loss(
    gen: AdGenerator,
    dset: DenoisingSet,
    rows: torch.Tensor,
    rng: torch.Generator | list[torch.Generator],
    prompt_dropout: float = 0.1,
) -> torch.Tensor:
    """The diffusion training loss on ``rows`` of ``dset``: a random timestep, the noised
    latent, the prompt (dropped to "" with ``prompt_dropout``), the product's Canny image, the
    paint mask and masked-image latent -> MSE to the target of the scheduler's prediction
    type. Gradients reach whatever of ``gen``'s UNet, ControlNet and text encoder train.
    ``rng``: one generator for the batch, or one per row (row i's noise, timestep and
    dropout then do not depend on the batch it is in: training on several processes)."""
    b = len(rows)
    device = next(gen.unet.parameters()).device
    acp = gen.scheduler.alphas_cumprod.float().to(device)  # fp32 whatever the model's dtype
    n_train = gen.scheduler.config.num_train_timesteps
    z0 = dset.latents[rows].to(device, torch.float32)
    if isinstance(rng, torch.Generator):
        noise = torch.randn(z0.shape, generator=rng)
        t = torch.randint(0, n_train, (b,), generator=rng)
        drop = torch.rand(b, generator=rng) < prompt_dropout
    else:
        draws = [
            (torch.randn(z0.shape[1:], generator=g), torch.randint(0, n_train, (), generator=g),
             torch.rand((), generator=g))
            for g in rng
        ]  # fmt: skip
        noise = torch.stack([d[0] for d in draws])
        t = torch.stack([d[1] for d in draws])
        drop = torch.stack([d[2] for d in draws]) < prompt_dropout
    # Drawn on the CPU (seeded generators), used on the device.
    noise, t, drop = noise.to(device), t.to(device), drop.to(device)
    a = acp[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    target = {
        "epsilon": noise,
        "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z0,
        "sample": z0,
    }[gen.prediction_type]
    batch_ids = torch.where(drop[:, None].cpu(), dset.empty[None], dset.ids[rows]).to(device)
    text = gen.text_encoder(batch_ids)[0]
    control = dset.control[rows].to(device).float().div(255).expand(-1, 3, -1, -1)
    down, mid = gen.controlnet(
        x_t, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False
    )
    model_in = x_t
    if gen.inpainting:
        paint, masked = dset.inpaint[rows].to(device), dset.masked[rows].to(device)
        model_in = torch.cat([x_t, paint, masked.to(x_t.dtype)], dim=1)
    out = gen.unet(
        model_in,
        t,
        encoder_hidden_states=text,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]
    return F.mse_loss(out, target)


def train_diffusion(
    gen: AdGenerator,
    data: GeneratorData,
    out_dir: Path,
    config: DiffusionTrainConfig | None = None,
    probe: Probe | None = None,
    progress: bool = True,
) -> dict:
    """Train UNet + ControlNet + text encoder of ``gen``; the EMA weights end up in ``gen``."""
    config = config if config is not None else DiffusionTrainConfig()
    gen.vae.requires_grad_(False)
    # The frozen VAE on the training device: it encodes the latents and decodes the probes
    # beside the trainee (which the loop's accelerator moves there).
    gen.vae.to(shared_accelerator(config.mixed_precision, config.device).device)
    # Encoding 2 x 16,000 renders takes minutes here: cache the latents beside the run,
    # keyed by the data and the exact VAE encoder weights.
    key = {**data.fingerprint, "encoder": _weights_digest(gen.vae.encoder)}
    cache = out_dir / "latents.safetensors"
    cached = read_cache(cache, key)
    if cached is not None:
        latents, masked_lat = cached[0]["latents"], cached[0]["masked"]
    else:
        latents = _latents(gen, data.images)
        masked_lat = _latents(gen, data.product, paint=data.inpaint)
        if is_main_process():
            write_cache(cache, {"latents": latents, "masked": masked_lat}, key)
    _remove_legacy_caches(out_dir)
    dset = DenoisingSet.build(gen, data, latents, masked_lat)
    trainee = DiffusionTrainee(gen)
    for m in trainee.live():
        m.requires_grad_(True)

    def step_loss(rows: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
        # Noise, timestep and prompt dropout keyed by (seed, step, row): one process or many
        # draw the same, and a resumed run draws what the uninterrupted one did.
        gens = [keyed_generator(config.seed + 1, micro.step, int(i)) for i in rows]
        return denoising_loss(gen, dset, rows, gens, config.prompt_dropout)

    def with_ema(fn):
        """Run ``fn`` with the EMA weights swapped into ``gen`` (restored afterwards)."""
        saved = [copy.deepcopy(m.state_dict()) for m in trainee.live()]
        for live, shadow in zip(trainee.live(), trainee.shadows(), strict=True):
            live.load_state_dict(shadow.state_dict(), strict=True)
            live.eval()
        try:
            return fn()
        finally:
            for live, state in zip(trainee.live(), saved, strict=True):
                live.load_state_dict(state)
                live.train()

    sampler = SamplerConfig(steps=config.probe_steps, guidance_scale=config.probe_guidance)

    def after_step(step: int) -> dict | None:
        trainee.update_ema(step, config.ema_decay)
        if probe is None or config.probe_every <= 0 or step % config.probe_every:
            return None
        start = time.perf_counter()
        with torch.no_grad():  # in the main process; its figures are logged everywhere
            figures = on_main(lambda: with_ema(lambda: probe.judge(gen, sampler)))
        figures["probe_seconds"] = round(time.perf_counter() - start, 1)
        return figures

    def lr_factor(step: int, total: int) -> float:
        return min(1.0, (step + 1) / max(1, config.warmup_steps))

    def save_model(path: Path) -> None:
        pass  # the caller saves the assembled pipeline

    # Probing is observation, not training: its settings may change on resume.
    keep = {k: v for k, v in resumable(config).items() if not k.startswith("probe_")}
    signature = {"stage": "diffusion", **keep, **data.fingerprint}
    result = run_training(
        trainee,
        len(data),
        step_loss,
        config,
        out_dir,
        signature,
        evaluate=None,
        save_model=save_model,
        progress=progress,
        lr_factor=lr_factor,
        after_step=after_step,
    )
    for live, shadow in zip(trainee.live(), trainee.shadows(), strict=True):
        live.load_state_dict(shadow.state_dict(), strict=True)
        live.requires_grad_(False)
        live.eval()
    probes = [h for h in result.history if "probe_available" in h]
    return {"steps": result.steps, "seconds": result.seconds, "probes": probes}


def train_generator(
    manifest: str | Path,
    out: str | Path,
    arch: GeneratorArch | None = None,
    vae_config: VAETrainConfig | None = None,
    diffusion_config: DiffusionTrainConfig | None = None,
    probe_manifest: str | Path | None = None,
    probe_size: int = 64,
    progress: bool = True,
    decoder_config: VAETrainConfig | None = None,
) -> dict:
    """The stages into ``out`` (work folders ``vae/``, ``diffusion/``, ``vae_decoder/``), the
    pipeline folder in ``out/model``. Re-running resumes each stage from its checkpoint; a
    finished VAE stage is reused. ``decoder_config`` adds the decoder fine-tune (stage 3)."""
    arch = arch if arch is not None else GeneratorArch()
    vae_config = vae_config if vae_config is not None else VAETrainConfig()
    diffusion_config = diffusion_config if diffusion_config is not None else DiffusionTrainConfig()
    from diffusers import AutoencoderKL

    out = Path(out)
    shared_accelerator(vae_config.mixed_precision)  # under a launcher: join the process group
    gen = build_generator(arch, seed=vae_config.seed)
    data = prepare_generator_data(manifest, arch.resolution, out / "data.safetensors", progress)
    _remove_legacy_caches(out)
    summary: dict = {"arch": asdict(arch), "manifest": str(manifest), "rows": len(data)}
    vae_dir = out / "vae"
    if (vae_dir / "model" / "config.json").is_file() and (vae_dir / "vae.json").is_file():
        gen.vae = load_component(AutoencoderKL, vae_dir / "model", "vae")
        summary["vae"] = json.loads((vae_dir / "vae.json").read_text())
    else:
        summary["vae"] = train_vae(gen, data, vae_dir, vae_config, progress)
        if is_main_process():
            write_json_atomic(vae_dir / "vae.json", summary["vae"])
    gen.vae.requires_grad_(False).eval()
    probe = (
        Probe.from_manifest(probe_manifest, arch.resolution, probe_size) if probe_manifest else None
    )
    summary["diffusion"] = train_diffusion(
        gen, data, out / "diffusion", diffusion_config, probe, progress
    )
    if decoder_config is not None:
        summary["vae_decoder"] = finetune_vae_decoder(
            gen, data, out / "vae_decoder", decoder_config, progress
        )
    summary["vae_config"] = asdict(vae_config)
    summary["diffusion_config"] = asdict(diffusion_config)
    if is_main_process():
        gen.save_pretrained(out / "model")
        write_json_atomic(out / "model" / "rewardkit_generator.json", _card(summary))
        write_json_atomic(out / "train_generator.json", summary)
    return summary


def export_checkpoint(
    out: str | Path, arch: GeneratorArch | None = None, sampler_guidance: float = 3.0
) -> Path:
    """Write ``out/model`` from a run's latest diffusion checkpoint (its EMA weights) and its
    VAE, without finishing the run: the weights a finished run with ``--max-steps`` equal to
    the checkpoint's step would save. Returns the model folder."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    out = Path(out)
    arch = arch if arch is not None else GeneratorArch()
    ckpt = out / "diffusion" / "checkpoint"
    vae_dir = out / "vae_decoder" / "model"
    if not vae_dir.is_dir():
        vae_dir = out / "vae" / "model"
    if not (ckpt / "trainable.safetensors").is_file() or not vae_dir.is_dir():
        raise FileNotFoundError(f"{out}: no diffusion checkpoint and VAE to export")
    gen = build_generator(arch)
    gen.vae = load_component(AutoencoderKL, vae_dir, "vae").eval()
    weights = load_file(ckpt / "trainable.safetensors")
    for name in ("unet", "controlnet", "text_encoder"):
        prefix = f"buffer:ema.{name}."
        state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        module = getattr(gen, name)
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        shapes = sorted(
            f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape
        )
        if missing or extra or shapes:
            raise ValueError(
                f"{ckpt}: its EMA {name} does not fit the architecture: "
                f"{summarize_names(missing)} missing, {summarize_names(extra)} extra, "
                f"{summarize_names(shapes)} of another shape"
            )
        module.load_state_dict(state, strict=True)
    state = json.loads((ckpt / "state.json").read_text())
    folder = gen.save_pretrained(out / "model")
    probes = [h for h in state["history"] if "probe_available" in h]
    card = {
        "trained_by": "rewardkit train generator",
        "exported_from_checkpoint_step": state["step"],
        "vae": json.loads((out / "vae" / "vae.json").read_text()),
        "diffusion_steps": state["step"],
        "sampler": {"steps": 40, "guidance_scale": sampler_guidance},
        "probes": probes,
    }
    write_json_atomic(folder / "rewardkit_generator.json", card)
    return folder


def _card(summary: dict) -> dict:
    """What a user of the folder needs: how it was trained and the sampler it was probed with."""
    d = summary["diffusion_config"]
    return {
        "trained_by": "rewardkit train generator",
        "rows": summary["rows"],
        "vae": summary["vae"],
        "diffusion_steps": summary["diffusion"]["steps"],
        "sampler": {"steps": 40, "guidance_scale": d["probe_guidance"]},
        "probes": summary["diffusion"]["probes"],
    }


def table_of_probes(summary: dict) -> pa.Table:
    probes = summary["diffusion"]["probes"]
    return pa.Table.from_pylist(
        [{"step": p["step"], "available": p["probe_available"]} for p in probes]
    )
