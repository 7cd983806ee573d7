"""Atomic file writes and small I/O helpers shared by every stage.

Every file rewardkit writes goes through a temp file in the same folder followed by
``os.replace``, so an interrupted job never leaves a half-written Parquet or image behind.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def default_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions a plain
    ``open()``/``mkdir()`` would: temp folders and some writers (``mkdtemp``, safetensors)
    create owner-only files, which a shared install could not read."""
    umask = os.umask(0)
    os.umask(umask)
    root = Path(path)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing any existing ``dst`` (old copy removed last).

    The old copy's name is unique to this call (process id and a random part), so two writers
    replacing the same folder never move or delete each other's backup."""
    backups = []
    for attempt in range(8):
        if dst.exists():
            backups.append(dst.with_name(f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex}"))
            try:
                dst.rename(backups[-1])
            except FileNotFoundError:  # another writer moved it first
                backups.pop()
        try:
            src.rename(dst)
            break
        except OSError as err:  # another writer's folder landed in between: move it aside too
            # (whether dst still exists now says nothing: a third writer may have just moved
            # it; any "not empty" retries)
            if attempt == 7 or err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    for backup in backups:
        shutil.rmtree(backup, ignore_errors=True)


def recover_dir(dst: Path) -> None:
    """Undo what a writer killed inside :func:`replace_dir` or :func:`write_folder_atomic`
    left: when ``dst`` is missing, the newest complete old copy (``.<name>.old-*``) is put
    back; the other leftovers (old copies, half-written ``.<name>.*`` temp folders) are
    removed. Call it only where no other writer of ``dst`` is running (a run's own
    checkpoint folder before training starts)."""
    leftovers = sorted(
        (p for p in dst.parent.glob(f".{dst.name}.*") if p.is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    if not dst.exists():
        olds = [p for p in leftovers if p.name.startswith(f".{dst.name}.old-")]
        if olds:
            olds[-1].rename(dst)
            leftovers.remove(olds[-1])
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)


def write_folder_atomic(path: str | os.PathLike, write) -> Path:
    """Run ``write(tmp_folder)`` in a temp folder beside ``path``, give the files default
    permissions, then rename it onto ``path``; nothing is left behind if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        default_permissions(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN and infinities become null; see :func:`json_safe`)."""
    write_text_atomic(path, to_strict_json(obj, indent=2, sort_keys=True) + "\n")


def to_strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that can only produce valid JSON: ``obj`` goes through :func:`json_safe`
    (NaN/Inf -> null, numpy and paths to plain types) and is dumped with ``allow_nan=False``.
    ``kwargs`` (``indent``, ``sort_keys``, ...) go to ``json.dumps``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON types, recursively: dicts (with string keys), lists (from
    lists, tuples, sets and arrays), str, int, bool, None and finite floats; NaN and +-Inf
    (Python or numpy) become None, so strict JSON parsers accept the result.

    Raises:
        TypeError: naming the type of a value JSON cannot hold.
    """
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {_json_key(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [json_safe(v) for v in obj]
    return json_safe(_json_default(obj))


def _json_key(key: Any) -> str:
    """An object key as the string JSON will hold (as ``json.dumps`` spells it)."""
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, str):
        return key
    if isinstance(key, Path):
        return str(key)
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)  # 1 -> "1", True -> "true", nan -> "NaN" (keys may say so)
    raise TypeError(f"not a valid JSON object key: {type(key).__name__}")


def _json_default(o: Any) -> Any:
    """A JSON-representable stand-in for ``o`` (numpy scalars and arrays, paths, dataclasses,
    0-d or n-d tensors, other objects that convert with ``float()``)."""
    if isinstance(o, np.generic | np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist") and callable(o.tolist):  # torch tensors
        return o.tolist()
    if hasattr(o, "__float__"):  # e.g. Decimal, Fraction
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_parquet_atomic(path: str | os.PathLike, table: pa.Table) -> None:
    """Write ``table`` as Parquet, atomically. Deterministic bytes for the same table."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def png_bytes(array: np.ndarray) -> bytes:
    """Encode an (H, W, 3|4) uint8 or (H, W) uint8/uint16 array as PNG, deterministically."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_png_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    write_bytes_atomic(path, png_bytes(array))


# ---------------------------------------------------------------------------------------
# Reading images: one reader for every command.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
# The largest image decoded, in pixels: a 12000 x 12000 scan (144 Mpx) still reads, and an
# RGB image at the limit decodes to 480 MB. Anything larger (a decompression bomb such as a
# 20000 x 20000 PNG of a few kB) is refused from its header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 160_000_000
# Images above this many pixels are decoded one at a time per process (a lock shared by the
# decoding threads), so several full-size decodes are never held at once.
LARGE_IMAGE_PIXELS = 16_000_000
_STRIP_PIXELS = 4_000_000  # large images are converted and reduced in strips of this size

# PIL's own bomb check agrees with ours: it warns above MAX_IMAGE_PIXELS (silenced: the
# reader refuses those itself, naming the file) and refuses twice that in Image.open.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_LARGE_DECODE = threading.Lock()

_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # as ImageOps.exif_transpose, applied to the reduced image instead of the full one


@dataclass(frozen=True)
class DecodedImage:
    """An image as read by :func:`decode_image`.

    Attributes:
        array: (H, W, 3|4) or (H, W) uint8, upright, possibly reduced (see ``target_side``).
        width: The file's width in pixels, upright (after EXIF orientation), before reduction.
        height: The file's height, likewise.
        reduction: File pixels per array pixel along each side (1: full size). Array pixel
            ``k`` covers file pixels ``[k * reduction, (k + 1) * reduction)``; the last one
            may cover fewer.
    """

    array: np.ndarray
    width: int
    height: int
    reduction: int = 1


@dataclass(frozen=True)
class ImageProbe:
    """What an image file's header says (:func:`probe_image`); no pixels are decoded.

    Attributes:
        width: Width in pixels, upright (after EXIF orientation).
        height: Height, likewise.
        mode: PIL's mode of the file (``RGB``, ``I;16``, ``P``, ...).
        format: PIL's format name (``PNG``, ``JPEG``, ...).
        has_alpha: Whether the file has an alpha channel or a transparent colour.
    """

    width: int
    height: int
    mode: str
    format: str
    has_alpha: bool


def read_image(
    path: str | os.PathLike, mode: str = "RGB", target_side: int | None = None
) -> np.ndarray:
    """Read an image file as uint8: (H, W, 3) for ``"RGB"``, (H, W, 4) for ``"RGBA"``,
    (H, W) for ``"L"``. The one reader of every command; see :func:`decode_image`."""
    return decode_image(path, mode, target_side).array


def decode_image(
    path: str | os.PathLike, mode: str = "RGB", target_side: int | None = None
) -> DecodedImage:
    """Decode an image file, whatever its format, depth or orientation, within bounded memory.

    - Formats: every suffix in :data:`IMAGE_SUFFIXES` (the first frame of a GIF or a
      multi-page TIFF).
    - Depth: 16-bit greyscale (``I;16``, ``I;16B``) and 32-bit integer images are scaled
      to 8 bits (``v * 255 / 65535``, rounded), not clipped; float images are taken as
      [0, 1] (or [0, 255] when larger values occur).
    - Colour: CMYK, palette (with its transparency), greyscale and alpha are converted.
      ``"RGB"`` and ``"L"`` composite transparent images on white (as a viewer shows them);
      ``"RGBA"`` keeps alpha (opaque when the file has none).
    - Orientation: the EXIF orientation tag is applied, so the array is upright.
    - Size: files over :data:`MAX_IMAGE_PIXELS` are refused from their header. With
      ``target_side`` (the side the caller will resize the image to), a large image is
      decoded reduced: JPEG's DCT scaling, then integer box reduction in strips, by the
      largest factor that keeps the shorter side at least ``2 * target_side``, so memory
      follows the requested size and the caller's own resize still has pixels to filter.
      Never enlarges. Images over :data:`LARGE_IMAGE_PIXELS` are decoded one at a time.

    Args:
        path: The image file.
        mode: ``"RGB"``, ``"RGBA"`` or ``"L"``.
        target_side: The side the caller resizes to, or None for the full size.

    Raises:
        FileNotFoundError: No such file, or a broken symbolic link (the message names it).
        ValueError: Anything else that makes the file unusable, the message starting with
            the path: empty file, not an image, truncated or corrupt data, too large, a
            folder.
    """
    if mode not in ("RGB", "RGBA", "L"):
        raise ValueError(f"mode must be 'RGB', 'RGBA' or 'L'; got {mode!r}")
    if target_side is not None and target_side < 1:
        raise ValueError(f"target_side must be >= 1 or None; got {target_side}")
    _check_file(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            _check_pixels(path, width, height)
            lock = _LARGE_DECODE if width * height > LARGE_IMAGE_PIXELS else nullcontext()
            with lock:
                draft = 1
                if target_side is not None and im.format == "JPEG":
                    draft = _draft(im, 2 * target_side)
                im.load()
                orientation = _orientation(im)
                factor = 1 if target_side is None else min(im.size) // (2 * target_side)
                factor = max(1, factor)
                out = _shrink(im, factor)
                if orientation in _TRANSPOSE:
                    out = out.transpose(_TRANSPOSE[orientation])
                    if orientation >= 5:  # the quarter turns swap width and height
                        width, height = height, width
                array = np.asarray(_to_mode(out, mode))
    except Image.DecompressionBombError as e:
        raise ValueError(_too_large(path, e)) from None
    except UnidentifiedImageError:
        raise ValueError(
            f"{path}: not an image file (the format cannot be identified; supported: "
            f"{', '.join(IMAGE_SUFFIXES)})"
        ) from None
    except ValueError as e:
        if str(e).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    except Exception as e:  # PIL raises several types for truncated or corrupt files
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    return DecodedImage(array, width, height, draft * factor)


def probe_image(path: str | os.PathLike) -> ImageProbe:
    """Read an image file's header: upright size, mode, format, alpha. Errors as
    :func:`decode_image` (except truncated data, which only decoding finds)."""
    _check_file(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            _check_pixels(path, width, height)
            has_alpha = "A" in im.mode or "a" in im.mode or "transparency" in im.info
            if _orientation(im, header_only=True) >= 5:
                width, height = height, width
            return ImageProbe(width, height, im.mode, im.format or "", has_alpha)
    except Image.DecompressionBombError as e:
        raise ValueError(_too_large(path, e)) from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file (the format cannot be identified)") from None
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def read_image_rgb(path: str | os.PathLike, target_side: int | None = None) -> np.ndarray:
    """:func:`read_image` as (H, W, 3) uint8 (transparent images composited on white)."""
    return read_image(path, "RGB", target_side)


def read_image_rgba(path: str | os.PathLike, target_side: int | None = None) -> np.ndarray:
    """:func:`read_image` as (H, W, 4) uint8, keeping alpha (opaque when the file has none)."""
    return read_image(path, "RGBA", target_side)


def list_images(
    folder: str | os.PathLike, recursive: bool = True
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files of a folder, and every other entry with the reason it is not used.

    Files with a suffix in :data:`IMAGE_SUFFIXES` (any case) are listed whether or not they
    decode (the reader reports that, naming the file). Everything else is in ``skipped``:
    other suffixes, hidden files and folders (names starting with "."; not searched),
    broken symbolic links, links to folders (not followed), special files, and with
    ``recursive=False`` subfolders. Both lists are sorted by path relative to ``folder``.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    pending = [root]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as e:  # a subfolder without read permission, or gone meanwhile
            skipped.append((current, f"folder cannot be read ({type(e).__name__}: {e.strerror})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                kind = "folder, not searched" if entry.is_dir() else "file"
                skipped.append((path, f"hidden {kind}"))
            elif entry.is_symlink() and not path.exists():
                skipped.append((path, f"broken symbolic link (to {os.readlink(path)})"))
            elif entry.is_dir():
                if entry.is_symlink():
                    skipped.append((path, "link to a folder, not followed"))
                elif recursive:
                    pending.append(path)
                else:
                    skipped.append((path, "a folder (only files at the top level are read)"))
            elif not entry.is_file():
                skipped.append((path, "not a regular file"))
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                what = f"'{path.suffix}'" if path.suffix else "no suffix"
                skipped.append(
                    (path, f"not an image file type ({what}; read: {', '.join(IMAGE_SUFFIXES)})")
                )
            else:
                files.append(path)

    def key(p: Path) -> str:
        return p.relative_to(root).as_posix()

    files.sort(key=key)
    skipped.sort(key=lambda s: key(s[0]))
    return files, skipped


def _check_file(path: str | os.PathLike) -> None:
    """Errors naming the file for what is not a readable, non-empty file."""
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            raise FileNotFoundError(f"{path}: broken symbolic link (to {os.readlink(p)})")
        raise FileNotFoundError(f"{path}: image file not found")
    if p.is_dir():
        raise ValueError(f"{path}: a folder, not an image file")
    if p.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")


def _check_pixels(path: str | os.PathLike, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{path}: image too large ({width} x {height} pixels, limit {MAX_IMAGE_PIXELS})"
        )


def _too_large(path: str | os.PathLike, error: Exception) -> str:
    """The message for PIL's own refusal (over twice the limit), with the size when the
    header can be read by the format's plugin (which skips PIL's check)."""
    plugins = (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile,
               TiffImagePlugin.TiffImageFile, WebPImagePlugin.WebPImageFile,
               BmpImagePlugin.BmpImageFile, GifImagePlugin.GifImageFile)  # fmt: skip
    for plugin in plugins:
        try:
            with plugin(path) as im:
                w, h = im.size
            return f"{path}: image too large ({w} x {h} pixels, limit {MAX_IMAGE_PIXELS})"
        except Exception:  # not this format
            continue
    return f"{path}: image too large ({error}; limit {MAX_IMAGE_PIXELS} pixels)"


def _draft(im: Image.Image, min_side: int) -> int:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale while its shorter side stays >= min_side;
    returns the scale's denominator (1: full size)."""
    w, h = im.size
    for scale in (8, 4, 2):
        if min(w, h) // scale >= min_side:
            im.draft(None, (w // scale, h // scale))
            # PIL picks this very scale (the largest power of two <= w // (w // scale));
            # a JPEG it cannot scale (several tiles) keeps its size.
            return scale if im.size == (-(-w // scale), -(-h // scale)) else 1
    return 1


def _orientation(im: Image.Image, header_only: bool = False) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable). ``header_only``: a PNG whose
    EXIF follows its pixels counts as upright rather than being decoded to find out."""
    if header_only and im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block must not make the image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _working(im: Image.Image) -> Image.Image:
    """8-bit ``L``, ``LA``, ``RGB`` or ``RGBA`` from any mode (16-bit scaled, not clipped)."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA") and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im)
        if mode == "I":  # 32-bit integers: taken as 16-bit values
            values = np.clip(values, 0, 65535)
        return Image.fromarray(_scale_16_to_8(values))
    if mode == "F":
        values = np.asarray(im, dtype=np.float32)
        top = 1.0 if np.nanmax(values, initial=0.0) <= 1.0 else 255.0
        scaled = np.nan_to_num(values / top * 255.0 + 0.5, nan=0.0)
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
    if mode == "1":
        return im.convert("L")
    if mode in ("P", "PA") or "transparency" in im.info:
        has_alpha = mode == "PA" or "transparency" in im.info or "A" in mode
        return im.convert("RGBA" if has_alpha else "RGB")
    if "A" in mode or "a" in mode:  # La, RGBa (premultiplied), ...
        return im.convert("RGBA")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """uint16 values -> uint8, ``round(v * 255 / 65535)``, in row blocks to bound memory."""
    out = np.empty(values.shape, np.uint8)
    step = max(1, _STRIP_PIXELS // max(1, values.shape[1]))
    for top in range(0, values.shape[0], step):
        block = values[top : top + step].astype(np.uint32)
        out[top : top + step] = (block * 255 + 32767) // 65535
    return out


def _shrink(im: Image.Image, factor: int) -> Image.Image:
    """The image in a working mode, box-reduced by ``factor``; a large image is converted
    and reduced strip by strip, so only the decoded file and small strips are in memory."""
    if factor == 1 or im.mode == "F":  # a float image's scale is decided on the whole
        im = _working(im)
        return im if factor == 1 else im.reduce(factor)
    rows = max(factor, _STRIP_PIXELS // max(1, im.width) // factor * factor)
    out: Image.Image | None = None
    for top in range(0, im.height, rows):
        part = _working(im.crop((0, top, im.width, min(top + rows, im.height))))
        part = part.reduce(factor) if factor > 1 else part
        if out is None:
            size = (-(-im.width // factor), -(-im.height // factor))
            out = Image.new(part.mode, size)
        out.paste(part, (0, top // factor))
    assert out is not None
    return out


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    """The working image in ``mode``; alpha composited on white unless ``mode`` keeps it."""
    if mode == "RGBA":
        return im.convert("RGBA")
    if im.mode in ("LA", "RGBA"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert(mode)
