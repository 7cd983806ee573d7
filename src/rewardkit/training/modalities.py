"""Recipes for the map extractors: train depth / saliency models, evaluate, cache their maps.

- :func:`train_map_model`: trains a :class:`~rewardkit.models.modalities.DepthEstimator` or
  :class:`~rewardkit.models.modalities.SaliencyEstimator` on a manifest's images against its
  ground-truth maps (``depth_path`` / ``saliency_path``, 8-bit PNGs as AdWorld writes them),
  with the shared loop of :mod:`rewardkit.training.loop` (AdamW, safetensors checkpoints,
  exact resume). A seeded random ``val_rows`` rows are held out.

  - Depth loss: MiDaS's scale- and shift-invariant L1. Prediction and truth are each
    normalised per image by their median ``t`` and mean absolute deviation ``s``
    (``(d - t) / s``), then compared with L1. Only relative depth is learnt (as the
    extractor's min-max normalised output keeps only that), and unlike a least-squares
    alignment the normalisation keeps the sign: an inverted map is not a solution.
  - Saliency loss: binary cross-entropy of the logits against the soft truth in [0, 1],
    plus ``iou_weight`` x soft IoU loss ``1 - sum(p g) / sum(p + g - p g)`` per image.

- :func:`map_metrics` / :func:`evaluate_maps`: depth: Spearman's rank correlation per image
  (tie-aware), AbsRel after a least-squares scale-and-shift alignment to the truth, MAE of
  the min-max normalised maps; saliency: MAE, IoU at 0.5, IoU at the adaptive threshold
  (2 x the map's mean, the salient-object literature's), Pearson CC. Per-image means.
- :func:`extract_maps`: runs extractors over every image of a manifest and caches their
  maps as 8-bit PNGs (AdWorld's conventions: depth 255 = nearest), resumably.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rewardkit.io import (
    read_image,
    read_image_rgb,
    write_json_atomic,
    write_parquet_atomic,
    write_png_atomic,
)
from rewardkit.models.modalities import (
    DepthEstimator,
    SaliencyEstimator,
    load_modality,
    small_depth_config,
    small_saliency_config,
)
from rewardkit.training.loop import (
    TrainConfigBase,
    TrainResult,
    as_float,
    load_images,
    read_table,
    resumable,
    run_training,
)

__all__ = [
    "MAP_MODEL_KINDS",
    "MapTrainConfig",
    "evaluate_maps",
    "extract_maps",
    "map_metrics",
    "train_map_model",
    "validation_rows",
]

log = logging.getLogger(__name__)

MAP_MODEL_KINDS = ("depth", "saliency")
_CLASSES = {"depth": DepthEstimator, "saliency": SaliencyEstimator}


@dataclass
class MapTrainConfig(TrainConfigBase):
    """Training a small depth or saliency model; defaults fit 5 CPU minutes at 64 px."""

    lr: float = 2e-3  # small models from scratch; warm-up then cosine decay
    batch_size: int = 32
    epochs: int = 3  # about 500 steps on 5,400 images: the CPU budget
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05  # of the steps, linear from 0
    init: str | None = None  # starting model folder; None: the small default config, random
    image_size: int = 64  # input side of a new model (ignored with ``init``)
    val_rows: int = 500  # held out (at most a fifth of the rows)
    flip: bool = True  # random horizontal flips (both maps are mirror-symmetric tasks)
    iou_weight: float = 1.0  # saliency: soft IoU loss next to BCE

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: must be in [0, 1); got {self.warmup_fraction}")
        if self.val_rows < 1:
            raise ValueError(f"val_rows: must be >= 1; got {self.val_rows}")
        if self.iou_weight < 0:
            raise ValueError(f"iou_weight: must be >= 0; got {self.iou_weight}")


# ---------------------------------------------------------------------------------------
# Data.


def _load_maps(paths: Sequence[str], root: Path, shape: tuple[int, int], column: str):
    """Grey maps (8- or 16-bit, scaled to 8) -> uint8 tensor (N, 1, H, W); each must have the
    images' size."""
    arrays = []
    for i, rel in enumerate(paths):
        if not rel:
            raise ValueError(f"row {i}: empty {column}")
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        try:
            arr = read_image(path, "L")  # (H, W)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: map file not found (row {i}, {column})") from None
        except ValueError as err:  # names the file and what is wrong with it
            raise ValueError(f"{err} (row {i}, {column})") from None
        if arr.shape != shape:
            raise ValueError(f"{path}: size {arr.shape} differs from its image's {shape}")
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1).contiguous()  # (N, 1, H, W)


