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
import functools
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
from rewardkit.io import read_image_rgb, to_strict_json, write_json_atomic
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
from rewardkit.training.rowfiles import RowArray, RowWriter, build_keyed_folder
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
DATA_FORMAT = 1  # the row-file folder of prepare_generator_data
# Caches of earlier versions, removed: pickles (never read: unpickling a file from a run
# folder can run code) and the whole-set safetensors files the row files replace.
LEGACY_CACHES = ("data.pt", "latents.pt", "data.safetensors", "latents.safetensors")


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
    """Training renders with their prepared products, as uint8 rows (N, C, S, S): tensors,
    or :class:`~rewardkit.training.rowfiles.RowArray` files on disk that are read by the rows
    a step takes (what :func:`prepare_generator_data` returns)."""

    images: torch.Tensor | RowArray
    control: torch.Tensor | RowArray  # (N, 1, S, S) Canny of the product
    inpaint: torch.Tensor | RowArray  # (N, 1, S, S) paint mask, 0 or 1
    product: torch.Tensor | RowArray  # (N, 3, S, S) product on grey
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


DATA_ARRAYS = ("images", "control", "inpaint", "product")
PREPARE_CHUNK = 64  # rows decoded per loader task and written at a time


def _prepare_rows(manifest: Path, rows: list[dict], size: int, span: tuple[int, int]):
    """Rows ``[lo, hi)`` decoded and prepared (in a loader process): uint8 arrays
    (n, C, S, S) by name, or the one-line error of the first row that cannot be used."""
    root = manifest.parent
    out: dict[str, list[np.ndarray]] = {name: [] for name in DATA_ARRAYS}
    for i in range(*span):
        r = rows[i]
        try:
            img = read_image_rgb(_resolve(root, r["path"]))
            cut = load_product_photo(_resolve(root, r["product_path"]))
        except (OSError, ValueError) as err:
            return f"{manifest}: row {i}: {err}"
        if img.shape[:2] != (size, size):
            return f"{manifest}: row {i}: image is {img.shape[:2]}, expected {size} px"
        pp = prepare_product(cut, size, float(r["fill"]))
        out["images"].append(img)
        out["control"].append(pp.control[..., :1])
        out["inpaint"].append((pp.inpaint[..., None] > 0.5).astype(np.uint8))
        out["product"].append(pp.product)
    return {k: np.ascontiguousarray(np.stack(v).transpose(0, 3, 1, 2)) for k, v in out.items()}


def _open_data(folder: Path, meta: dict, fingerprint: dict) -> GeneratorData:
    arrays = {name: RowArray(folder / f"{name}.npy") for name in DATA_ARRAYS}
    return GeneratorData(**arrays, prompts=list(meta["prompts"]), fingerprint=fingerprint)


