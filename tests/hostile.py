"""A corpus of hostile image files, with a few good AdWorld-like ones, for every command.

:func:`build_hostile_corpus` writes one folder that ``score``, ``inspect``, ``generate``
(as product photos) and, through :func:`write_label_manifest`, ``world label`` all take.
Every good file is a square AdWorld product photo on white (or cut out), so it is a fair
image to score, inspect and judge and a usable product photo; every bad file must be
skipped with a reason containing its entry in ``bad``. Used by ``tests/test_image_reader.py``
and ``benchmarks/bench_hostile_images.py``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from rewardkit.world.products import render_cutout, sample_product

BIG_SIDE = 12000  # under the reader's pixel limit: must be read, within bounded memory
BOMB_SIDE = 20000  # over it: must be refused from the header
PRODUCT_HEIGHT_CM = 20.0


@dataclass
class HostileCorpus:
    """Where the corpus is and what each file must do.

    Attributes:
        folder: The folder of images (good and bad).
        good: File names every command must process.
        bad: File name -> a fragment of the reason it must be skipped with.
        product: A good product photo outside ``folder`` (for ``inspect --product`` and the
            label manifest).
        upright: What ``exif_rotated.jpg`` shows once its EXIF orientation is applied.
        grey_pair: The 8-bit and 16-bit greyscale copies of one picture.
    """

    folder: Path
    good: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    product: Path = Path()
    upright: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3), np.uint8))
    grey_pair: tuple[str, str] = ("grey8.png", "grey16.png")


def adworld_cutout(seed: int, size: int) -> np.ndarray:
    """An AdWorld product photo (size, size, 4) uint8, alpha = the product."""
    product = sample_product(np.random.default_rng(seed), f"hostile-{seed}")
    return render_cutout(product, size)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) -> (H, W, 3) uint8 composited on white."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3] * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def _png(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _write_big_png(path: Path, side: int) -> None:
    """An RGB PNG of side x side: white with a flat two-colour product (a small file)."""
    im = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    draw.rectangle((side // 4, side // 5, 3 * side // 4, 9 * side // 10), fill=(40, 90, 200))
    draw.rectangle((side // 3, side // 3, 2 * side // 3, side // 2), fill=(230, 200, 40))
    im.save(path, format="PNG", compress_level=1)
    del draw, im


def build_hostile_corpus(root: str | os.PathLike, big: bool = True) -> HostileCorpus:
    """Write the corpus under ``root`` (``root/images`` and ``root/product.png``).

    Args:
        root: An empty or new folder.
        big: Include the 12000 x 12000 PNG (a few seconds to write and to read).
    """
    root = Path(root)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = HostileCorpus(folder=folder, product=root / "product.png")
    Image.fromarray(adworld_cutout(0, 96)).save(corpus.product)

    def good(name: str) -> Path:
        corpus.good.append(name)
        return folder / name

    picture = on_white(adworld_cutout(1, 64))  # (64, 64, 3) a product on white
    Image.fromarray(adworld_cutout(2, 96)).save(good("adworld_cutout.png"))
    Image.fromarray(on_white(adworld_cutout(3, 96))).save(good("adworld.jpg"), quality=95)
    Image.fromarray(on_white(adworld_cutout(4, 80))).save(good("adworld.webp"), lossless=True)
    grey = np.asarray(Image.fromarray(picture).convert("L"))  # (64, 64) uint8
    Image.fromarray(grey).save(good("grey8.png"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(good("grey16.png"))  # I;16, full range
    Image.fromarray(picture).convert("CMYK").save(good("cmyk.jpg"), quality=95)
    paletted = Image.fromarray(on_white(adworld_cutout(5, 64))).quantize(colors=64)
    colours = np.asarray(paletted.getpalette()[: 3 * 64]).reshape(-1, 3)
    white = int(np.argmax(colours.sum(1)))
    paletted.save(good("palette.png"), transparency=white)  # white index is transparent
    corpus.upright = on_white(adworld_cutout(6, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored = np.ascontiguousarray(np.rot90(corpus.upright, 1))  # turned counter-clockwise
    Image.fromarray(stored).save(good("exif_rotated.jpg"), quality=95, exif=exif)
    for suffix in ("tif", "bmp", "gif"):
        Image.fromarray(on_white(adworld_cutout(7, 64))).save(good(f"photo.{suffix}"))
    Image.fromarray(on_white(adworld_cutout(8, 64))).save(good("café_商品.png"))
    if big:
        _write_big_png(good(f"big_{BIG_SIDE}.png"), BIG_SIDE)

    def bad(name: str, reason: str) -> Path:
        corpus.bad[name] = reason
        return folder / name

    bad("empty.png", "empty file (0 bytes)").write_bytes(b"")
    data = _png(on_white(adworld_cutout(9, 96)))
    bad("truncated.png", "unreadable image").write_bytes(data[: len(data) // 2])
    bad("text.png", "not an image file").write_text("this is a text file, not a picture\n")
    bomb = Image.new("1", (BOMB_SIDE, BOMB_SIDE))  # 50 MB in memory, ~50 kB on disk
    bomb.save(bad(f"bomb_{BOMB_SIDE}.png", f"image too large ({BOMB_SIDE} x {BOMB_SIDE} pixels"))
    del bomb
    os.symlink(folder / "gone.png", bad("broken_link.png", "broken symbolic link"))
    bad("notes.txt", "not an image file type").write_text("notes\n")
    bad(".hidden.png", "hidden file").write_bytes(_png(picture))
    corpus.good.sort()
    return corpus


def write_label_manifest(corpus: HostileCorpus, path: str | os.PathLike) -> Path:
    """A ``world label`` manifest beside the corpus folder: every entry as an image (with the
    good product photo), then every bad entry as the product photo of a good image."""
    path = Path(path)
    base = path.parent
    folder = os.path.relpath(corpus.folder, base)
    product = os.path.relpath(corpus.product, base)
    names = corpus.good + list(corpus.bad)
    images = [f"{folder}/{n}" for n in names] + [f"{folder}/{corpus.good[0]}"] * len(corpus.bad)
    products = [product] * len(names) + [f"{folder}/{n}" for n in corpus.bad]
    table = pa.table(
        {
            "path": pa.array(images, pa.large_string()),  # as pandas 3 and polars write them
            "product_path": pa.array(products, pa.large_string()),
            "product_height_cm": [PRODUCT_HEIGHT_CM] * len(images),
        }
    )
    pq.write_table(table, path)
    return path
