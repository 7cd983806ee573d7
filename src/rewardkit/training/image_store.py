"""Decoded training images on disk: decoded once by worker processes, read row by row.

The dual-encoder recipes (``train reward``, ``train contrastive``) see every image at the
model's input side (shorter edge to ``side``, antialiased bilinear, centre crop: the pixels
``score`` gives the model). :func:`image_rows` decodes the listed files once, in a DataLoader
whose worker processes decode (``workers``), into one ``.npy`` file of uint8 rows
(``(N, 3, side, side)``; a NumPy header then raw rows, loaded without pickle) inside the run
folder, and returns :class:`ImageRows`, which reads the rows a step asks for with ``preadv``
(:class:`~rewardkit.training.inspection_store.RowFile`). Memory follows the batch, not the
manifest: 1M images at 224 px are 150 GB on disk and a few MB per batch in memory.

The folder is keyed by content: the bytes of every file (SHA-256, in list order) and the side.
A resumed run with the same files reuses it; a changed file rebuilds it. A build killed half way
leaves a ``.images.building-<pid>`` folder, removed by the next build.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rewardkit.io import decode_image
from rewardkit.loading import read_ahead
from rewardkit.training.rowfiles import META_FILE, RowFile, RowWriter, build_keyed_folder

__all__ = ["DECODE_CHUNK", "ImageRows", "image_rows"]

FORMAT_VERSION = 1
DECODE_CHUNK = 64  # images decoded per worker task and written at a time


class ImageRows:
    """Rows of a decoded-image store: ``rows[idx]`` is a uint8 tensor (len(idx), 3, S, S)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.file = RowFile(self.folder / "images.npy")
        self.side = int(self.file.shape[-1])

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, rows: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        return torch.from_numpy(self.file.read(rows))


def _decode_chunk(
    files: list[Path], side: int, span: tuple[int, int]
) -> torch.Tensor | tuple[str, str]:
    """Files ``[lo, hi)`` decoded at ``side`` (in a loader process): uint8 (n, 3, S, S), or
    (error type, message) for a file that cannot be read (raised by the caller as is)."""
    from rewardkit.scoring import scorer_input  # imported on use: it loads transformers

    try:
        arrays = [scorer_input(decode_image(p, "RGB", side), side) for p in files[slice(*span)]]
    except (FileNotFoundError, ValueError) as err:
        return type(err).__name__, str(err)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def content_key(files: list[Path], side: int) -> str:
    """SHA-256 over the files' bytes (in order) and the side: the store's name and key."""
    h = hashlib.sha256(f"rewardkit-images-v{FORMAT_VERSION}:{side}:{len(files)}".encode())
    for path in files:
        try:
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: file not found") from None
        except IsADirectoryError:
            raise ValueError(f"{path}: is a folder, not an image") from None
    return h.hexdigest()


def image_rows(
    paths: list[str],
    root: Path,
    side: int,
    cache: str | Path,
    workers: int = 2,
    progress: bool = False,
) -> ImageRows:
    """Decode (or reuse) the images of ``paths`` at ``side`` into ``cache/images-<key>``.

    Args:
        paths: Image paths, relative to ``root`` or absolute; row ``i`` is ``paths[i]``.
        side: The model's square input side.
        cache: The folder that holds stores (e.g. ``<run>/data_cache``); stores of other
            content in it are removed when this one is built.
        workers: Decoding processes (0: decode in this process).

    Raises:
        FileNotFoundError / ValueError: naming the file that cannot be read.

    Under a multi-process launch the main process builds; the others wait for it.
    """
    from rewardkit.training.distributed import is_main_process

    files = [Path(p) if Path(p).is_absolute() else root / p for p in paths]
    if not files:
        raise ValueError(f"{root}: no images to load")
    key = content_key(files, side)
    cache = Path(cache)
    folder = cache / f"images-{key[:16]}"

    if not (folder / META_FILE).is_file() and is_main_process():
        for old in cache.glob("images-*"):  # another content's store: not needed again
            shutil.rmtree(old, ignore_errors=True)

    def build(building: Path) -> dict:
        writer = RowWriter(building / "images.npy", (len(files), 3, side, side), np.uint8)
        spans = [(lo, lo + DECODE_CHUNK) for lo in range(0, len(files), DECODE_CHUNK)]
        chunks = read_ahead(functools.partial(_decode_chunk, files, side), spans, workers)
        try:
            with tqdm(total=len(files), desc="decode", disable=not progress, unit="img") as bar:
                for chunk in chunks:
                    if isinstance(chunk, tuple):  # a file that cannot be read: its one line
                        kind, message = chunk
                        error = FileNotFoundError if kind == "FileNotFoundError" else ValueError
                        raise error(message)
                    writer.append(chunk)
                    bar.update(len(chunk))
        finally:
            writer.file.close()
        writer.close()
        return {"version": FORMAT_VERSION, "rows": len(files), "side": side}

    build_keyed_folder(folder, key, build)
    return ImageRows(folder)