def prepare_generator_data(
    manifest: str | Path,
    size: int,
    cache: Path | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> GeneratorData:
    """Read a render manifest (``world render``): images, products (placed and prepared at
    ``size``) and prompts, decoded once by ``workers`` loader processes (default: up to 4
    when there are more than 256 rows) into row files in the folder ``cache``, keyed by the
    content (:func:`content_digest`) and ``size`` and reused while that key holds. Rows are
    then read from disk by the rows a step takes: memory follows the batch, not the data.
    Without ``cache``, a temporary folder removed with the returned data.

    Raises:
        ValueError: naming the manifest, row and file that cannot be read.
    """
    import os
    import shutil
    import tempfile
    import weakref

    from rewardkit.loading import read_ahead

    manifest = Path(manifest)
    table = read_table(manifest, MANIFEST_COLUMNS)
    rows = table.to_pylist()
    fingerprint = {
        "content_sha256": content_digest(manifest, rows),
        "rows": table.num_rows,
        "size": size,
    }
    temporary = cache is None
    folder = Path(tempfile.mkdtemp(prefix="rewardkit-generator-data-")) if temporary else cache
    key = {"format": DATA_FORMAT, **json.loads(to_strict_json(fingerprint))}
    n = len(rows)
    if workers is None:
        workers = 0 if n <= 256 else min(4, os.cpu_count() or 1)

    def build(building: Path) -> dict:
        channels = {"images": 3, "control": 1, "inpaint": 1, "product": 3}
        writers = {
            name: RowWriter(building / f"{name}.npy", (n, c, size, size), np.uint8)
            for name, c in channels.items()
        }
        spans = [(lo, min(n, lo + PREPARE_CHUNK)) for lo in range(0, n, PREPARE_CHUNK)]
        try:
            chunks = read_ahead(
                functools.partial(_prepare_rows, manifest, rows, size), spans, workers
            )
            with tqdm(total=n, desc="prepare", disable=not progress, unit="img") as bar:
                for chunk in chunks:
                    if isinstance(chunk, str):
                        raise ValueError(chunk)
                    for name, writer in writers.items():
                        writer.append(chunk[name])
                    bar.update(len(chunk["images"]))
        finally:
            for writer in writers.values():
                writer.file.close()
        for writer in writers.values():
            writer.close()
        return {"format": DATA_FORMAT, "prompts": [str(r["prompt"]) for r in rows]}

    meta = build_keyed_folder(folder, key, build, main=True if temporary else None)
    data = _open_data(folder, meta, fingerprint)
    if temporary:
        weakref.finalize(data, shutil.rmtree, folder, True)
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
    """Delete the caches earlier versions left in ``folder`` (:data:`LEGACY_CACHES`)."""
    for name in LEGACY_CACHES:
        (folder / name).unlink(missing_ok=True)


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _latents(
    gen: AdGenerator,
    images: torch.Tensor | RowArray,
    paint: torch.Tensor | RowArray | None = None,
    batch: int = 256,
    path: Path | None = None,
) -> torch.Tensor | RowArray:
    """Scaled latents of uint8 images; with ``paint``, of the images with that region grey
    (the inpainting UNet's masked-image input, as ``prepare_batch`` builds it). Encoded in
    batches on the VAE's device; with ``path``, written there as a row file batch by batch
    (and returned as a :class:`RowArray`), else returned as one CPU tensor."""
    out, writer = [], None
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = _pixels(images[i : i + batch], gen.vae)
            if paint is not None:
                m = paint[i : i + batch].to(x.device).float()  # 0 or 1
                x = x * (1 - m) + 0.5 * m
            z = gen.encode_images(x).float().cpu()
            if path is None:
                out.append(z)
                continue
            if writer is None:
                writer = RowWriter(path, (len(images), *z.shape[1:]), np.float32)
            writer.append(z)
    if path is None:
        return torch.cat(out)
    writer.close()
    return RowArray(path)


def _cached_latents(
    gen: AdGenerator, data: GeneratorData, folder: Path
) -> tuple[RowArray, RowArray]:
    """The latents and masked-image latents of ``data`` as row files in ``folder``, keyed
    by the data and the exact VAE encoder weights (encoding 2 x 16,000 renders takes minutes
    here); reused while the key holds. The main process encodes, the others wait."""

    key = {
        "format": DATA_FORMAT,
        **json.loads(
            to_strict_json({**data.fingerprint, "encoder": _weights_digest(gen.vae.encoder)})
        ),
    }

    def build(building: Path) -> dict:
        _latents(gen, data.images, path=building / "latents.npy")
        _latents(gen, data.product, paint=data.inpaint, path=building / "masked.npy")
        return {"format": DATA_FORMAT}

    build_keyed_folder(folder, key, build)
    return RowArray(folder / "latents.npy"), RowArray(folder / "masked.npy")


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
    """What the denoising loss needs of a :class:`GeneratorData`: the images' scaled latents
    and the masked-image latents of the inpainting UNet (tensors or row files), the paint
    masks and Canny controls (the data's rows), each distinct prompt's token ids once with
    each row's index into them, and the empty prompt's ids."""

    latents: torch.Tensor | RowArray
    masked: torch.Tensor | RowArray
    paint: torch.Tensor | RowArray  # (N, 1, S, S) 0/1, brought to latent size per batch
    ids: torch.Tensor  # (P, T) token ids of the distinct prompts
    prompt_index: torch.Tensor  # (N,) row -> its prompt's row in ids
    empty: torch.Tensor
    control: torch.Tensor | RowArray  # uint8 (N, 1, S, S)

    def __len__(self) -> int:
        return len(self.latents)

    @classmethod
    def build(
        cls,
        gen: AdGenerator,
        data: GeneratorData,
        latents: torch.Tensor | RowArray | None = None,
        masked: torch.Tensor | RowArray | None = None,
    ) -> DenoisingSet:
        """Encode ``data`` with ``gen``'s VAE (unless the latents are given) and tokenise."""
        if latents is None:
            latents = _latents(gen, data.images)
        if masked is None:
            masked = _latents(gen, data.product, paint=data.inpaint)
        tok = gen.tokenizer
        unique = sorted(set(data.prompts))
        where = {p: k for k, p in enumerate(unique)}
        ids = tok(
            unique, padding="max_length", max_length=tok.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        empty = tok(
            [""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids[0]
        index = torch.tensor([where[p] for p in data.prompts], dtype=torch.long)
        return cls(latents, masked, data.inpaint, ids, index, empty, data.control)


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
    row_ids = dset.ids[dset.prompt_index[rows]]  # (B, T)
    batch_ids = torch.where(drop[:, None].cpu(), dset.empty[None], row_ids).to(device)
    text = gen.text_encoder(batch_ids)[0]
    control = dset.control[rows].to(device).float().div(255).expand(-1, 3, -1, -1)
    down, mid = gen.controlnet(
        x_t, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False
    )
    model_in = x_t
    if gen.inpainting:
        h = x_t.shape[-1]
        paint = F.interpolate(dset.paint[rows].to(device).float(), size=(h, h), mode="nearest")
        masked = dset.masked[rows].to(device, x_t.dtype)
        model_in = torch.cat([x_t, paint, masked], dim=1)
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
    signature_extra: dict | None = None,
) -> dict:
    """Train UNet + ControlNet + text encoder of ``gen``; the EMA weights end up in ``gen``.
    ``signature_extra`` joins the checkpoint's signature (the architecture, a warm start), so
    a run resumed with other ones is refused rather than continued."""
    config = config if config is not None else DiffusionTrainConfig()
    gen.vae.requires_grad_(False)
    # The frozen VAE on the training device: it encodes the latents and decodes the probes
    # beside the trainee (which the loop's accelerator moves there).
    gen.vae.to(shared_accelerator(config.mixed_precision, config.device).device)
    latents, masked_lat = _cached_latents(gen, data, out_dir / "latents")
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
    signature = {"stage": "diffusion", **keep, **data.fingerprint, **(signature_extra or {})}
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


def _state_fit(state: dict, expected: dict) -> tuple[list[str], list[str], list[str]]:
    """Names in ``expected`` without a tensor in ``state``, names in ``state`` without a
    place in ``expected``, and those of another shape (with both shapes)."""
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    )
    return sorted(set(expected) - set(state)), sorted(set(state) - set(expected)), shapes


def grow_from(gen: AdGenerator, init: AdGenerator, source: str = "init") -> dict:
    """Warm start ``gen`` (a fresh build, possibly with more attention levels) from ``init``.

    The VAE, text encoder, tokenizer and scheduler are ``init``'s. Every UNet and ControlNet
    tensor of ``init`` is copied into the tensor of the same name, which must exist with the
    same shape; the tensors ``gen`` has beyond them must belong to attention blocks (the
    levels added), whose output projections are zeroed, so the grown model computes exactly
    what ``init`` does until training moves them.

    Raises:
        ValueError: naming the tensors that do not fit (another base model, other widths).
    """
    counts: dict = {}
    for name in ("unet", "controlnet"):
        mine, theirs = getattr(gen, name), getattr(init, name)
        target, source_state = mine.state_dict(), theirs.state_dict()
        added, missing, shapes = _state_fit(source_state, target)
        foreign = [k for k in added if ".attentions." not in k]
        if missing or shapes or foreign:
            raise ValueError(
                f"{source}: its {name} does not fit the architecture grown from it: "
                f"{summarize_names(missing)} without a place, {summarize_names(shapes)} of "
                f"another shape, {summarize_names(foreign)} new outside attention blocks"
            )
        mine.load_state_dict(source_state, strict=False)
        blocks = sorted({k.split(".proj_out.")[0] for k in added if ".proj_out." in k})
        with torch.no_grad():
            for block in blocks:
                proj = mine.get_submodule(block + ".proj_out")
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
        counts[name] = {
            "copied_tensors": len(source_state),
            "added_tensors": len(added),
            "added_parameters": int(sum(target[k].numel() for k in added)),
            "added_blocks": blocks,
        }
    if gen.text_encoder.config.hidden_size != init.text_encoder.config.hidden_size:
        raise ValueError(f"{source}: text encoder width differs from the architecture's")
    gen.vae, gen.text_encoder = init.vae, init.text_encoder
    gen.tokenizer, gen.scheduler = init.tokenizer, init.scheduler
    return counts


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
    init_from: str | Path | None = None,
) -> dict:
    """The stages into ``out`` (work folders ``vae/``, ``diffusion/``, ``vae_decoder/``), the
    pipeline folder in ``out/model``. Re-running resumes each stage from its checkpoint; a
    finished VAE stage is reused. ``decoder_config`` adds the decoder fine-tune (stage 3).

    ``init_from`` (a generator folder) warm-starts the diffusion stage from its weights
    (:func:`grow_from`): its VAE is kept (no VAE stage) and ``arch`` may add cross-attention
    levels to its UNet, which start as the identity."""
    arch = arch if arch is not None else GeneratorArch()
    vae_config = vae_config if vae_config is not None else VAETrainConfig()
    diffusion_config = diffusion_config if diffusion_config is not None else DiffusionTrainConfig()
    from diffusers import AutoencoderKL

    out = Path(out)
    shared_accelerator(vae_config.mixed_precision)  # under a launcher: join the process group
    gen = build_generator(arch, seed=vae_config.seed)
    summary: dict = {"arch": asdict(arch), "manifest": str(manifest)}
    vae_dir = out / "vae"
    # Checkpoints of the default architecture keep the signature they always had.
    extra: dict = {}
    if arch != GeneratorArch():
        extra["arch"] = json.loads(to_strict_json(asdict(arch)))
    if init_from is not None:
        init = AdGenerator.from_pretrained(init_from)
        summary["init_from"] = {"folder": str(init_from), **grow_from(gen, init, str(init_from))}
        extra["init_from"] = {
            n: _weights_digest(getattr(init, n)) for n in ("unet", "controlnet", "text_encoder")
        }
        if is_main_process() and not (vae_dir / "vae.json").is_file():
            gen.vae.save_pretrained(vae_dir / "model")
            write_json_atomic(vae_dir / "vae.json", {"from": str(init_from), "steps": 0})
    if is_main_process():  # what export_checkpoint rebuilds the pipeline from
        write_json_atomic(out / "generator_arch.json", {"arch": asdict(arch), **summary})
    data = prepare_generator_data(manifest, arch.resolution, out / "data_cache", progress)
    _remove_legacy_caches(out)
    summary["rows"] = len(data)
    if init_from is not None:  # the warm start's VAE (saved above for export_checkpoint)
        summary["vae"] = {"from": str(init_from), "steps": 0}
    elif (vae_dir / "model" / "config.json").is_file() and (vae_dir / "vae.json").is_file():
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
        gen, data, out / "diffusion", diffusion_config, probe, progress, signature_extra=extra
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
    if arch is None and (out / "generator_arch.json").is_file():
        arch = GeneratorArch(
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in json.loads((out / "generator_arch.json").read_text())["arch"].items()
            }
        )
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
        missing, extra, shapes = _state_fit(state, expected)
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
