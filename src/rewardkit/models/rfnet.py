"""RFNet (Reliable Feedback Network): the multimodal inspector of generated ad images.

Inputs per sample: the product photo ``I_o`` (composited on white), the generated ad image
``I_g``, its depth map ``I_d`` and saliency map ``I_s``, and the product caption (token
states of a frozen text encoder). Output: logits over the inspection classes.

::

    I_o, I_g, I_d, I_s --(shared ResNet, transformers ResNetModel)--> maps (B, C, h, w)
        --1x1 conv--> tokens (B, h*w, D) + 2D sin-cos position + modality type embedding
    caption states (B, T, caption_dim) --linear--> (B, T, D) + type embedding
    feature filtering, N1 times:  e_o <- W3((W1 CrossAttn(q=e_o, kv=e_c)) * (W2 e_o)) + e_o
    fusion: N2 pre-norm transformer layers over [CLS, e_o, e_g, e_d, e_s]
    classifier: LayerNorm + Linear on the CLS output -> logits (B, n_classes)

The "1x1 convs" of the filter are ``nn.Linear`` layers on the token axis: a kernel-1 conv
over a token sequence is the same affine map applied at each token. Cross-attention and the
gate read the pre-normalised ``e_o`` (LayerNorm), as the fusion layers do.

Ablations and the image-only baseline are configurations (``modalities``), not other
classes: a model only owns the embeddings of the inputs it uses. Without a caption there is
nothing to filter with; without a product there is nothing to filter, so the caption tokens
then join the fusion sequence directly (their information would otherwise be lost).

Everything from the pixels to the logits is differentiable (resize, ImageNet normalisation,
the encoder), so :meth:`RFNet.available_log_prob` can drive reward fine-tuning (RFFT).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ResNetConfig, ResNetModel

from rewardkit.io import write_folder_atomic, write_text_atomic
from rewardkit.models.social_reward import _check_loading_info, _quiet_progress
from rewardkit.world.scene import CLASSES

__all__ = [
    "ALIGNED_MODALITIES",
    "ALL_MODALITIES",
    "AVAILABLE",
    "EARLY_MODALITIES",
    "FUSIONS",
    "IMAGE_MODALITIES",
    "MODALITIES",
    "RESNET50",
    "SMALL_RESNET",
    "count_parameters",
    "sincos_positions_2d",
    "verdict_indices",
    "RFNet",
    "RFNetConfig",
]

AVAILABLE = "Available"
MODALITIES = ("product", "generated", "depth", "saliency", "caption")
# Early fusion's inputs beyond the paper: the product as placed on the canvas (RGB on white +
# its placement mask, aligned with the generated image) and its real height in cm.
ALIGNED_MODALITIES = ("placed", "height")
ALL_MODALITIES = (*MODALITIES, *ALIGNED_MODALITIES)
EARLY_MODALITIES = ("product", "generated", "placed", "height")
FUSIONS = ("late", "early")
HEIGHT_SCALE_CM = 30.0  # early fusion reads log(height / this)
IMAGE_MODALITIES = ("product", "generated", "depth", "saliency")
MAP_MODALITIES = ("depth", "saliency")  # one-channel maps, repeated to 3 channels
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "rfnet"

# The ResNetConfig fields that define the architecture (everything else is bookkeeping).
BACKBONE_KEYS = (
    "num_channels",
    "embedding_size",
    "hidden_sizes",
    "depths",
    "layer_type",
    "hidden_act",
    "downsample_in_first_stage",
    "downsample_in_bottleneck",
)
# The paper's encoder: ResNet-50 (= ResNetConfig's defaults), stride 32: 12x12 maps at 384 px.
RESNET50: dict[str, Any] = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}
# The embedded default: three basic-block stages of one block each. Stride 16 rather than 32
# keeps a 4x4 token grid per image at 64 px, so where the product sits (space and size
# mismatches) is still visible to the fusion layers; four stages would leave 2x2.
SMALL_RESNET: dict[str, Any] = {
    **RESNET50,
    "embedding_size": 32,
    "hidden_sizes": [32, 64, 128],
    "depths": [1, 1, 1],
    "layer_type": "basic",
}


# ---------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class RFNetConfig:
    """RFNet architecture. Defaults are the embedded small model; :meth:`paper` is the
    published one. Lists given for tuple fields (from JSON/YAML) are converted.

    Raises:
        ValueError: On any invalid field, naming it and what was expected.
    """

    # transformers ResNetConfig fields (BACKBONE_KEYS); missing keys take ResNet-50's values.
    backbone: dict[str, Any] = field(default_factory=lambda: dict(SMALL_RESNET))
    width: int = 128  # token width D (paper 384); 128 is enough for 64 px AdWorld renders
    heads: int = 4  # attention heads (paper 8); keeps 32 dims per head
    n_filter: int = 1  # N1 feature-filtering blocks (paper 1)
    n_fusion: int = 2  # N2 fusion layers (paper 3); 2 suffices for 4x4 grids per image
    resolution: int = 64  # side images are resized to (paper 384; AdWorld renders are 64 px)
    caption_dim: int = 384  # caption token width: all-MiniLM-L6-v2's hidden size (BERT-base: 768)
    classes: tuple[str, ...] = CLASSES  # RF1M's five classes + Unsuitable; must hold "Available"
    modalities: tuple[str, ...] = MODALITIES  # inputs used; ("generated",) = image-only baseline
    dropout: float = 0.1  # in attention and feed-forward layers (RF1M-scale data needs little)
    # The operating point: the verdict is Available when P(Available) >= this, else the most
    # probable defect. None: the most probable class. Chosen on validation images
    # (``train rfnet --accept-precision``); every verdict (inspect, Recurrent Generation's
    # accept test, the service) follows it.
    accept_threshold: float | None = None
    # Recurrent Generation's accept test when ``generate --until-accepted`` is given no
    # ``--accept-threshold``: accept an image when P(Available) >= this (None: the operating
    # point above). A gatekeeper that may retry can afford a stricter test than a labeller;
    # chosen on a validation run that painted every attempt of every product
    # (:func:`rewardkit.generation.recurrent.choose_loop_threshold`).
    loop_threshold: float | None = None
    # "late": the paper's RFNet (each image encoded alone, tokens fused by attention).
    # "early" (beyond the paper): the generated image and the product as placed on the canvas
    # (RGB + mask) stacked as channels of one full-resolution CNN, the photo in a branch, the
    # product's height as a number (modalities from EARLY_MODALITIES; ``width`` is then the
    # CNN's first-stage channels and ``backbone``, ``heads``, ``n_filter``, ``n_fusion`` and
    # ``caption_dim`` are unused). See :meth:`aligned`.
    fusion: str = "late"
    # Early fusion only (beyond the paper): heads that also regress these oracle measurements
    # (names from ``world.oracle.TARGET_KINDS``, in units of their decision thresholds) from
    # the features the verdict is read from: a second teacher during training
    # (``RFNetTrainConfig.measurement_weight``); ``forward(..., measurements=True)`` returns
    # them. () = no heads (the paper's model, and every model before 2026-12-04).
    measurements: tuple[str, ...] = ()
    # Early fusion only: the stride of the scene CNN's first block (1 or 2). 1 (the
    # preset) keeps its first features at the full ``resolution``; 2 sees every input pixel
    # through a strided 3x3 convolution at about the cost of a model at half the resolution
    # (a 128-px world at the 64-px model's cost instead of about 5x).
    stem_stride: int = 1
    # An ensemble: this many networks of the architecture above whose class probabilities are
    # averaged (``forward`` returns the log of the mean, so every reader of the logits, the
    # verdict, P(Available), the RFFT reward, sees one model). Assembled from trained models
    # with :meth:`RFNet.ensemble_of` (``recipes/rfnet_ensemble.py``); 1 = one network.
    ensemble: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise fields in place once
        if not isinstance(self.backbone, dict):
            raise ValueError(
                f"backbone: expected a dict of ResNetConfig fields; got {self.backbone!r}"
            )
        unknown = sorted(set(self.backbone) - set(BACKBONE_KEYS))
        if unknown:
            raise ValueError(f"backbone: unknown key(s) {unknown}; known: {list(BACKBONE_KEYS)}")
        bb = {**RESNET50, **self.backbone}
        bb["hidden_sizes"] = [int(v) for v in bb["hidden_sizes"]]
        bb["depths"] = [int(v) for v in bb["depths"]]
        if bb["num_channels"] != 3:
            raise ValueError(f"backbone.num_channels: must be 3 (RGB); got {bb['num_channels']}")
        if not bb["depths"] or len(bb["depths"]) != len(bb["hidden_sizes"]):
            raise ValueError(
                f"backbone: depths {bb['depths']} and hidden_sizes {bb['hidden_sizes']} must be "
                "non-empty and of equal length"
            )
        if min(bb["depths"] + bb["hidden_sizes"] + [int(bb["embedding_size"])]) < 1:
            raise ValueError("backbone: embedding_size, hidden_sizes and depths must be >= 1")
        if bb["layer_type"] not in ("basic", "bottleneck"):
            raise ValueError(
                f"backbone.layer_type: 'basic' or 'bottleneck'; got {bb['layer_type']!r}"
            )
        set_(self, "backbone", {k: bb[k] for k in BACKBONE_KEYS})
        for name in ("width", "heads", "n_fusion", "resolution", "caption_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1; got {getattr(self, name)}")
        if self.n_filter < 0:
            raise ValueError(f"n_filter: must be >= 0; got {self.n_filter}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.width % 4:
            raise ValueError(
                f"width: must be a multiple of 4 (2D sin-cos positions); got {self.width}"
            )
        if self.resolution < 32:
            raise ValueError(f"resolution: must be >= 32 px; got {self.resolution}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1); got {self.dropout}")
        for name in ("accept_threshold", "loop_threshold"):
            if getattr(self, name) is not None:
                t = float(getattr(self, name))
                if not 0.0 < t < 1.0:
                    raise ValueError(f"{name}: must be in (0, 1) or null; got {t}")
                set_(self, name, t)
        classes = tuple(str(c) for c in self.classes)
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise ValueError(f"classes: need >= 2 distinct names; got {classes}")
        if AVAILABLE not in classes:
            raise ValueError(f"classes: must include {AVAILABLE!r} (the reward); got {classes}")
        set_(self, "classes", classes)
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion: one of {FUSIONS}; got {self.fusion!r}")
        mods = (
            tuple(self.modalities) if not isinstance(self.modalities, str) else (self.modalities,)
        )
        allowed = MODALITIES if self.fusion == "late" else EARLY_MODALITIES
        bad = [m for m in mods if m not in allowed]
        if bad or len(set(mods)) != len(mods):
            hint = (
                f" ({sorted(set(bad) & set(ALIGNED_MODALITIES))} need fusion: early)"
                if set(bad) & set(ALIGNED_MODALITIES) and self.fusion == "late"
                else ""
            )
            raise ValueError(
                f"modalities: distinct names from {allowed} with fusion {self.fusion!r}; "
                f"got {mods}{hint}"
            )
        if self.fusion == "late" and not set(mods) & set(IMAGE_MODALITIES):
            raise ValueError(
                f"modalities: need at least one image in {IMAGE_MODALITIES}; got {mods}"
            )
        if self.fusion == "early" and "generated" not in mods:
            raise ValueError(f"modalities: early fusion needs 'generated'; got {mods}")
        set_(self, "modalities", tuple(m for m in ALL_MODALITIES if m in mods))  # canonical
        from rewardkit.world.oracle import TARGET_KINDS

        heads = (self.measurements,) if isinstance(self.measurements, str) else self.measurements
        heads = tuple(str(m) for m in heads)
        bad = [m for m in heads if m not in TARGET_KINDS]
        if bad or len(set(heads)) != len(heads):
            raise ValueError(
                f"measurements: distinct names from {sorted(TARGET_KINDS)}; got {list(heads)}"
            )
        if heads and self.fusion != "early":
            raise ValueError("measurements: measurement heads need fusion: early")
        set_(self, "measurements", heads)
        if self.stem_stride not in (1, 2) or isinstance(self.stem_stride, bool):
            raise ValueError(f"stem_stride: 1 or 2; got {self.stem_stride!r}")
        if self.stem_stride != 1 and self.fusion != "early":
            raise ValueError("stem_stride: a strided stem needs fusion: early")
        if isinstance(self.ensemble, bool) or int(self.ensemble) < 1:
            raise ValueError(f"ensemble: the number of networks, >= 1; got {self.ensemble!r}")
        set_(self, "ensemble", int(self.ensemble))
        if self.ensemble > 1 and heads:
            raise ValueError("ensemble: an ensemble has no measurement heads (measurements: [])")

    # -- presets ---------------------------------------------------------------------

    @classmethod
    def paper(cls) -> RFNetConfig:
        """The published RFNet: ResNet-50 at 384 px, width 384, 8 heads, N1 = 1, N2 = 3."""
        return cls(
            backbone=dict(RESNET50), width=384, heads=8, n_filter=1, n_fusion=3, resolution=384
        )

    @classmethod
    def aligned(cls) -> RFNetConfig:
        """Early fusion of aligned inputs (beyond the paper; ``fusion="early"``): the
        generated image, the product as placed on the canvas and its mask in one CNN at full
        resolution (64 -> 4 px, width 32), the padded photo in a small branch, the product's
        height in cm as a number. Contact, relative size and colour similarity become
        comparisons within one receptive field instead of across 16-px tokens."""
        return cls(fusion="early", modalities=EARLY_MODALITIES, width=32, dropout=0.2)

    @classmethod
    def small(cls) -> RFNetConfig:
        """The embedded default (the field defaults): a small ResNet at 64 px."""
        return cls()

    def image_only(self) -> RFNetConfig:
        """The baseline: the same network on the generated image alone."""
        return dataclasses.replace(self, modalities=("generated",))

    def without(self, *names: str) -> RFNetConfig:
        """An ablation: this config without the given modalities."""
        unknown = [n for n in names if n not in ALL_MODALITIES]
        if unknown:
            raise ValueError(f"unknown modality {unknown}; expected names from {ALL_MODALITIES}")
        return dataclasses.replace(
            self, modalities=tuple(m for m in self.modalities if m not in names)
        )

    # -- serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        out["backbone"] = json.loads(json.dumps(self.backbone))  # deep copy, plain types
        out["classes"], out["modalities"] = list(self.classes), list(self.modalities)
        out["measurements"] = list(self.measurements)
        return out

    def to_json(self) -> str:
        """A model folder's ``config.json``: ``model_type: rfnet`` and the config."""
        return json.dumps({"model_type": MODEL_TYPE, **self.to_dict()}, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RFNetConfig:
        """Build from a dict; unknown keys are an error, missing keys take the defaults."""
        if not isinstance(data, dict):
            raise ValueError(f"RFNet config: expected a mapping; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RFNet config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @property
    def loop_accept_threshold(self) -> float | None:
        """The P(Available) Recurrent Generation accepts at by default: ``loop_threshold``,
        else the operating point (None: the most probable class)."""
        return self.loop_threshold if self.loop_threshold is not None else self.accept_threshold

    @classmethod
    def from_folder(cls, path: str | Path) -> RFNetConfig:
        """The config of a model folder (its ``config.json``) without loading weights;
        errors name the file."""
        config_file = Path(path) / CONFIG_FILE
        try:
            raw = json.loads(config_file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: missing {CONFIG_FILE} (not an RFNet folder)"
            ) from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file}: invalid JSON ({err})") from None
        if not isinstance(raw, dict) or raw.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f"{config_file}: not an RFNet config (model_type != {MODEL_TYPE!r})")
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_file}: {err}") from None

    def to_yaml(self, path: str | Path) -> Path:
        """Write the config as YAML (atomically); returns ``path``."""
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return Path(path)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RFNetConfig:
        """Read a YAML config; errors name the file."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML ({err})") from None
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------
# Model


def _conv_block(ci: int, co: int, stride: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU, the first with ``stride``."""
    return nn.Sequential(
        nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(),
        nn.Conv2d(co, co, 3, 1, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(),
    )  # fmt: skip


def _measurement_heads(features: int, n: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, n))


