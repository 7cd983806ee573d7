"""The inspector: RFNet plus the modality extractors it needs, behind one call.

``Inspector(product, generated, captions) -> logits (B, C)`` computes depth and saliency of
the generated images with the extractors and the caption tokens with the (frozen) caption
encoder, then runs RFNet. Everything between the generated pixels and the logits is
differentiable, so Recurrent Generation uses it as the accept test and RFFT back-propagates
``available_log_prob`` into the generator.

A model folder is an RFNet folder (``config.json`` + ``model.safetensors``); an optional
``inspector.json`` names the depth / saliency / caption folders to use (relative to the
folder, or absolute), the embedded defaults otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rewardkit.models.rfnet import AVAILABLE, RFNet, verdict_indices

__all__ = ["INSPECTOR_FILE", "Inspector"]

INSPECTOR_FILE = "inspector.json"


class Inspector(nn.Module):
    """RFNet with its extractors.

    Args:
        rfnet: The classifier.
        depth: Map extractor (images -> (B, 1, H, W) in [0, 1]) or None if unused.
        saliency: Map extractor or None if unused.
        caption: Caption encoder with ``encode(list[str]) -> (tokens, mask)`` or None.
    """

    def __init__(self, rfnet: RFNet, depth=None, saliency=None, caption=None) -> None:
        super().__init__()
        self.rfnet = rfnet
        mods = set(rfnet.config.modalities)
        for kind, module in (("depth", depth), ("saliency", saliency), ("caption", caption)):
            if kind in mods and module is None:
                raise ValueError(f"RFNet uses {kind!r} but no {kind} extractor was given")
        self.depth = depth if "depth" in mods else None
        self.saliency = saliency if "saliency" in mods else None
        self.caption = caption if "caption" in mods else None
        self.name_or_path = ""  # the folder it was loaded from (set by from_pretrained)
        self.requires_grad_(False)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.rfnet.config.classes)

    @property
    def accept_threshold(self) -> float | None:
        """The operating point in the RFNet's config (None: the most probable class)."""
        return self.rfnet.config.accept_threshold

    def verdicts(self, probs, threshold: float | None = None) -> list[str]:
        """Class names for class probabilities (N, C), at ``threshold`` (Available when
        P(Available) >= it) or, when None, at the model's operating point."""
        classes = self.classes
        threshold = self.accept_threshold if threshold is None else threshold
        return [classes[k] for k in verdict_indices(probs, classes, threshold)]

    @property
    def device(self) -> torch.device:
        """The device of RFNet's parameters (the extractors live beside it)."""
        return next(self.rfnet.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Inspector:
        """Load an RFNet folder and its extractors (``inspector.json`` or the defaults) onto
        ``device``."""
        from rewardkit.models.modalities import load_modality

        folder = Path(path)
        rfnet = RFNet.from_pretrained(folder)
        pointers: dict[str, str] = {}
        if (folder / INSPECTOR_FILE).is_file():
            try:
                pointers = json.loads((folder / INSPECTOR_FILE).read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{folder / INSPECTOR_FILE}: invalid JSON ({err})") from err
        mods = set(rfnet.config.modalities)
        extractors = {}
        for kind in ("depth", "saliency", "caption"):
            if kind not in mods:
                extractors[kind] = None
                continue
            pointer = pointers.get(kind)
            if pointer is not None and not Path(pointer).is_absolute():
                pointer = str(folder / pointer)
            extractors[kind] = load_modality(kind, pointer)
        inspector = cls(rfnet, **extractors)
        inspector.name_or_path = str(folder)
        return inspector.to(device).eval()

    def save_pointers(self, folder: str | Path, pointers: dict[str, str]) -> None:
        """Record which extractor folders this RFNet was trained with."""
        (Path(folder) / INSPECTOR_FILE).write_text(json.dumps(pointers, indent=2) + "\n")

    @property
    def uses_placement(self) -> bool:
        """Whether the RFNet reads where the product was placed and its height (early
        fusion: ``placed`` / ``heights`` must then be given to :meth:`forward`)."""
        return bool({"placed", "height"} & set(self.rfnet.config.modalities))

    def missing_heights(self, heights: Sequence[float | None]) -> list[int]:
        """Indices of images whose product height (cm) is missing or not a positive number
        (None, 0, NaN) when this RFNet reads the height; [] when it does not. The one check
        every entry point (inspect, serve, Recurrent Generation) reports in its own terms."""
        if "height" not in self.rfnet.config.modalities:
            return []
        return [i for i, v in enumerate(heights) if v is None or not float(v) > 0]

    def placement_inputs(
        self, photos: Sequence[np.ndarray], fills: Sequence[float | None],
        heights: Sequence[float | None],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """``placed`` (B, 4, R, R) float in [0, 1] and ``heights`` (B,) for :meth:`forward`
        from RGBA product photos, their placement fills (None: the generator's default) and
        heights in cm; (None, None) when the RFNet reads neither."""
        if not self.uses_placement:
            return None, None
        from rewardkit.world.placement import DEFAULT_FILL, placed_on_white

        size = self.rfnet.config.resolution
        placed = None
        if "placed" in self.rfnet.config.modalities:
            layers = [
                placed_on_white(p, size, DEFAULT_FILL if f is None else float(f))
                for p, f in zip(photos, fills, strict=True)
            ]
            placed = torch.from_numpy(np.stack(layers)).permute(0, 3, 1, 2).float() / 255.0
        h = None
        if "height" in self.rfnet.config.modalities:
            missing = self.missing_heights(heights)
            if missing:
                raise ValueError(
                    f"image {missing[0]}: no product height (cm); this inspector reads it"
                )
            h = torch.tensor([float(v) for v in heights], dtype=torch.float32)
        return placed, h

    def forward(
        self,
        product: torch.Tensor,
        generated: torch.Tensor,
        captions: list[str],
        placed: torch.Tensor | None = None,
        heights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, C) for product photos (B, 3, H, W) composited on white, generated
        images (B, 3, H, W) in [0, 1] and one caption per image; an early-fusion RFNet also
        reads ``placed`` (B, 4, H, W) and ``heights`` (B,) (:meth:`placement_inputs`).
        Inputs on another device are moved to the inspector's (differentiably)."""
        if len(captions) != generated.shape[0]:
            raise ValueError(f"got {generated.shape[0]} images but {len(captions)} captions")
        product, generated = product.to(self.device), generated.to(self.device)
        if self.uses_placement:
            return self.rfnet(
                product=product, generated=generated,
                placed=None if placed is None else placed.to(self.device),
                height_cm=None if heights is None else torch.as_tensor(heights).to(self.device),
            )  # fmt: skip
        inputs = {"product": product, "generated": generated}
        inputs["depth"] = self.depth(generated) if self.depth is not None else None
        inputs["saliency"] = self.saliency(generated) if self.saliency is not None else None
        tokens = mask = None
        if self.caption is not None:
            with torch.no_grad():
                tokens, mask = self.caption.encode(list(captions))
            tokens, mask = tokens.to(generated.device).float(), mask.to(generated.device)
        return self.rfnet(**inputs, caption_tokens=tokens, caption_mask=mask)

    def available_log_prob(
        self,
        product: torch.Tensor,
        generated: torch.Tensor,
        captions: list[str],
        placed: torch.Tensor | None = None,
        heights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log P(Available) per image (B,): the reward RFFT maximises."""
        logits = self(product, generated, captions, placed, heights)
        return torch.log_softmax(logits, dim=-1)[:, self.classes.index(AVAILABLE)]