def validation_rows(n_rows: int, config: MapTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows) of a manifest with ``n_rows`` rows: a seeded split."""
    n_val = min(config.val_rows, n_rows // 5)
    if n_val < 1:
        raise ValueError(f"{n_rows} rows are too few to hold out a validation set")
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(config.seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _load_split(
    kind: str, manifest: Path, config: MapTrainConfig, progress: bool, only_val: bool = False
):
    """Images (N, 3, H, W), truth maps (N, 1, H, W), train rows, validation rows (uint8
    tensors; with ``only_val`` just the validation rows are decoded, numbered 0..V-1)."""
    column = f"{kind}_path"
    table = read_table(manifest, ["path", column])
    train_rows, val_rows = validation_rows(table.num_rows, config)
    if only_val:
        table = table.take(pa.array(val_rows.numpy()))
        train_rows, val_rows = train_rows[:0], torch.arange(len(val_rows))
    images = load_images(table.column("path").to_pylist(), manifest.parent, progress)
    truth = _load_maps(
        table.column(column).to_pylist(), manifest.parent, tuple(images.shape[-2:]), column
    )
    return images, truth, train_rows, val_rows


# ---------------------------------------------------------------------------------------
# Losses and metrics.


def _median_mad_normalise(maps: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, H*W): (d - median) / mean |d - median| per image (MiDaS)."""
    flat = maps.flatten(1)  # (B, P)
    shift = flat.median(dim=1, keepdim=True).values  # (B, 1)
    scale = (flat - shift).abs().mean(dim=1, keepdim=True).clamp_min(1e-6)  # (B, 1)
    return (flat - shift) / scale


