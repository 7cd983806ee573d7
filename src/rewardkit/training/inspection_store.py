"""Disk-backed RFNet inspection data: prepared once, in chunks, into the run folder; rows read
on demand, so memory follows the batch and not the manifest.

:func:`prepare_inspection_store` makes one pass over a sample table, ``chunk_rows`` rows at a
time: decode the generated image and the product photo (and the ground-truth maps), predict
depth and saliency for the chunk, degrade the chunk (``world.perturb.degrade``, the maps
predicted again from the degraded pixels) and append every array to its own ``.npy`` file
(a NumPy header, then raw C-order rows: loads with ``allow_pickle=False``). Caption token
states are stored once per unique caption, ``(U, T, H)`` with an ``(N,)`` index.

The folder is keyed by content (:func:`store_key`): the rows' product keys, labels, splits and
captions, a hash of every generated image's bytes (and of the ground-truth maps' bytes with
``maps="truth"``), the extractors' weights and configs, the resolution, modalities, maps and
degradation seed. A resumed run with the same key reuses it; any other key rebuilds it.

:class:`InspectionStore` reads rows with explicit ``os.preadv`` calls (sorted rows, adjacent
rows coalesced into one read), not through ``np.memmap``, whose touched pages would count in
the process's resident memory. It has :class:`~rewardkit.training.rfnet.InspectionData`'s
reading interface (``batch``, ``rows``, ``labels``, ``classes``, ``split``, ``paths``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rewardkit.data.samples import load_product_rgb, load_resized
from rewardkit.io import write_json_atomic
from rewardkit.models.rfnet import MODALITIES, RFNetConfig
from rewardkit.training.rowfiles import META_FILE, RowFile, RowWriter, build_keyed_folder
from rewardkit.world.oracle import TARGET_COLUMN_PREFIX

__all__ = [
    "CAPTION_BATCH",
    "CHUNK_ROWS",
    "aligned_rows",
    "row_heights",
    "MAP_BATCH",
    "InspectionStore",
    "RowFile",
    "predict_maps",
    "prepare_inspection_store",
    "store_key",
]

FORMAT_VERSION = 2  # 2: early fusion's "placed" images and "height_cm" numbers
# A multiple of the extractors' batch (MAP_BATCH), so the maps are predicted over the same
# batches as in memory; 512 rows at 384 px hold ~0.5 GB of decoded pixels at once.
CHUNK_ROWS = 512
DEGRADED_PREFIX = "degraded_"
IMAGE_ARRAYS = ("product", "generated", "depth", "saliency", "placed")


class InspectionStore:
    """A prepared store folder, read row by row (InspectionData's reading interface).

    ``degraded()`` gives the same rows with the degraded generated image and its maps."""

    def __init__(
        self, folder: str | Path, paths: list[str] | None = None, prefix: str = ""
    ) -> None:
        self.folder = Path(folder)
        meta = json.loads((self.folder / META_FILE).read_text())
        self.meta = meta
        self.key: str = meta["key"]
        self.classes: tuple[str, ...] = tuple(meta["classes"])
        self.prefix = prefix
        self.labels = torch.from_numpy(self._load("labels").astype(np.int64))  # (N,)
        self._split_codes = self._load("split")  # (N,) int8 into meta["split_names"]
        self._paths = paths
        self.files: dict[str, RowFile] = {}
        for name in IMAGE_ARRAYS:  # the degraded view: its own generated image (and maps)
            own, clean = self.folder / f"{prefix}{name}.npy", self.folder / f"{name}.npy"
            file = own if own.is_file() else clean
            if file.is_file():
                self.files[name] = RowFile(file)
        self.height_cm: torch.Tensor | None = None  # (N,) float32, early fusion's number
        if (self.folder / "height_cm.npy").is_file():
            self.height_cm = torch.from_numpy(self._load("height_cm").astype(np.float32))
        # Measurement heads' targets (N, K) float32, NaN = not measured (training only).
        self.measurements: tuple[str, ...] = tuple(meta.get("measurements", ()))
        self.targets: torch.Tensor | None = None
        if self.measurements:
            self.targets = torch.from_numpy(self._load("targets").astype(np.float32))
        self.caption_index: np.ndarray | None = None
        if (self.folder / "caption_tokens.npy").is_file():
            self.files["caption_tokens"] = RowFile(self.folder / "caption_tokens.npy")
            self.files["caption_mask"] = RowFile(self.folder / "caption_mask.npy")
            self.caption_index = self._load("caption_index")  # (N,) into the unique captions

    def _load(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", allow_pickle=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def split(self) -> list[str]:
        names = self.meta["split_names"]
        return [names[c] for c in self._split_codes.tolist()]

    @property
    def paths(self) -> list[str]:
        if self._paths is None:
            self._paths = json.loads((self.folder / "paths.json").read_text())
        return self._paths

    def rows(self, split: str) -> torch.Tensor:
        """Row indices (long) of one split."""
        names = self.meta["split_names"]
        if split not in names:
            return torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(np.flatnonzero(self._split_codes == names.index(split)))

    def degraded(self) -> InspectionStore | None:
        """The degraded copy's view (None when the store was prepared without one)."""
        if not (self.folder / f"{DEGRADED_PREFIX}generated.npy").is_file():
            return None
        return InspectionStore(self.folder, self._paths, DEGRADED_PREFIX)

    def read(self, rows: torch.Tensor, modalities: tuple[str, ...] = MODALITIES) -> dict:
        """The raw arrays of ``rows`` (uint8 images, float32 tokens, uint8 mask)."""
        use = set(modalities)
        out: dict[str, np.ndarray | None] = {}
        r = np.asarray(rows, dtype=np.int64)
        for name in IMAGE_ARRAYS:
            out[name] = self.files[name].read(r) if name in use and name in self.files else None
        out["height_cm"] = None
        if "height" in use and self.height_cm is not None:
            out["height_cm"] = self.height_cm[torch.as_tensor(r)].numpy()
        out["caption_tokens"] = out["caption_mask"] = None
        if "caption" in use and self.caption_index is not None:
            index = self.caption_index[r]
            out["caption_tokens"] = self.files["caption_tokens"].read(index)  # (B, T, H)
            out["caption_mask"] = self.files["caption_mask"].read(index)  # (B, T)
        return out

    def batch(
        self,
        rows: torch.Tensor,
        modalities: tuple[str, ...] = MODALITIES,
        device: torch.device | str = "cpu",
    ) -> dict:
        """Model inputs for ``rows`` exactly as ``InspectionData.batch`` gives them."""
        return to_model_inputs(self.read(rows, modalities), device)


def to_model_inputs(arrays: dict, device: torch.device | str = "cpu") -> dict:
    """Raw arrays (:meth:`InspectionStore.read`) -> float images in [0, 1], tokens, long mask."""
    out: dict[str, torch.Tensor | None] = {}
    for name in IMAGE_ARRAYS:
        x = arrays[name]
        out[name] = None if x is None else torch.as_tensor(x).to(device).float().div_(255.0)
    height = arrays.get("height_cm")
    out["height_cm"] = None if height is None else torch.as_tensor(height).to(device).float()
    tokens, mask = arrays["caption_tokens"], arrays["caption_mask"]
    out["caption_tokens"] = None if tokens is None else torch.as_tensor(tokens).to(device)
    out["caption_mask"] = None if mask is None else torch.as_tensor(mask).to(device).long()
    return out


def _module_digest(h, module) -> None:
    """Hash a model's config and weights (names, dtypes, shapes, bytes)."""
    config = getattr(module, "config", None)
    to_dict = getattr(config, "to_dict", None)
    h.update(type(module).__name__.encode())
    h.update(json.dumps(to_dict() if callable(to_dict) else repr(config), sort_keys=True,
                        default=str).encode())  # fmt: skip
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _file_digest(h, path: str | None) -> None:
    if path is None:
        h.update(b"\0none")
        return
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(b"\0end")


def store_key(
    table: pa.Table,
    config: RFNetConfig,
    maps: str,
    degrade_seed: int | None,
    extractors: dict,
    progress: bool = False,
    measurements: Sequence[str] = (),
) -> str:
    """sha256 of what the store's arrays are made from (see the module docstring)."""
    h = hashlib.sha256()
    cols = table.column_names
    head = {
        "version": FORMAT_VERSION,
        "resolution": config.resolution,
        "modalities": sorted(config.modalities),
        "classes": list(config.classes),
        "maps": maps,
        "degrade_seed": degrade_seed,
        "rows": table.num_rows,
    }
    if measurements:  # absent otherwise: stores prepared before measurement heads keep their key
        head["measurements"] = list(measurements)
    h.update(json.dumps(head, sort_keys=True).encode())
    # Per-row values, streamed (a JSON of a million rows' columns would be ~100s of MB).
    identity = "product_key" if "product_key" in cols else "product_path"
    aligned = [
        c for c in ("fill", "product_height_cm") if set(config.modalities) & {"placed", "height"}
    ]
    targets = [TARGET_COLUMN_PREFIX + m for m in measurements]
    for column in (identity, "label", "split", "caption", *aligned, *targets):
        h.update(f"\0column:{column}".encode())
        if column not in cols:
            continue
        for chunk in table[column].chunks:
            for start in range(0, len(chunk), 10_000):
                values = chunk.slice(start, 10_000).to_pylist()
                h.update("\x1f".join(map(str, values)).encode() + b"\x1e")
    for kind in sorted(extractors):
        h.update(f"\0extractor:{kind}".encode())
        _module_digest(h, extractors[kind])
    truth = [
        f"{k}_path" for k in ("depth", "saliency")
        if maps == "truth" and k in config.modalities and f"{k}_path" in cols
    ]  # fmt: skip
    columns = {c: table[c].to_pylist() for c in ["path", *truth]}
    for i in tqdm(range(table.num_rows), desc="hash", disable=not progress, unit="img"):
        for values in columns.values():
            _file_digest(h, values[i])
    return h.hexdigest()


def row_heights(table: pa.Table) -> np.ndarray:
    """Every row's product height in cm (N,) float32: ``product_height_cm``, else "N cm" in
    its caption (``data.keys.height_from_row``).

    Raises:
        ValueError: A row with neither (naming the row)."""
    from rewardkit.data.keys import height_from_row

    cols = [c for c in ("product_height_cm", "caption") if c in table.column_names]
    out = np.empty(table.num_rows, np.float32)
    for i, row in enumerate(table.select(cols).to_pylist()):
        h = height_from_row(row)
        if h is None or not np.isfinite(h) or h <= 0:
            raise ValueError(
                f"row {i}: no product height (column product_height_cm, or 'N cm' in the "
                "caption); an early-fusion inspector reads it"
            )
        out[i] = h
    return out


def aligned_rows(table: pa.Table, rows: range | list[int], size: int) -> np.ndarray:
    """The product as placed on the canvas, on white, with its mask, for ``rows`` of
    ``table``: (n, 4, S, S) uint8 (``world.placement.placed_on_white`` of the row's
    ``product_path`` at its ``fill``; the generator's default fill where the column is
    absent or null, as ``rewardkit generate`` places products).

    Raises:
        ValueError: An unreadable photo or a fill outside [0.05, 1] (naming the row)."""
    from rewardkit.world.export import load_product_photo
    from rewardkit.world.placement import DEFAULT_FILL, placed_on_white

    photos = table["product_path"]
    fills = table["fill"] if "fill" in table.column_names else None
    out = []
    for i in rows:
        fill = fills[i].as_py() if fills is not None else None
        fill = DEFAULT_FILL if fill is None or fill != fill else float(fill)
        try:
            layer = placed_on_white(
                load_product_photo(photos[i].as_py(), require_cutout=False), size, fill
            )
        except (OSError, ValueError) as err:
            raise ValueError(f"row {i}: {err}") from None
        out.append(layer.transpose(2, 0, 1))
    return np.stack(out) if out else np.zeros((0, 4, size, size), np.uint8)


# Images per extractor forward: the extractors' activations (Segformer's upsampled decode
# head above all) dominate preparation's peak memory; 128 images at 64 px took ~+400 MB.
MAP_BATCH = 32
CAPTION_BATCH = 64


@torch.no_grad()
def predict_maps(extractor, generated: torch.Tensor, batch_size: int = MAP_BATCH) -> torch.Tensor:
    """uint8 images (n, 3, R, R) -> uint8 maps (n, 1, R, R) from an extractor in [0, 1]."""
    out = []
    for i in range(0, generated.shape[0], batch_size):
        maps = extractor(generated[i : i + batch_size].float() / 255.0)  # (B, 1, R, R)
        out.append((maps.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


@torch.no_grad()
def _write_captions(
    folder: Path, encoder, captions: list[str], batch_size: int = CAPTION_BATCH
) -> None:
    """Token states (U, T, H) and mask (U, T) of the sorted unique captions, padded to the
    longest; ``caption_index`` (N,). Encoded batch by batch into temporary files first (T is
    known only at the end), so no more than one batch is held."""
    unique = sorted(set(captions))
    parts = []
    for k, i in enumerate(range(0, len(unique), batch_size)):
        t, m = encoder.encode(unique[i : i + batch_size])  # (b, t, H), (b, t)
        tp, mp = folder / f"_tokens{k}.npy", folder / f"_mask{k}.npy"
        np.save(tp, t.float().cpu().numpy())
        np.save(mp, m.to(torch.uint8).cpu().numpy())
        parts.append((tp, mp))
    shapes = [np.load(tp, mmap_mode="r").shape for tp, _ in parts]
    length, hidden = max(s[1] for s in shapes), shapes[0][2]
    tokens = RowWriter(folder / "caption_tokens.npy", (len(unique), length, hidden), np.float32)
    mask = RowWriter(folder / "caption_mask.npy", (len(unique), length), np.uint8)
    for tp, mp in parts:
        t = torch.from_numpy(np.load(tp, allow_pickle=False))
        m = torch.from_numpy(np.load(mp, allow_pickle=False))
        tokens.append(F.pad(t, (0, 0, 0, length - t.shape[1])))
        mask.append(F.pad(m, (0, length - m.shape[1])))
        tp.unlink()
        mp.unlink()
    tokens.close()
    mask.close()
    where = {c: k for k, c in enumerate(unique)}
    np.save(folder / "caption_index.npy", np.array([where[c] for c in captions], np.int64))


def _build(
    folder: Path,
    table: pa.Table,
    config: RFNetConfig,
    maps: str,
    degrade_seed: int | None,
    degrade_maps: bool,
    extractors: dict,
    chunk_rows: int,
    progress: bool,
) -> None:
    from rewardkit.world.perturb import degrade

    mods, size, n = set(config.modalities), config.resolution, table.num_rows
    cols = table.column_names
    paths = [str(p) for p in table["path"].to_pylist()]
    product_paths = table["product_path"].to_pylist()
    truth = {
        kind: (table[f"{kind}_path"].to_pylist() if f"{kind}_path" in cols else [None] * n)
        for kind in ("depth", "saliency")
        if maps == "truth" and kind in mods
    }
    image = (n, 3, size, size)
    single = (n, 1, size, size)
    writers = {
        "generated": RowWriter(folder / "generated.npy", image, np.uint8),
        "product": RowWriter(folder / "product.npy", image, np.uint8),
    }
    for kind in ("depth", "saliency"):
        if kind in mods:
            writers[kind] = RowWriter(folder / f"{kind}.npy", single, np.uint8)
    if "placed" in mods:
        writers["placed"] = RowWriter(folder / "placed.npy", (n, 4, size, size), np.uint8)
    if "height" in mods:
        np.save(folder / "height_cm.npy", row_heights(table))
    if degrade_seed is not None:  # maps not predicted (ground truth) are kept as they are
        for name in ("generated", *(("depth", "saliency") if degrade_maps else ())):
            if name in writers:
                shape = image if name == "generated" else single
                writers[DEGRADED_PREFIX + name] = RowWriter(
                    folder / f"{DEGRADED_PREFIX}{name}.npy", shape, np.uint8
                )
    rng = np.random.default_rng(degrade_seed) if degrade_seed is not None else None
    bar = tqdm(total=n, desc="prepare", disable=not progress, unit="img")
    for start in range(0, n, chunk_rows):
        rows = range(start, min(n, start + chunk_rows))
        gen = np.stack([load_resized(paths[i], size, "RGB") for i in rows])  # (b, S, S, 3)
        prod = np.stack([load_product_rgb(product_paths[i], size) for i in rows])
        generated = torch.from_numpy(gen).permute(0, 3, 1, 2).contiguous()  # (b, 3, S, S)
        writers["generated"].append(generated)
        writers["product"].append(torch.from_numpy(prod).permute(0, 3, 1, 2))
        if "placed" in writers:
            writers["placed"].append(aligned_rows(table, rows, size))
        for kind in ("depth", "saliency"):
            if kind not in writers:
                continue
            if maps == "truth":
                for i in rows:
                    if not truth[kind][i]:
                        raise ValueError(f"row {i}: no {kind}_path for maps='truth'")
                maps_np = np.stack([load_resized(truth[kind][i], size, "L") for i in rows])
                writers[kind].append(maps_np[:, None])
            else:
                writers[kind].append(predict_maps(extractors[kind], generated))
        if rng is not None:
            bad = np.stack([degrade(np.ascontiguousarray(im), rng) for im in gen])
            bad_t = torch.from_numpy(bad).permute(0, 3, 1, 2).contiguous()
            writers[DEGRADED_PREFIX + "generated"].append(bad_t)
            for kind in ("depth", "saliency"):
                if DEGRADED_PREFIX + kind in writers:
                    writers[DEGRADED_PREFIX + kind].append(predict_maps(extractors[kind], bad_t))
        bar.update(len(rows))
    bar.close()
    for w in writers.values():
        w.close()
    if "caption" in mods:
        captions = [str(c) for c in table["caption"].to_pylist()]
        _write_captions(folder, extractors["caption"], captions)


def prepare_inspection_store(
    table: pa.Table,
    config: RFNetConfig,
    folder: str | Path,
    maps: str = "predicted",
    degrade_seed: int | None = None,
    depth_model=None,
    saliency_model=None,
    caption_encoder=None,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
    measurements: Sequence[str] = (),
) -> InspectionStore:
    """Prepare (or reuse) the disk-backed inspection data of ``table`` in ``folder``.

    Args:
        table / config / maps / depth_model / saliency_model / caption_encoder: As for
            :func:`rewardkit.training.rfnet.prepare_inspection_data`.
        folder: The store's folder (e.g. ``<run>/data_cache``); rebuilt when its key differs.
        degrade_seed: Also store a degraded copy (``InspectionStore.degraded()``), as
            :func:`~rewardkit.training.rfnet.degrade_inspection_data` with this seed makes it
            (the maps predicted again with ``maps="predicted"``, kept with ``"truth"``).
        chunk_rows: Rows decoded and written at a time (a multiple of ``MAP_BATCH`` keeps the
            map predictions' batches those of the in-memory path).
        measurements: Also store these measurement heads' targets
            (``training.rfnet.measurement_targets``; the store's ``targets``).

    Under a multi-process launch the main process builds; the others wait for its key.
    """
    from rewardkit.models.modalities import load_modality

    if maps not in ("predicted", "truth"):
        raise ValueError(f"maps must be 'predicted' or 'truth'; got {maps!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
    classes = tuple(config.classes)
    labels = table["label"].to_pylist()
    for i, lab in enumerate(labels):
        if lab not in classes:
            raise ValueError(f"row {i}: label {lab!r} is not one of the model's classes {classes}")
    mods = set(config.modalities)
    extractors: dict = {}
    if maps == "predicted":
        for kind, given in (("depth", depth_model), ("saliency", saliency_model)):
            if kind in mods:
                extractors[kind] = given or load_modality(kind)
    if "caption" in mods:
        extractors["caption"] = caption_encoder or load_modality("caption")
    from rewardkit.training.rfnet import measurement_targets

    targets = measurement_targets(table, measurements) if measurements else None  # checks first
    key = store_key(table, config, maps, degrade_seed, extractors, progress, measurements)
    folder = Path(folder)
    paths = [str(p) for p in table["path"].to_pylist()]

    def build(building: Path) -> dict:
        _build(building, table, config, maps, degrade_seed, maps == "predicted", extractors,
               chunk_rows, progress)  # fmt: skip
        split = (
            table["split"].to_pylist() if "split" in table.column_names else ["test"] * len(labels)
        )
        split_names = sorted(set(split))
        np.save(building / "labels.npy", np.array([classes.index(x) for x in labels], np.int16))
        np.save(building / "split.npy", np.array([split_names.index(s) for s in split], np.int8))
        write_json_atomic(building / "paths.json", paths)
        if targets is not None:
            np.save(building / "targets.npy", targets)
        return {"version": FORMAT_VERSION, "rows": len(labels), "classes": list(classes),
                "split_names": split_names, "resolution": config.resolution,
                "modalities": list(config.modalities), "maps": maps,
                "degrade_seed": degrade_seed,
                "measurements": list(measurements)}  # fmt: skip

    build_keyed_folder(folder, key, build, poll_s=2.0)
    return InspectionStore(folder, paths)
