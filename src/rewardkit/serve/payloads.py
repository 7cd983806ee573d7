"""Request bodies of the /v1 endpoints and how their images are read.

Images travel as base64 (a ``data:image/...;base64,`` prefix is accepted) in JSON, or as
files in a multipart form (converted to the same JSON by the server's middleware). Each image
is written to a private temporary folder and read by the very functions the batch commands
use (``rewardkit.io.decode_image`` and the loaders of ``scoring`` and ``commands.inspect``),
so a served result is the command's on the same file.

A request that cannot be served is answered with one line naming the field:
:class:`RequestError` (status 413 for a limit, 422 for a malformed value).
"""

from __future__ import annotations

import base64
import binascii
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rewardkit.io import probe_image

__all__ = [
    "GenerateRequest",
    "InspectRequest",
    "RequestError",
    "ScoreRequest",
    "Uploads",
    "per_image",
]


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line ``message`` that starts
    with the field (``images[2]: not an image file ...``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


IMAGE_DOC = "base64 of a PNG, JPEG, WebP, TIFF, BMP or GIF file (a data: URL prefix is accepted)"


class ScoreRequest(BaseModel):
    """``POST /v1/score``: images and their prompts -> one reward score per image."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(description=f"the images to score, each {IMAGE_DOC}")
    prompts: list[str] | None = Field(
        default=None, description="one prompt per image (or one for all)"
    )
    prompt: str | None = Field(
        default=None, description="one prompt for every image (as `rewardkit score --prompt`)"
    )


class InspectRequest(BaseModel):
    """``POST /v1/inspect``: generated images, their product photos and captions -> the
    inspector's verdict and per-class probabilities."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(description=f"generated ad images, each {IMAGE_DOC}")
    products: list[str] = Field(
        description="the product photo of each image (RGBA, or on white), or one for all"
    )
    captions: list[str] = Field(
        default_factory=lambda: [""], description="the product caption of each image, or one"
    )
    heights_cm: list[float] | None = Field(
        default=None,
        description="the product's real height in cm per image, or one (early-fusion "
        "inspectors read it; default: 'N cm' in the caption)",
    )
    fills: list[float] | None = Field(
        default=None,
        description="product size / frame each image was generated at, or one (early-fusion "
        "inspectors; default 0.4)",
    )


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: a product photo and a prompt -> an ad image, judged."""

    model_config = ConfigDict(extra="forbid")
    product: str = Field(description=f"the product photo (RGBA, or on white), {IMAGE_DOC}")
    prompt: str = Field(min_length=1, description="the scene to paint around the product")
    caption: str = Field(default="", description='product caption, e.g. "mug, 10 cm"')
    product_height_cm: float | None = Field(
        default=None, gt=0, description="real height (the oracle judge needs it or a caption)"
    )
    fill: float | None = Field(
        default=None, gt=0, lt=1, description="product size / frame (default 0.4)"
    )
    until_accepted: bool = Field(
        default=False, description="Recurrent Generation: regenerate until the judge accepts"
    )
    max_attempts: int | None = Field(
        default=None, ge=1, description="attempt budget (until_accepted; default: the server's)"
    )
    seed: int = Field(default=0, description="as `rewardkit generate --seed`")
    judge: Literal["inspector", "oracle", "none"] = Field(
        default="inspector", description="who gives the verdicts: RFNet, AdWorld's oracle, none"
    )
    return_attempts: bool = Field(
        default=False, description="also return every attempt's image (base64 PNG)"
    )


def per_image(values: list | None, n: int, field: str, default) -> list:
    """``values`` for ``n`` images: one each, or one for all (None: ``default`` for all)."""
    if values is None:
        return [default] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise RequestError(422, f"{field}: {len(values)} values for {n} images (give 1 or {n})")
    return list(values)


class Uploads:
    """A private temporary folder holding a request's images as files, named by field
    (``images[0]``); removed on exit. Messages about a file name the field."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.root = Path(tempfile.mkdtemp(prefix="rewardkit-serve-"))

    def __enter__(self) -> Uploads:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def write(self, field: str, data: str) -> Path:
        """Decode ``data`` (base64) into a file; its header must say it is an image within
        the pixel limit (413 over it, 422 for anything unreadable)."""
        if not isinstance(data, str) or not data:
            raise RequestError(422, f"{field}: empty image")
        text = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
        try:
            raw = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"{field}: not valid base64") from None
        if not raw:
            raise RequestError(422, f"{field}: empty image")
        path = self.root / field
        path.write_bytes(raw)
        try:
            probe = probe_image(path)
        except (OSError, ValueError) as err:
            raise RequestError(422, self.message(err)) from None
        pixels = probe.width * probe.height
        if pixels > self.max_pixels:
            raise RequestError(
                413,
                f"{field}: {probe.width} x {probe.height} = {pixels} pixels, over the server's "
                f"limit of {self.max_pixels} (--max-pixels)",
            )
        return path

    def message(self, err: BaseException) -> str:
        """An error's text with this folder's paths replaced by their field names."""
        return " ".join(str(err).replace(f"{self.root}/", "").split())