def depth_loss(raw: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Scale- and shift-invariant L1 between predictions (B, 1, h, w) and truth (B, 1, H, W)."""
    if raw.shape[-2:] != truth.shape[-2:]:
        raw = F.interpolate(raw, size=truth.shape[-2:], mode="bilinear", align_corners=False)
    return (_median_mad_normalise(raw) - _median_mad_normalise(truth)).abs().mean()


def saliency_loss(logits: torch.Tensor, truth: torch.Tensor, iou_weight: float) -> torch.Tensor:
    """BCE(logits, soft truth) + iou_weight * soft IoU loss; both (B, 1, H, W)."""
    loss = F.binary_cross_entropy_with_logits(logits, truth)
    if iou_weight > 0:
        p, g = torch.sigmoid(logits).flatten(1), truth.flatten(1)  # (B, P)
        inter = (p * g).sum(1)
        union = (p + g - p * g).sum(1)
        loss = loss + iou_weight * (1 - (inter + 1.0) / (union + 1.0)).mean()
    return loss


def _rows_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b (N,); constant rows: 0."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 0.0)


def _iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU per row of boolean masks (N, P); two empty masks agree (1)."""
    inter = (pred & truth).sum(1)
    union = (pred | truth).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def map_metrics(kind: str, pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Validation figures of predicted maps against the truth, averaged over images.

    Args:
        kind: ``"depth"`` or ``"saliency"``.
        pred: Extractor output (N, 1, H, W) in [0, 1] (depth: 1 = nearest).
        truth: Ground truth (N, 1, H, W) in [0, 1] (depth: larger = nearer, any scale).

    Returns:
        depth: ``spearman`` (higher better), ``abs_rel`` (prediction aligned to the truth by
        least-squares scale and shift; lower better), ``mae`` (against the min-max
        normalised truth; lower better). saliency: ``mae``, ``iou@0.5``, ``iou_adaptive``
        (prediction thresholded at 2 x its mean, capped at 1), ``cc`` (Pearson).
    """
    from scipy.stats import rankdata

    if kind not in MAP_MODEL_KINDS:
        raise ValueError(f"kind must be one of {MAP_MODEL_KINDS}; got {kind!r}")
    if pred.shape != truth.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and truth {tuple(truth.shape)} differ")
    p = pred.detach().flatten(1).double().cpu().numpy()  # (N, P)
    g = truth.detach().flatten(1).double().cpu().numpy()  # (N, P)
    if kind == "depth":
        spearman = _rows_pearson(rankdata(p, axis=1), rankdata(g, axis=1))
        # Least-squares scale and shift of the prediction onto the truth, per image.
        pc, gc = p - p.mean(1, keepdims=True), g - g.mean(1, keepdims=True)
        var = (pc * pc).sum(1, keepdims=True)
        scale = np.where(var > 0, (pc * gc).sum(1, keepdims=True) / np.where(var > 0, var, 1), 0)
        aligned = scale * pc + g.mean(1, keepdims=True)
        abs_rel = (np.abs(aligned - g) / np.maximum(g, 1 / 255)).mean(1)
        lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
        g01 = (g - lo) / np.maximum(hi - lo, 1e-8)
        mae = np.abs(p - g01).mean(1)
        return {
            "spearman": float(spearman.mean()),
            "abs_rel": float(abs_rel.mean()),
            "mae": float(mae.mean()),
        }
    threshold = np.minimum(2 * p.mean(1, keepdims=True), 1.0)
    return {
        "mae": float(np.abs(p - g).mean()),
        "iou@0.5": float(_iou(p > 0.5, g > 0.5).mean()),
        "iou_adaptive": float(_iou(p >= threshold, g > 0.5).mean()),
        "cc": float(_rows_pearson(p, g).mean()),
    }


@torch.no_grad()
def _predict(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> maps (N, 1, H, W) in [0, 1], on the CPU."""
    device = _module_device(extractor)
    out = [extractor(as_float(images[i : i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(out)


def evaluate_maps(
    extractor: nn.Module,
    kind: str,
    manifest: str | Path,
    config: MapTrainConfig | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`map_metrics` of any map extractor on the validation rows that
    :func:`train_map_model` holds out with ``config`` (same seed, same rows)."""
    manifest = Path(manifest)
    config = config or MapTrainConfig()
    images, truth, _, val = _load_split(kind, manifest, config, progress, only_val=True)
    was_training = extractor.training
    extractor.eval()
    pred = _predict(extractor, images[val])
    extractor.train(was_training)
    return map_metrics(kind, pred, truth[val].float() / 255)


# ---------------------------------------------------------------------------------------
# Training.


def _warmup_cosine(warmup_fraction: float):
    def factor(step: int, total: int) -> float:
        warm = max(1, round(warmup_fraction * total))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


def train_map_model(
    model_kind: str,
    manifest: str | Path,
    out_dir: str | Path,
    config: MapTrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a depth or saliency model on a manifest's images and ground-truth maps.

    Args:
        model_kind: ``"depth"`` (truth in ``depth_path``) or ``"saliency"`` (``saliency_path``).
        manifest: Parquet with ``path`` and the truth column (paths relative to its folder or
            absolute); images and maps all of one size.
        out_dir: Output folder: ``model/`` (loadable with ``load_modality(model_kind,
            out_dir / "model")``), ``checkpoint/`` (resume), ``train_summary.json``.
        config: Settings (:class:`MapTrainConfig`).
        progress: Show progress bars.

    Returns:
        The run's :class:`~rewardkit.training.loop.TrainResult`; ``metrics`` holds
        :func:`map_metrics` on the held-out rows, prefixed ``val_``.
    """
    if model_kind not in MAP_MODEL_KINDS:
        raise ValueError(f"model_kind must be one of {MAP_MODEL_KINDS}; got {model_kind!r}")
    config = config or MapTrainConfig()
    manifest, out_dir = Path(manifest), Path(out_dir)
    images, truth, train_rows, val_rows = _load_split(model_kind, manifest, config, progress)
    if len(train_rows) < config.batch_size:
        raise ValueError(
            f"{manifest}: {len(train_rows)} training rows < batch_size {config.batch_size}"
        )
    cls = _CLASSES[model_kind]
    if config.init is not None:
        model = cls.from_pretrained(config.init)
    elif model_kind == "depth":
        model = cls.from_config(small_depth_config(config.image_size), seed=config.seed)
    else:
        model = cls.from_config(small_saliency_config(), config.image_size, seed=config.seed)
    model.requires_grad_(True)

    def step_loss(rows: torch.Tensor) -> torch.Tensor:
        idx = train_rows[rows]
        x = as_float(images[idx]).to(model.device)  # (B, 3, H, W)
        y = (truth[idx].float() / 255).to(model.device)  # (B, 1, H, W)
        if config.flip:  # seeded by the rows, so a resumed run flips the same images
            g = torch.Generator().manual_seed(config.seed + int(idx.sum()) * 7919)
            flip = (torch.rand(len(idx), generator=g) < 0.5).to(model.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            y = torch.where(flip.view(-1, 1, 1, 1), y.flip(-1), y)
        if model_kind == "depth":
            return depth_loss(model.predict_raw(x), y)
        return saliency_loss(model.predict_logits(x), y, config.iou_weight)

    def evaluate() -> dict[str, float]:
        pred = _predict(model, images[val_rows])
        metrics = map_metrics(model_kind, pred, truth[val_rows].float() / 255)
        return {f"val_{k}": v for k, v in metrics.items()}

    signature = {
        "recipe": f"map-{model_kind}",
        "config": resumable(config),
        "rows": len(images),
    }
    return run_training(
        model, len(train_rows), step_loss, config, out_dir, signature, evaluate,
        model.save_pretrained, progress, lr_factor=_warmup_cosine(config.warmup_fraction),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Caching maps for training sets.


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _map_name(rel: str) -> PurePosixPath:
    """Where an image's map goes under ``<kind>/``: its path without a leading ``images/``
    (AdWorld's layout: images/000000.png -> depth/000000.png), as PNG."""
    parts = [p for p in PurePosixPath(str(rel).replace("\\", "/")).parts if p not in ("/", "..")]
    parts = [p for p in parts if p != "."]
    if len(parts) > 1 and parts[0] == "images":
        parts = parts[1:]
    if not parts:
        raise ValueError(f"{rel!r}: not an image path")
    return PurePosixPath(*parts).with_suffix(".png")


def _relative_to(path: str, root: Path, out_dir: Path) -> str:
    """A manifest path (relative to ``root`` or absolute) made relative to ``out_dir``."""
    if Path(path).is_absolute():
        return path
    return Path(os.path.relpath(root / path, out_dir)).as_posix()


def extract_maps(
    manifest: str | Path,
    out_dir: str | Path,
    depth: nn.Module | str | Path | None = None,
    saliency: nn.Module | str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    kinds: Sequence[str] = ("depth", "saliency"),
) -> pa.Table:
    """Run map extractors over every image of a manifest and cache the maps as 8-bit PNGs.

    Writes ``out_dir/depth/<name>.png`` (255 = nearest) and ``out_dir/saliency/<name>.png``,
    where ``<name>`` is the image's path without a leading ``images/`` (so AdWorld's
    ``images/000000.png`` gives ``depth/000000.png``, as its ground truth), and
    ``out_dir/manifest.parquet``: the manifest with its path columns made relative to
    ``out_dir`` and ``pred_depth_path`` / ``pred_saliency_path`` added (null where the
    image could not be read). Maps already on disk are kept (resume); unreadable images
    are skipped, counted and listed in ``out_dir/maps_summary.json``.

    Args:
        manifest: Parquet with a ``path`` column (relative to its folder, or absolute).
        out_dir: Output folder; not the manifest's own folder (its manifest would be replaced).
        depth: Depth extractor: a module, a model folder, or None for the embedded default.
        saliency: Saliency extractor (a module, a folder, or None: the embedded default).
        batch_size: Images per extractor call.
        progress: Show a progress bar.
        kinds: Which maps to produce: ``"depth"`` and/or ``"saliency"``.

    Returns:
        The table written to ``out_dir/manifest.parquet``.

    Raises:
        ValueError: Unknown kind, ``out_dir`` is the manifest's folder, or two images would
            share a map file.
    """
    kinds = tuple(dict.fromkeys(kinds))
    if not kinds or any(k not in MAP_MODEL_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {MAP_MODEL_KINDS}; got {kinds}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    manifest, out_dir = Path(manifest), Path(out_dir)
    root = manifest.parent.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if out_dir.resolve() == root:
        raise ValueError(f"{out_dir}: out_dir must differ from the manifest's folder")
    table = read_table(manifest, ["path"])
    paths = [str(p) if p is not None else "" for p in table.column("path").to_pylist()]
    names = [_map_name(p) if p else None for p in paths]
    seen: dict[PurePosixPath, int] = {}
    for i, name in enumerate(names):
        if name is not None and seen.setdefault(name, i) != i:
            raise ValueError(
                f"{manifest}: rows {seen[name]} and {i} would share the map file {name}"
            )
    given = {"depth": depth, "saliency": saliency}
    extractors: dict[str, nn.Module] = {}
    for kind in kinds:
        module = given[kind]
        if not isinstance(module, nn.Module):
            module = load_modality(kind, module)
        extractors[kind] = module.eval()

    def target(kind: str, i: int) -> Path:
        return out_dir / kind / names[i]

    todo = [
        i for i, name in enumerate(names)
        if name is None or not all(target(k, i).is_file() for k in kinds)
    ]  # fmt: skip
    bad: dict[int, str] = {}
    bar = tqdm(total=len(todo), desc="maps", disable=not progress, unit="img")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        by_shape: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        for i in chunk:
            if names[i] is None:
                bad[i] = "empty path"
                continue
            file = Path(paths[i]) if Path(paths[i]).is_absolute() else root / paths[i]
            try:
                arr = read_image_rgb(file)  # (H, W, 3)
            except (FileNotFoundError, ValueError) as err:
                bad[i] = str(err)
                continue
            by_shape.setdefault(arr.shape, []).append((i, arr))
        for group in by_shape.values():
            rows = [i for i, _ in group]
            batch = torch.from_numpy(np.stack([a for _, a in group])).permute(0, 3, 1, 2)
            for kind, extractor in extractors.items():
                maps = _predict(extractor, batch)  # (b, 1, H, W)
                maps8 = (maps.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
                for i, m in zip(rows, maps8, strict=True):
                    write_png_atomic(target(kind, i), m)
        bar.update(len(chunk))
    bar.close()
    if bad:
        log.warning("%s: skipped %d unreadable image(s)", manifest, len(bad))

    out_root = out_dir.resolve()
    columns = {}
    for name in table.column_names:
        values = table.column(name)
        if (name == "path" or name.endswith("_path")) and pa.types.is_string(values.type):
            values = pa.array(
                [_relative_to(v, root, out_root) if v else v for v in values.to_pylist()],
                pa.string(),
            )
        columns[name] = values
    for kind in kinds:
        columns[f"pred_{kind}_path"] = pa.array(
            [
                None if (i in bad or names[i] is None) else f"{kind}/{names[i]}"
                for i in range(len(names))
            ],
            pa.string(),
        )
    summary = {
        "manifest": str(manifest),
        "rows": len(names),
        "written": len(todo) - len(bad),
        "reused": len(names) - len(todo),
        "skipped": len(bad),
        "skipped_rows": [{"row": i, "path": paths[i], "error": e} for i, e in sorted(bad.items())],
        "kinds": list(kinds),
    }
    out = pa.table(columns).replace_schema_metadata(
        {"rewardkit_maps": json.dumps({k: v for k, v in summary.items() if k != "skipped_rows"})}
    )
    write_parquet_atomic(out_dir / "manifest.parquet", out)
    write_json_atomic(out_dir / "maps_summary.json", summary)
    return out
