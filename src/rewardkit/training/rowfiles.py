"""Arrays on disk, read row by row: the format every disk-backed training cache uses.

A row file is a ``.npy`` file (a NumPy header, then raw C-order rows: it loads with
``allow_pickle=False``), written once, front to back, by :class:`RowWriter`, and read with
explicit ``os.preadv`` calls by :class:`RowFile` (sorted rows, adjacent rows coalesced into one
read), not through ``np.memmap``, whose touched pages would count in the process's resident
memory. :class:`RowArray` indexes one like a tensor's first dimension (rows, slices, index
tensors), so a recipe can hold either.

:func:`build_keyed_folder` is how every cache folder of row files is made: once per content
key, in a ``.<name>.building-<pid>`` folder renamed into place, by the main process only
(the others wait for it), with folders left by killed builds removed first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "META_FILE",
    "RowArray",
    "RowFile",
    "RowWriter",
    "build_keyed_folder",
    "remove_stale_builds",
]

META_FILE = "meta.json"


class RowFile:
    """Rows of a C-order ``.npy`` file, read with ``os.preadv`` into a fresh array.

    Safe to pickle into DataLoader workers: the file descriptor is reopened per process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            self.offset = f.tell()
        if fortran or dtype.hasobject:
            raise ValueError(f"{self.path}: expected a C-order array of plain values")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.row_bytes = int(dtype.itemsize * np.prod(shape[1:], dtype=np.int64))
        expected = self.offset + self.row_bytes * self.shape[0]
        if self.path.stat().st_size != expected:
            raise ValueError(f"{self.path}: {self.path.stat().st_size} bytes, expected {expected}")
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, rows: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
        """The rows (in the order given, repeats allowed) as an array (len(rows), ...)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: rows outside 0..{self.shape[0] - 1}")
        wanted = np.unique(rows)  # sorted: one read per run of adjacent rows
        buf = np.empty((len(wanted), *self.shape[1:]), self.dtype)
        view = memoryview(buf.reshape(-1).view(np.uint8))
        fd = self._file()
        runs = np.split(wanted, np.flatnonzero(np.diff(wanted) != 1) + 1) if wanted.size else []
        at = 0
        for run in runs:
            size = len(run) * self.row_bytes
            offset = self.offset + int(run[0]) * self.row_bytes
            done = 0
            while done < size:
                got = os.preadv(fd, [view[at + done : at + size]], offset + done)
                if got == 0:
                    raise OSError(f"{self.path}: file ended at byte {offset + done}")
                done += got
            at += size
        if len(wanted) == len(rows) and np.array_equal(wanted, rows):
            return buf
        return buf[np.searchsorted(wanted, rows)]


class RowWriter:
    """Appends rows to a new ``.npy`` file of known shape (header first, then raw bytes)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.file = open(path, "wb")  # noqa: SIM115 (closed in close())
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_1_0(self.file, header)
        self.rows = 0

    def append(self, array: np.ndarray | torch.Tensor) -> None:
        if isinstance(array, torch.Tensor):
            array = array.numpy()
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path.name}: rows of shape {array.shape[1:]} != {self.shape}")
        self.file.write(memoryview(array.reshape(-1).view(np.uint8)))
        self.rows += array.shape[0]

    def close(self) -> None:
        self.file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: wrote {self.rows} rows, expected {self.shape[0]}")


def remove_stale_builds(folder: Path) -> None:
    """Remove ``.<folder name>.building-<pid>`` folders left by builds that were killed
    (their process is gone); a live process's build is left alone."""
    for old in folder.parent.glob(f".{folder.name}.building-*"):
        try:
            pid = int(old.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # raises when no such process
            if pid == os.getpid():
                raise ProcessLookupError
        except (ValueError, ProcessLookupError):
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


def build_keyed_folder(
    folder: str | Path,
    key,
    build: Callable[[Path], dict],
    main: bool | None = None,
    poll_s: float = 1.0,
) -> dict:
    """Make ``folder`` for content ``key`` once, and return its ``meta.json``.

    If ``folder/meta.json`` already records ``key`` (any JSON value), it is reused as it
    is. Otherwise the main process (``main``; by default
    :func:`~rewardkit.training.distributed.is_main_process`) calls ``build(building)`` on an
    empty ``.<name>.building-<pid>`` folder beside it; ``build`` writes the files and returns
    the meta to record (``key`` is added), and the folder is renamed into place, replacing an
    older one. Other processes poll until the key is there. A build that raises leaves
    nothing behind; one that is killed leaves a building folder the next call removes.
    """
    folder = Path(folder)
    meta_file = folder / META_FILE

    def ready() -> dict | None:
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        return meta if meta.get("key") == key else None

    if (meta := ready()) is not None:
        return meta
    if main is None:
        from rewardkit.training.distributed import is_main_process

        main = is_main_process()
    if not main:
        while (meta := ready()) is None:  # the main process builds it
            time.sleep(poll_s)
        return meta
    from rewardkit.io import write_json_atomic

    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(folder)
    building = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        meta = {**build(building), "key": key}
        write_json_atomic(building / META_FILE, meta)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return meta


class RowArray:
    """A row file indexed like a tensor's first dimension: ``a[rows]``, ``a[i:j]``, ``a[i]``
    give tensors read from disk; ``shape``, ``dtype`` and ``len`` are the file's."""

    def __init__(self, path: str | Path) -> None:
        self.file = RowFile(path)
        self.shape = torch.Size(self.file.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return torch.from_numpy(np.zeros(0, self.file.dtype)).dtype

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        if isinstance(index, slice):
            rows = np.arange(*index.indices(len(self)))
        elif isinstance(index, torch.Tensor):
            rows = index.cpu().numpy()
        else:
            rows = np.asarray(index)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return torch.from_numpy(self.file.read(rows))
