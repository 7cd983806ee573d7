"""Atomic file writes and small I/O helpers shared by every stage.

Every file rewardkit writes goes through a temp file in the same folder followed by
``os.replace``, so an interrupted job never leaves a half-written Parquet or image behind.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


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
    """Move folder ``src`` to ``dst``, replacing any existing ``dst`` (old copy removed last)."""
    backup = None
    if dst.exists():
        backup = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        dst.rename(backup)
    src.rename(dst)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


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


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8, with an error naming the file if it cannot."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def read_image_rgba(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 4) uint8 keeping alpha if present (opaque otherwise)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGBA"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except Exception as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