def sincos_positions_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (h*w, dim): a quarter of the channels each for
    sin/cos of the row and of the column. Parameter-free, so any grid size works."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    y = ys.flatten().float()[:, None] * omega[None]  # (h*w, dim/4)
    x = xs.flatten().float()[:, None] * omega[None]  # (h*w, dim/4)
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)  # (h*w, dim)


class FeatureFilter(nn.Module):
    """One feature-filtering block: the caption selects what of the product matters.

    ``e_f = W3((W1 CrossAttn(q=e_o, kv=e_c)) * (W2 e_o)) + e_o`` with W1..W3 1x1 convs
    (``nn.Linear`` per token) and ``*`` elementwise.
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_product = nn.LayerNorm(width)
        self.norm_caption = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.attended_conv = nn.Linear(width, width)  # W1
        self.product_conv = nn.Linear(width, width)  # W2
        self.out_conv = nn.Linear(width, width)  # W3

    def forward(
        self, e_o: torch.Tensor, e_c: torch.Tensor, caption_pad: torch.Tensor
    ) -> torch.Tensor:
        """e_o (B, L, D) product tokens, e_c (B, T, D) caption tokens, caption_pad (B, T)
        True at padding -> filtered product tokens (B, L, D)."""
        q = self.norm_product(e_o)  # (B, L, D)
        kv = self.norm_caption(e_c)  # (B, T, D)
        attended, _ = self.attn(q, kv, kv, key_padding_mask=caption_pad, need_weights=False)
        gated = self.attended_conv(attended) * self.product_conv(q)  # (B, L, D)
        return self.out_conv(gated) + e_o  # (B, L, D)


class RFNet(nn.Module):
    """The inspector network (architecture in the module docstring).

    Args:
        config: The architecture; ``RFNetConfig()`` is the embedded small model.
    """

    def __init__(self, config: RFNetConfig | None = None) -> None:
        super().__init__()
        config = config or RFNetConfig()
        self.config = config
        self.measure: nn.Module | None = None
        self.members: nn.ModuleList | None = None
        if config.ensemble > 1:
            member = dataclasses.replace(config, ensemble=1)
            self.members = nn.ModuleList(RFNet(member) for _ in range(config.ensemble))
            return
        if config.fusion == "early":
            self._init_early()
            return
        d = config.width
        mods = config.modalities
        self.image_modalities = tuple(m for m in IMAGE_MODALITIES if m in mods)
        self.filters_caption = "caption" in mods and "product" in mods and config.n_filter > 0
        self.caption_in_fusion = "caption" in mods and "product" not in mods
        with _quiet_progress():
            self.backbone = ResNetModel(ResNetConfig(**config.backbone))
        channels = config.backbone["hidden_sizes"][-1]  # the last stage's output width
        self.image_proj = nn.Conv2d(channels, d, kernel_size=1)  # (B, C, h, w) -> (B, D, h, w)
        self.caption_proj = nn.Linear(config.caption_dim, d) if "caption" in mods else None
        self.type_embed = nn.Parameter(torch.randn(len(mods), d) * 0.02)  # one per modality
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        n_filter = config.n_filter if self.filters_caption else 0
        self.filters = nn.ModuleList(
            FeatureFilter(d, config.heads, config.dropout) for _ in range(n_filter)
        )
        self.fusion = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d,
                config.heads,
                dim_feedforward=4 * d,
                dropout=config.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )  # fmt: skip
            for _ in range(config.n_fusion)
        )
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, len(config.classes)))
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("pixel_std", std, persistent=False)  # (1, 3, 1, 1)

    def _init_early(self) -> None:
        """Early fusion's modules (``RFNetConfig.aligned``): a scene CNN over the stacked
        generated image, placed product, mask and two coordinate channels (R -> R/16, or
        R/32 with ``stem_stride`` 2), a photo branch (R -> R/8), and an MLP head on their
        mean- and max-pooled features and the numbers (log height, the product's pixel height
        from the mask)."""
        c, w, mods = self.config, self.config.width, self.config.modalities
        self.image_modalities = tuple(m for m in ("product", "generated") if m in mods)
        self.scene_channels = 3 + (4 if "placed" in mods else 0)
        self.scene = nn.Sequential(
            _conv_block(self.scene_channels + 2, w, c.stem_stride), _conv_block(w, 2 * w, 2),
            _conv_block(2 * w, 4 * w, 2), _conv_block(4 * w, 4 * w, 2),
            _conv_block(4 * w, 4 * w, 2),
        )  # fmt: skip
        features = 8 * w
        self.photo = None
        if "product" in mods:
            self.photo = nn.Sequential(
                _conv_block(3, 16, 2), _conv_block(16, 32, 2), _conv_block(32, 64, 2)
            )
            features += 128
        self.n_numbers = int("height" in mods) + int("placed" in mods)
        self.head = nn.Sequential(
            nn.Linear(features + self.n_numbers, 128), nn.ReLU(), nn.Dropout(c.dropout),
            nn.Linear(128, len(c.classes)),
        )  # fmt: skip
        if c.measurements:  # measurement heads, on the features the verdict reads
            self.measure = _measurement_heads(features + self.n_numbers, len(c.measurements))

    def add_measurement_heads(self, names: Sequence[str]) -> None:
        """Give an early-fusion model without them new (randomly initialised) measurement
        heads for ``names`` (fine-tuning a model with a measurement loss).

        Raises:
            ValueError: The model already has measurement heads, is not early fusion, or a
                name is not a known measurement.
        """
        if self.measure is not None:
            raise ValueError(f"this RFNet already has measurement heads {self.config.measurements}")
        if self.members is not None:
            raise ValueError("an ensemble takes no measurement heads; give them to its members")
        config = dataclasses.replace(self.config, measurements=tuple(names))  # validates
        self.config = config
        head = _measurement_heads(self.head[0].in_features, len(config.measurements))
        self.measure = head.to(device=self.device, dtype=self.dtype)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters."""
        return next(self.parameters()).dtype

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    # -- inputs ----------------------------------------------------------------------

    def _check_inputs(self, inputs: dict[str, torch.Tensor | None]) -> int:
        """Validate the inputs this config uses; return the batch size."""
        batch: int | None = None

        def same_batch(name: str, n: int) -> None:
            nonlocal batch
            if batch is None:
                batch = n
            elif n != batch:
                raise ValueError(f"{name}: batch size {n} differs from the other inputs' {batch}")

        for name in self.image_modalities:
            x = inputs[name]
            c = 1 if name in MAP_MODALITIES else 3
            spec = f"a float tensor [B, {c}, H, W] in [0, 1]"
            if x is None:
                raise ValueError(
                    f"RFNet with modalities {self.config.modalities} needs {name!r} ({spec}); "
                    "got None"
                )
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name}: expected {spec}; got shape {shape}")
            if not x.is_floating_point():
                raise ValueError(f"{name}: expected {spec}; got dtype {x.dtype}")
            same_batch(name, x.shape[0])
        if "caption" in self.config.modalities:
            tokens, mask = inputs["caption_tokens"], inputs["caption_mask"]
            dim = self.config.caption_dim
            spec = f"a float tensor [B, T, {dim}] of caption token states"
            if tokens is None:
                raise ValueError(
                    f"RFNet with modalities {self.config.modalities} needs caption_tokens "
                    f"({spec}); got None"
                )
            if not isinstance(tokens, torch.Tensor):
                raise ValueError(f"caption_tokens: expected {spec}; got {type(tokens).__name__}")
            if tokens.ndim != 3 or tokens.shape[-1] != dim or not tokens.is_floating_point():
                raise ValueError(
                    f"caption_tokens: expected {spec}; got {tuple(tokens.shape)} {tokens.dtype}"
                )
            same_batch("caption_tokens", tokens.shape[0])
            if mask is not None:
                if tuple(mask.shape) != tuple(tokens.shape[:2]):
                    raise ValueError(
                        f"caption_mask: expected shape {tuple(tokens.shape[:2])} (B, T); "
                        f"got {tuple(mask.shape)}"
                    )
                empty = (mask == 0).all(dim=1)
                if empty.any():
                    rows = torch.nonzero(empty).flatten().tolist()[:5]
                    raise ValueError(f"caption_mask: row(s) {rows} have no valid token")
        assert batch is not None  # config validation guarantees one image modality
        return batch

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> normalised (B, 3, R, R), differentiably."""
        x = images.to(device=self.device, dtype=self.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W): maps as grey images
        r = self.config.resolution
        if tuple(x.shape[-2:]) != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)  # (B, 3, R, R)

    def _image_tokens(self, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode every image modality in one backbone pass -> tokens (B, h*w, D) each."""
        names = list(images)
        pixels = torch.cat([self._pixels(images[n]) for n in names])  # (k*B, 3, R, R)
        feats = self.backbone(pixel_values=pixels).last_hidden_state  # (k*B, C, h, w)
        t = self.image_proj(feats)  # (k*B, D, h, w)
        h, w = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)  # (k*B, h*w, D)
        pos = sincos_positions_2d(h, w, self.config.width).to(t)  # (h*w, D)
        t = t + pos
        return {
            n: chunk + self._type(n) for n, chunk in zip(names, t.chunk(len(names)), strict=True)
        }

    def _type(self, name: str) -> torch.Tensor:
        return self.type_embed[self.config.modalities.index(name)]  # (D,)

    # -- forward ---------------------------------------------------------------------

    def forward(
        self,
        product: torch.Tensor | None = None,
        generated: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
        saliency: torch.Tensor | None = None,
        caption_tokens: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
        placed: torch.Tensor | None = None,
        height_cm: torch.Tensor | None = None,
        measurements: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, n_classes) over ``config.classes``; with ``measurements``, also the
        measurement heads' predictions (B, len(config.measurements)).

        Inputs of modalities the config does not use may be None (they are ignored if given).

        Args:
            product: Product photos composited on white, float [B, 3, H, W] in [0, 1].
            generated: Generated ad images, float [B, 3, H, W] in [0, 1].
            depth: Depth maps of the generated images, float [B, 1, H, W] in [0, 1].
            saliency: Saliency maps of the generated images, float [B, 1, H, W] in [0, 1].
            caption_tokens: Caption token states, float [B, T, caption_dim].
            caption_mask: [B, T], nonzero at real tokens; None means all tokens are real.
            placed: Early fusion: the product as placed on the generated image's canvas, on
                white, with its placement mask, float [B, 4, H, W] in [0, 1]
                (``world.placement.placed_on_white``).
            height_cm: Early fusion: the product's real height in cm, float [B].
            measurements: Also return the measurement heads' outputs (targets as
                ``world.oracle.measurement_target`` makes them).

        Raises:
            ValueError: A used input is missing or has the wrong shape or dtype, or
                ``measurements`` is asked of a model without measurement heads.
        """
        if measurements and self.measure is None:
            raise ValueError("measurements=True: this RFNet has no measurement heads "
                             "(config.measurements is empty)")  # fmt: skip
        if self.members is not None:  # log of the members' mean class probabilities
            args = (product, generated, depth, saliency, caption_tokens, caption_mask, placed,
                    height_cm)  # fmt: skip
            log_probs = torch.stack([torch.log_softmax(m(*args).float(), -1) for m in self.members])
            mean = torch.logsumexp(log_probs, 0) - math.log(len(self.members))  # (B, C)
            return mean.to(self.dtype)
        if self.config.fusion == "early":
            return self._forward_early(product, generated, placed, height_cm, measurements)
        inputs = {
            "product": product, "generated": generated, "depth": depth, "saliency": saliency,
            "caption_tokens": caption_tokens, "caption_mask": caption_mask,
        }  # fmt: skip
        batch = self._check_inputs(inputs)
        tokens = self._image_tokens({n: inputs[n] for n in self.image_modalities})
        pad = None  # (B, T) True at caption padding
        if "caption" in self.config.modalities:
            c = caption_tokens.to(device=self.device, dtype=self.dtype)  # (B, T, Hc)
            e_c = self.caption_proj(c) + self._type("caption")  # (B, T, D)
            if caption_mask is None:
                pad = torch.zeros(c.shape[:2], dtype=torch.bool, device=self.device)
            else:
                pad = caption_mask.to(self.device) == 0  # (B, T)
            for block in self.filters:
                tokens["product"] = block(tokens["product"], e_c, pad)  # (B, L, D)
            if self.caption_in_fusion:
                tokens["caption"] = e_c
        seq = [self.cls_token.expand(batch, -1, -1), *tokens.values()]  # [(B, 1, D), (B, L, D)...]
        x = torch.cat(seq, dim=1)  # (B, 1 + sum L, D)
        key_pad = None
        if self.caption_in_fusion:
            image_len = x.shape[1] - pad.shape[1]
            keep = torch.zeros(batch, image_len, dtype=torch.bool, device=self.device)
            key_pad = torch.cat([keep, pad], dim=1)  # (B, 1 + sum L) True = ignore
        for layer in self.fusion:
            x = layer(x, src_key_padding_mask=key_pad)  # (B, S, D)
        return self.head(x[:, 0])  # (B, n_classes)

    def _forward_early(self, product, generated, placed, height_cm, measurements=False):
        """Early fusion (``fusion="early"``): see :meth:`_init_early`."""
        mods, r = self.config.modalities, self.config.resolution
        given = {"product": product, "generated": generated, "placed": placed}
        batch = None
        for name, c in (("generated", 3), ("product", 3), ("placed", 4)):
            if name not in mods:
                continue
            x = given[name]
            spec = f"a float tensor [B, {c}, H, W] in [0, 1]"
            if x is None:
                raise ValueError(f"RFNet with modalities {mods} needs {name!r} ({spec}); got None")
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name}: expected {spec}; got shape {shape}")
            if not x.is_floating_point():
                raise ValueError(f"{name}: expected {spec}; got dtype {x.dtype}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"{name}: batch size {x.shape[0]} differs from {batch}")
            batch = x.shape[0]
        if "height" in mods:
            if height_cm is None:
                raise ValueError(
                    f"RFNet with modalities {mods} needs 'height_cm' (the product's height in "
                    "cm, a float tensor [B]); got None"
                )
            height_cm = torch.as_tensor(height_cm).to(device=self.device, dtype=self.dtype)
            if tuple(height_cm.shape) != (batch,):
                raise ValueError(
                    f"height_cm: expected shape ({batch},); got {tuple(height_cm.shape)}"
                )

        def sized(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device=self.device, dtype=self.dtype)
            if tuple(x.shape[-2:]) != (r, r):
                x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False,
                                  antialias=True)  # fmt: skip
            return x

        scene = [sized(generated)]
        numbers = []
        if "height" in mods:
            numbers.append(torch.log(height_cm.clamp_min(1e-3) / HEIGHT_SCALE_CM))
        if "placed" in mods:
            p = sized(placed)  # (B, 4, R, R)
            scene.append(p)
            numbers.append((p[:, 3] > 0.5).any(2).sum(1).to(p.dtype) / r)  # pixel height
        x = torch.cat(scene, 1)  # (B, 3 [+ 4], R, R)
        yy = torch.linspace(-1, 1, r, device=x.device, dtype=x.dtype).view(1, 1, r, 1)
        xx = torch.linspace(-1, 1, r, device=x.device, dtype=x.dtype).view(1, 1, 1, r)
        coords = [yy.expand(batch, 1, r, r), xx.expand(batch, 1, r, r)]
        f = self.scene(torch.cat([x, *coords], 1))  # (B, 4w, R/16s, R/16s), s = stem_stride
        pooled = [f.mean((2, 3)), f.amax((2, 3))]
        if self.photo is not None:
            g = self.photo(sized(product))  # (B, 64, R/8, R/8)
            pooled += [g.mean((2, 3)), g.amax((2, 3))]
        if numbers:
            pooled.append(torch.stack(numbers, 1))
        z = torch.cat(pooled, 1)  # (B, features)
        if measurements:
            return self.head(z), self.measure(z)  # (B, n_classes), (B, n_measurements)
        return self.head(z)  # (B, n_classes)

    def available_log_prob(
        self,
        product: torch.Tensor | None = None,
        generated: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
        saliency: torch.Tensor | None = None,
        caption_tokens: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
        placed: torch.Tensor | None = None,
        height_cm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log P("Available") per sample, shape (B,): the RFFT reward. Same arguments as
        :meth:`forward`; differentiable with respect to every image input."""
        logits = self(
            product, generated, depth, saliency, caption_tokens, caption_mask, placed, height_cm
        )
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, C)
        return log_probs[:, self.config.classes.index(AVAILABLE)]  # (B,)

    @classmethod
    def ensemble_of(
        cls,
        models: Sequence[RFNet],
        accept_threshold: float | None = None,
        loop_threshold: float | None = None,
    ) -> RFNet:
        """An ensemble (``config.ensemble = len(models)``) holding copies of ``models``'
        weights: their class probabilities averaged. Its operating points are the ones given
        (chosen on validation for the ensemble, not taken from a member).

        Raises:
            ValueError: Fewer than two models, a model that is itself an ensemble or has
                measurement heads, or models of different architectures (the differing
                fields are named).
        """
        if len(models) < 2:
            raise ValueError(f"ensemble_of: needs >= 2 models; got {len(models)}")

        def arch(m: RFNet) -> dict[str, Any]:
            return dataclasses.replace(
                m.config, accept_threshold=None, loop_threshold=None
            ).to_dict()

        first = arch(models[0])
        for i, m in enumerate(models):
            if m.config.ensemble != 1 or m.config.measurements:
                raise ValueError(f"ensemble_of: model {i} is an ensemble or has measurement heads")
            this = arch(m)
            diff = [k for k in first if this[k] != first[k]]
            if diff:
                raise ValueError(f"ensemble_of: model {i} differs from model 0 in {diff}")
        config = dataclasses.replace(
            models[0].config, ensemble=len(models), accept_threshold=accept_threshold,
            loop_threshold=loop_threshold,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            out = cls(config)
        for member, m in zip(out.members, models, strict=True):
            member.load_state_dict(m.state_dict(), strict=True)
        return out.to(device=models[0].device, dtype=models[0].dtype).eval()

    # -- weights ---------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` (``model_type: rfnet`` + the config, backbone included) and
        ``model.safetensors`` into ``path``. The folder is written beside ``path`` and renamed
        into place (replacing an existing one). Returns ``path``."""

        def write(tmp: Path) -> None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(self.config.to_json())

        return write_folder_atomic(path, write)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> RFNet:
        """Load a folder written by :meth:`save_pretrained`, strictly.

        Args:
            path: The model folder (``config.json``, ``model.safetensors``).
            device: Where to put the model (default: CPU).
            dtype: Parameter dtype (default: as saved).

        Returns:
            The model, in eval mode.

        Raises:
            FileNotFoundError: The folder or one of its files is missing.
            ValueError: Invalid config, or weights that do not match the architecture
                exactly (missing, unexpected or mismatched keys are named).
        """
        folder = Path(path)
        config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for file in (config_file, weights_file):
            if not file.is_file():
                raise FileNotFoundError(f"{folder}: missing {file.name} (not an RFNet folder)")
        config = RFNetConfig.from_folder(folder)
        with torch.random.fork_rng(devices=[]):  # building initialises; keep the caller's RNG
            model = cls(config)
        state = load_file(weights_file)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = sorted(
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
            for k in set(state) & set(expected)
            if state[k].shape != expected[k].shape
        )
        _check_loading_info(
            {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched},
            weights_file,
        )
        model.load_state_dict(state, strict=True)
        model.to(device=device or "cpu", dtype=dtype)
        return model.eval()

    @classmethod
    def backbone_from_pretrained(cls, path: str | Path, config: RFNetConfig | None = None) -> RFNet:
        """A new RFNet whose image encoder starts from a saved transformers ResNet.

        The backbone architecture is read from the folder's ``config.json`` (replacing
        ``config.backbone``); the rest of the network is randomly initialised.

        Args:
            path: A folder saved from ``ResNetModel`` or ``ResNetForImageClassification``
                (whose classifier head is dropped).
            config: Everything but the backbone (default: :meth:`RFNetConfig.small`).

        Raises:
            FileNotFoundError: ``path`` is not a model folder.
            ValueError: Not a ResNet, or encoder weights missing or of the wrong shape.
        """
        folder = Path(path)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder}: missing {CONFIG_FILE} (not a ResNet folder)")
        resnet_config = ResNetConfig.from_pretrained(folder)
        if resnet_config.model_type != "resnet":
            raise ValueError(f"{folder}: model_type {resnet_config.model_type!r} is not 'resnet'")
        backbone = {k: getattr(resnet_config, k) for k in BACKBONE_KEYS}
        config = dataclasses.replace(config or RFNetConfig.small(), backbone=backbone)
        model = cls(config)
        with _quiet_progress():
            resnet, info = ResNetModel.from_pretrained(
                folder, use_safetensors=True, output_loading_info=True
            )
        info = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys")} | {
            "unexpected_keys": [
                k for k in info.get("unexpected_keys", []) if not k.startswith("classifier.")
            ]
        }
        _check_loading_info(info, folder)
        model.backbone.load_state_dict(resnet.state_dict(), strict=True)
        return model


def verdict_indices(
    probs: np.ndarray | torch.Tensor, classes: Sequence[str], accept_threshold: float | None
) -> np.ndarray:
    """Verdict class indices (N,) for class probabilities ``probs`` (N, C): the most probable
    class or, with ``accept_threshold``, Available exactly when P(Available) >= it and the
    most probable defect otherwise (an operating point chosen on validation)."""
    p = (
        probs.detach().float().cpu().numpy()
        if isinstance(probs, torch.Tensor)
        else np.asarray(probs)
    )
    if p.ndim != 2 or p.shape[1] != len(classes):
        raise ValueError(f"probs: expected shape (N, {len(classes)}); got {p.shape}")
    if accept_threshold is None:
        return p.argmax(1)
    a = list(classes).index(AVAILABLE)
    defects = p.copy()
    defects[:, a] = -np.inf
    return np.where(p[:, a] >= accept_threshold, a, defects.argmax(1))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
