"""RFNet recipes: prepare inspection tensors, train (the paper's schedule), evaluate.

- :func:`prepare_inspection_data` turns a sample table (``rewardkit.data.samples``: path,
  product_path, caption, label, split, optional depth/saliency paths) into tensors at the
  model's resolution. Depth and saliency come from the modality extractors by default
  (``maps="predicted"``: what the inspector sees at inspection time) or from the table's
  ground-truth maps (``maps="truth"``). Caption token states are computed once (the caption
  encoder is frozen). Everything is held in memory; data larger than memory goes through
  :func:`rewardkit.training.inspection_store.prepare_inspection_store` (the same arrays,
  prepared in chunks into the run folder, rows read on demand), which ``train rfnet`` uses.
- :func:`train_rfnet`: cross-entropy with inverse-frequency class weights, AdamW, lr 1e-4
  divided by 10 at half the steps, 10 epochs (the paper's schedule), optional degradation
  of the generated images (blur, noise, JPEG) so the inspector tolerates imperfect images;
  checkpoints and resume from :mod:`rewardkit.training.loop`.
- :func:`evaluate_rfnet`: precision, recall, F1 and AP of "Available vs not" (AP from the
  Available probability), accuracy, and the per-class confusion matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rewardkit.data.samples import load_product_rgb, load_resized
from rewardkit.models.rfnet import (
    AVAILABLE,
    EARLY_MODALITIES,
    MODALITIES,
    RFNet,
    RFNetConfig,
    verdict_indices,
)
from rewardkit.training.inspection_store import (
    CAPTION_BATCH,
    InspectionStore,
    aligned_rows,
    row_heights,
)
from rewardkit.training.inspection_store import predict_maps as _predict_maps
from rewardkit.training.loop import (
    MicroBatch,
    TrainConfigBase,
    TrainResult,
    keyed_generator,
    resumable,
    run_training,
)
from rewardkit.world.oracle import TARGET_COLUMN_PREFIX, TARGET_KINDS, measurement_target

__all__ = [
    "InspectionData",
    "RFNetTrainConfig",
    "EARLY_VARIANTS",
    "VARIANTS",
    "degrade_inspection_data",
    "average_precision",
    "evaluate_rfnet",
    "predict_rfnet",
    "prepare_inspection_data",
    "train_rfnet",
    "variants_for",
]

# The paper's two tables: RFNet vs the same backbone on the generated image alone, and the
# ablation that removes one input at a time (each variant is trained from scratch).
VARIANTS: dict[str, tuple[str, ...]] = {
    "full": MODALITIES,
    "image-only": ("generated",),
    **{f"no-{m}": tuple(x for x in MODALITIES if x != m) for m in MODALITIES},
}
# The same tables for early fusion (``RFNetConfig.aligned``): its own inputs.
EARLY_VARIANTS: dict[str, tuple[str, ...]] = {
    "full": EARLY_MODALITIES,
    "image-only": ("generated",),
    **{f"no-{m}": tuple(x for x in EARLY_MODALITIES if x != m)
       for m in EARLY_MODALITIES if m != "generated"},
}  # fmt: skip


def variants_for(config: RFNetConfig) -> dict[str, tuple[str, ...]]:
    """The variants (name -> modalities) of a config's fusion."""
    return EARLY_VARIANTS if config.fusion == "early" else VARIANTS


SCHEDULES = ("step", "onecycle")
FLIPPED_INPUTS = ("product", "generated", "depth", "saliency", "placed")

# What degradation changes (the image and the maps predicted from it); product photo and
# caption stay as they are.
DEGRADED_INPUTS = ("generated", "depth", "saliency")
# The measurement heads ``measurement_weight > 0`` gives a model (every oracle measurement
# with a decision threshold; world.oracle.TARGET_KINDS).
MEASUREMENT_HEADS = tuple(TARGET_KINDS)


@dataclass
class RFNetTrainConfig(TrainConfigBase):
    """RFNet training; defaults are the paper's schedule where it gives one."""

    lr: float = 1e-4  # paper
    batch_size: int = 32
    epochs: int = 10  # paper
    weight_decay: float = 1e-4
    lr_drop_at: float = 0.5  # paper: lr / 10 at half of training
    class_weighting: bool = True  # inverse class frequency in the cross-entropy
    # The weights are (mean count / class count) ** this: 1 is inverse frequency, 0.5 a milder
    # boost of rare classes (e.g. a defect in 3% of generated images), 0 none.
    class_weight_power: float = 1.0
    degrade: float = 0.5  # share of training images blurred/noised (generated images are)
    # Draw that share from a degraded copy of the training images (world.perturb.degrade:
    # blur, noise, JPEG) whose depth and saliency are predicted again from the degraded
    # pixels, as at inspection time; False: blur and noise the clean batch on the fly.
    degraded_copy: bool = True
    # "step": the paper's (lr / 10 at ``lr_drop_at``); "onecycle": a linear warm-up over the
    # first 10% of steps from lr / 25, then a cosine decay to ~0 (for models trained from
    # scratch at a high rate, e.g. the early-fusion preset).
    schedule: str = "step"
    flip: bool = False  # mirror a random half of each batch (every image input): same verdict
    label_smoothing: float = 0.0
    # Beyond the paper: weight of the measurement heads' loss (smooth L1 on the oracle's
    # measurements in units of their thresholds, ``world.oracle.measurement_target``) beside
    # the cross-entropy. > 0 gives an early-fusion model heads for ``MEASUREMENT_HEADS`` (a new
    # model, or new heads on an ``--init`` model without them) and needs the manifest's
    # ``oracle_<name>`` columns (``world label --training-manifest`` writes them). 0: none.
    measurement_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.measurement_weight < 0:
            raise ValueError(f"measurement_weight: must be >= 0; got {self.measurement_weight}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: one of {SCHEDULES}; got {self.schedule!r}")
        if self.class_weight_power < 0:
            raise ValueError(f"class_weight_power: must be >= 0; got {self.class_weight_power}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1); got {self.label_smoothing}")


@dataclass
class InspectionData:
    """Inspection inputs for N samples at one resolution R (uint8 images, float tokens)."""

    product: torch.Tensor  # (N, 3, R, R) uint8, on white, padded square (load_product_rgb)
    generated: torch.Tensor  # (N, 3, R, R) uint8
    depth: torch.Tensor | None  # (N, 1, R, R) uint8, 255 = nearest
    saliency: torch.Tensor | None  # (N, 1, R, R) uint8
    caption_tokens: torch.Tensor | None  # (N, T, H) float32
    caption_mask: torch.Tensor | None  # (N, T) long
    labels: torch.Tensor  # (N,) long, index into classes
    classes: tuple[str, ...]
    split: list[str]
    paths: list[str]
    placed: torch.Tensor | None = None  # (N, 4, R, R) uint8: placed product on white + mask
    height_cm: torch.Tensor | None = None  # (N,) float32: the product's height
    # (N, len(measurements)) float32 measurement targets, NaN where not measured (training)
    targets: torch.Tensor | None = None
    measurements: tuple[str, ...] = ()  # the targets' names (world.oracle.TARGET_KINDS)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, split: str) -> torch.Tensor:
        """Row indices (long) of one split."""
        return torch.tensor([i for i, s in enumerate(self.split) if s == split], dtype=torch.long)

    def batch(
        self,
        rows: torch.Tensor,
        modalities: tuple[str, ...] = MODALITIES,
        device: torch.device | str = "cpu",
    ) -> dict:
        """Model inputs for ``rows``: float images in [0, 1], caption tokens and mask; the
        modalities a model does not use are None."""
        from rewardkit.training.inspection_store import to_model_inputs

        use = set(modalities)
        raw = {
            name: None if x is None or name not in use else x[rows]
            for name, x in (("product", self.product), ("generated", self.generated),
                            ("depth", self.depth), ("saliency", self.saliency),
                            ("placed", self.placed))
        }  # fmt: skip
        heights = "height" in use and self.height_cm is not None
        raw["height_cm"] = self.height_cm[rows] if heights else None
        captions = "caption" in use and self.caption_tokens is not None
        raw["caption_tokens"] = self.caption_tokens[rows] if captions else None
        raw["caption_mask"] = self.caption_mask[rows] if captions else None
        return to_model_inputs(raw, device)


def prepare_inspection_data(
    table: pa.Table,
    config: RFNetConfig,
    maps: str = "predicted",
    depth_model=None,
    saliency_model=None,
    caption_encoder=None,
    progress: bool = True,
    modalities: tuple[str, ...] | None = None,
    measurements: Sequence[str] = (),
) -> InspectionData:
    """Decode and encode every sample of ``table`` for an RFNet with ``config``.

    Args:
        table: Samples with absolute paths (``rewardkit.data.samples`` loaders): path,
            product_path, caption, label, split; depth_path/saliency_path for ``maps="truth"``.
        config: The model config (resolution, modalities, classes).
        maps: ``"predicted"`` (the extractors; default models when None) or ``"truth"``.
        depth_model / saliency_model / caption_encoder: Extractors to use instead of the
            embedded defaults (``rewardkit.models.modalities.load_modality``).
        progress: Show a progress bar while decoding.
        modalities: The inputs to prepare (default ``config.modalities``): several models of
            other inputs (late and early fusion) can then read one copy.
        measurements: Also read these measurement heads' targets (``targets``) from the
            table's ``oracle_<name>`` columns (:func:`measurement_targets`): for training.

    Raises:
        ValueError: Unknown ``maps``, a label outside ``config.classes`` (naming the row),
            or missing map paths for ``maps="truth"``.
    """
    from rewardkit.models.modalities import load_modality

    if maps not in ("predicted", "truth"):
        raise ValueError(f"maps must be 'predicted' or 'truth'; got {maps!r}")
    mods = set(config.modalities if modalities is None else modalities)
    size = config.resolution
    classes = tuple(config.classes)
    labels = []
    for i, lab in enumerate(table["label"].to_pylist()):
        if lab not in classes:
            raise ValueError(f"row {i}: label {lab!r} is not one of the model's classes {classes}")
        labels.append(classes.index(lab))
    paths = table["path"].to_pylist()
    gen, prod, dep, sal = [], [], [], []
    need_truth = maps == "truth" and bool(mods & {"depth", "saliency"})
    for i in tqdm(range(table.num_rows), desc="decode", disable=not progress, unit="img"):
        gen.append(load_resized(paths[i], size, "RGB"))  # (S, S, 3)
        prod.append(load_product_rgb(table["product_path"][i].as_py(), size))  # on white
        if need_truth:
            for kind, bucket in (("depth", dep), ("saliency", sal)):
                if kind in mods:
                    column = f"{kind}_path"
                    p = table[column][i].as_py() if column in table.column_names else None
                    if not p:
                        raise ValueError(f"row {i}: no {kind}_path for maps='truth'")
                    bucket.append(load_resized(p, size, "L"))  # (S, S)
    generated = torch.from_numpy(np.stack(gen)).permute(0, 3, 1, 2).contiguous()
    product = torch.from_numpy(np.stack(prod)).permute(0, 3, 1, 2).contiguous()
    depth = saliency = None
    if "depth" in mods:
        if maps == "truth":
            depth = torch.from_numpy(np.stack(dep)).unsqueeze(1)
        else:
            depth = _predict_maps(depth_model or load_modality("depth"), generated)
    if "saliency" in mods:
        if maps == "truth":
            saliency = torch.from_numpy(np.stack(sal)).unsqueeze(1)
        else:
            saliency = _predict_maps(saliency_model or load_modality("saliency"), generated)
    tokens = mask = None
    if "caption" in mods:
        encoder = caption_encoder or load_modality("caption")
        captions = [str(c) for c in table["caption"].to_pylist()]
        tokens, mask = _encode_captions(encoder, captions)
    placed = heights = None
    if "placed" in mods:
        placed = torch.from_numpy(aligned_rows(table, range(table.num_rows), size))
    if "height" in mods:
        heights = torch.from_numpy(row_heights(table))
    split = table["split"].to_pylist() if "split" in table.column_names else ["test"] * len(paths)
    targets = None
    if measurements:
        targets = torch.from_numpy(measurement_targets(table, measurements))
    return InspectionData(
        product=product, generated=generated, depth=depth, saliency=saliency,
        caption_tokens=tokens, caption_mask=mask,
        labels=torch.tensor(labels, dtype=torch.long), classes=classes, split=split,
        paths=[str(p) for p in paths], placed=placed, height_cm=heights, targets=targets,
        measurements=tuple(measurements) if measurements else (),
    )  # fmt: skip


def measurement_targets(table: pa.Table, names: Sequence[str], where: str = "") -> np.ndarray:
    """The measurement heads' targets (N, len(names)) float32 from a training manifest's
    ``oracle_<name>`` columns (``world.oracle.measurement_target``; NaN: not measured).

    Raises:
        ValueError: A column is missing (naming it, ``where`` it was looked for, and how to
            get it).
    """
    cols = []
    for name in names:
        column = TARGET_COLUMN_PREFIX + name
        if column not in table.column_names:
            raise ValueError(
                f"{where + ': ' if where else ''}column {column!r} missing: measurement heads "
                "train on the oracle's measurements; label the images with `rewardkit world "
                "label --manifest M --out L --training-manifest T` and train on T"
            )
        values = table[column].to_numpy(zero_copy_only=False)
        cols.append(measurement_target(np.asarray(values, dtype=np.float64), name))
    return np.stack(cols, 1).astype(np.float32)


@torch.no_grad()
def _encode_captions(encoder, captions: list[str], batch_size: int = CAPTION_BATCH):
    """Token states (N, T, H) and mask (N, T), padded to the longest caption overall."""
    unique = sorted(set(captions))
    toks, masks = [], []
    for i in range(0, len(unique), batch_size):
        t, m = encoder.encode(unique[i : i + batch_size])  # (b, t, H), (b, t)
        toks.append(t.float().cpu())
        masks.append(m.long().cpu())
    length = max(t.shape[1] for t in toks)
    toks = torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in toks])  # (U, T, H)
    masks = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks])  # (U, T)
    where = {c: k for k, c in enumerate(unique)}
    index = torch.tensor([where[c] for c in captions])
    return toks[index], masks[index]  # (N, T, H), (N, T)


def _degrade(images: torch.Tensor, share: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Blur and noise a random share of float images (B, 3, R, R), as generators produce.
    Row i's draws (picked?, blur mix, noise) come from ``generators[i]`` alone, so a row is
    degraded the same whatever batch or process it lands in."""
    if share <= 0:
        return images
    draws = [
        (torch.rand((), generator=g), torch.rand((), generator=g),
         torch.randn(images.shape[1:], generator=g))
        for g in generators
    ]  # fmt: skip
    pick = torch.stack([d[0] for d in draws]) < share  # (B,)
    if not pick.any():
        return images
    x = images[pick]
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4.0
    k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3).to(x)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    chosen = [d for d, p in zip(draws, pick.tolist(), strict=True) if p]
    mix = torch.stack([d[1] for d in chosen]).view(-1, 1, 1, 1).to(x)
    noise = torch.stack([d[2] for d in chosen]).to(x) * 0.02
    out = images.clone()
    out[pick] = (mix * blurred + (1 - mix) * x + noise).clamp(0, 1)
    return out


def train_rfnet(
    data: InspectionData | InspectionStore,
    out_dir: str | Path,
    model_config: RFNetConfig | None = None,
    config: RFNetTrainConfig | None = None,
    init: str | Path | None = None,
    progress: bool = True,
    degraded: InspectionData | InspectionStore | None = None,
) -> TrainResult:
    """Train RFNet on the ``train`` rows of ``data``; validation accuracy after each epoch.

    Args:
        data: From :func:`prepare_inspection_data` with the same model config, or the
            disk-backed store (``inspection_store.prepare_inspection_store``)
            (rows read on demand in each step).
        degraded: :func:`degrade_inspection_data` of ``data`` (``config.degraded_copy``), or
            the store's ``degraded()``: each training sample is taken from it with
            probability ``config.degrade``.
        out_dir: Run folder: ``model/``, ``checkpoint/``, ``train_summary.json``.
        model_config: Architecture (default: :meth:`RFNetConfig.small`); ignored with ``init``.
        config: Schedule (the paper's by default).
        init: Start from a saved RFNet folder instead of a new model.
        progress: Show progress.
    """
    config = config or RFNetTrainConfig()
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights; the caller's RNG kept
        torch.default_generator.manual_seed(config.seed)
        model = (
            RFNet.from_pretrained(init)
            if init is not None
            else RFNet(model_config or RFNetConfig.small())
        )
        if config.measurement_weight > 0 and model.measure is None:
            if model.config.fusion != "early":
                raise ValueError("measurement_weight > 0: measurement heads need an "
                                 "early-fusion RFNet (--model-config aligned)")  # fmt: skip
            model.add_measurement_heads(MEASUREMENT_HEADS)
    heads = model.config.measurements
    targets_given = getattr(data, "targets", None) is not None
    if config.measurement_weight > 0 and not targets_given:
        raise ValueError("measurement_weight > 0 but the data has no measurement targets "
                         "(prepare it with measurements=the model's heads)")  # fmt: skip
    if targets_given and tuple(data.measurements) != heads:
        raise ValueError(f"data holds targets of {list(data.measurements)}, the model has "
                         f"heads {list(heads)}")  # fmt: skip
    if tuple(model.config.classes) != data.classes:
        raise ValueError(f"model classes {model.config.classes} != data classes {data.classes}")
    train_rows, val_rows = data.rows("train"), data.rows("val")
    if len(train_rows) < config.batch_size:
        raise ValueError(f"{len(train_rows)} training samples < batch_size {config.batch_size}")
    counts = torch.bincount(data.labels[train_rows], minlength=len(data.classes)).float()
    weight = None
    if config.class_weighting:
        weight = (counts.sum() / (len(counts) * counts.clamp_min(1.0))) ** config.class_weight_power

    if degraded is not None and len(degraded) != len(data):
        raise ValueError(f"degraded copy has {len(degraded)} samples, data {len(data)}")
    changed = tuple(m for m in model.config.modalities if m in DEGRADED_INPUTS)

    def fetch(micro: MicroBatch) -> dict:
        """A micro-batch's inputs on the CPU (run ahead of the step by the loop's loader)."""
        rows = train_rows[micro.rows]
        inputs = data.batch(rows, model.config.modalities)
        # Degradation draws are keyed by (seed, step, row): the same in one process or many,
        # in a loader process or not. (Dropout inside RFNet draws from each process's RNG:
        # it depends on the split.)
        gens = [keyed_generator(config.seed, micro.step, int(i)) for i in micro.rows]
        if degraded is not None and config.degrade > 0:
            draws = torch.stack([torch.rand((), generator=g) for g in gens])
            pick = draws < config.degrade  # (B,)
            other = degraded.batch(rows, changed)
            for key in changed:
                inputs[key] = torch.where(pick[:, None, None, None], other[key], inputs[key])
        elif inputs["generated"] is not None:
            inputs["generated"] = _degrade(inputs["generated"], config.degrade, gens)
        if config.flip:  # keyed like the degradation: the same mirror in any process
            flip = torch.tensor([bool(torch.rand((), generator=g) < 0.5) for g in gens])
            for key in FLIPPED_INPUTS:
                if inputs.get(key) is not None:
                    inputs[key] = torch.where(
                        flip[:, None, None, None], inputs[key].flip(3), inputs[key]
                    )
        inputs["labels"] = data.labels[rows]
        if targets_given:
            inputs["targets"] = data.targets[rows]  # mirror- and blur-invariant measurements
        return inputs

    def step_loss(batch: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
        device = next(model.parameters()).device
        inputs = {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in micro.data.items()
        }
        labels = inputs.pop("labels")
        targets = inputs.pop("targets", None)
        if not heads:
            logits = model(**inputs)  # (B, C)
        else:
            logits, measured = model(**inputs, measurements=True)  # (B, C), (B, K)
        w = None if weight is None else weight.to(logits.device)
        loss = F.cross_entropy(logits, labels, weight=w, label_smoothing=config.label_smoothing)
        if heads and targets is None:  # heads kept but not trained: still in the graph (DDP)
            loss = loss + 0.0 * measured.sum()
        elif heads:
            # Per row: the mean over its heads, a NaN target (not measured) adding nothing; then
            # the cross-entropy's (class-)weighted mean over rows, so that the processes' shares
            # of a step add up to one process's loss (``row_weight``).
            seen = ~torch.isnan(targets)
            err = F.smooth_l1_loss(measured.float(), targets.nan_to_num(), reduction="none")
            per_row = (err * seen).sum(1) / len(heads)  # (B,)
            rw = torch.ones_like(per_row) if w is None else w[labels]
            loss = loss + config.measurement_weight * (rw * per_row).sum() / rw.sum()
        return loss

    def evaluate() -> dict[str, float]:
        if len(val_rows) == 0:
            return {}
        probs = predict_rfnet(model, data, val_rows, config.batch_size)  # not the peak
        acc = float((probs.argmax(1) == data.labels[val_rows]).float().mean())
        return {"val_accuracy": acc}

    def lr_factor(step: int, total: int) -> float:
        if config.schedule == "onecycle":
            warm = max(1, round(0.1 * total))
            if step < warm:
                return 1 / 25 + (1 - 1 / 25) * step / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return 1.0 if step < config.lr_drop_at * total else 0.1

    signature = {
        "recipe": "rfnet",
        "config": resumable(config),
        "model": model.config.to_dict(),
        "samples": len(data),
    }
    # The class-weighted cross-entropy is a weighted mean over its rows.
    row_weight = None if weight is None else weight[data.labels[train_rows]]
    return run_training(
        model, len(train_rows), step_loss, config, out_dir, signature, evaluate,
        model.save_pretrained, progress, lr_factor, row_weight=row_weight, fetch=fetch,
    )  # fmt: skip


@torch.no_grad()
def predict_rfnet(
    model: RFNet,
    data: InspectionData | InspectionStore,
    rows: torch.Tensor | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Class probabilities (N, C) for ``rows`` of ``data`` (all rows when None)."""
    rows = torch.arange(len(data)) if rows is None else rows
    was_training = model.training
    model.eval()
    try:
        mods, device = tuple(model.config.modalities), next(model.parameters()).device
        out = [
            F.softmax(model(**data.batch(r, mods, device)), dim=-1).cpu()
            for r in rows.split(batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(data.classes))


def degrade_inspection_data(
    data: InspectionData,
    seed: int,
    depth_model=None,
    saliency_model=None,
    predict_maps: bool = True,
) -> InspectionData:
    """A copy whose generated images are blurred, noised and JPEG-compressed
    (``world.perturb.degrade``), with depth and saliency predicted again from them
    (``predict_maps``; otherwise the maps are kept, e.g. ground-truth maps)."""
    import dataclasses

    from rewardkit.models.modalities import load_modality
    from rewardkit.world.perturb import degrade

    rng = np.random.default_rng(seed)
    images = data.generated.permute(0, 2, 3, 1).numpy()  # (N, R, R, 3)
    degraded = np.stack([degrade(np.ascontiguousarray(im), rng) for im in images])
    generated = torch.from_numpy(degraded).permute(0, 3, 1, 2).contiguous()
    depth, saliency = data.depth, data.saliency
    if not predict_maps:
        return dataclasses.replace(data, generated=generated)
    if depth is not None:
        depth = _predict_maps(depth_model or load_modality("depth"), generated)
    if saliency is not None:
        saliency = _predict_maps(saliency_model or load_modality("saliency"), generated)
    return dataclasses.replace(data, generated=generated, depth=depth, saliency=saliency)


def choose_accept_threshold(
    probs: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    classes: tuple[str, ...],
    min_precision: float,
) -> dict:
    """The operating point with the highest Available recall whose precision on these
    (validation) samples is >= ``min_precision``: ``{"accept_threshold", "precision",
    "recall", "accepted"}``. The candidates are the samples' own P(Available) values.

    Raises:
        ValueError: No threshold reaches ``min_precision`` (naming the best precision), or
            there is no Available sample.
    """
    p = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    a = classes.index(AVAILABLE)
    positive = y == a
    if not positive.any():
        raise ValueError("no Available sample to choose an accept threshold on")
    s, accepted, tp = _ranked_counts(p[:, a], positive)
    precision, recall = tp / accepted, tp / positive.sum()
    ok = np.nonzero(precision >= min_precision)[0]
    if len(ok) == 0:
        raise ValueError(
            f"--accept-precision {min_precision}: no threshold reaches it on the validation "
            f"samples (best precision {precision.max():.3f})"
        )
    k = ok[np.argmax(recall[ok])]
    # The threshold sits between the last accepted score and the next one down.
    nxt = s[accepted[k]] if accepted[k] < len(s) else 0.0
    threshold = float(min(max((s[accepted[k] - 1] + nxt) / 2, 1e-6), 1 - 1e-6))
    return {
        "accept_threshold": threshold,
        "precision": float(precision[k]),
        "recall": float(recall[k]),
        "accepted": int(accepted[k]),
        "samples": int(len(y)),
    }


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP: mean of the precision at the rank of each positive (scores sorted descending;
    tied scores are taken as one threshold)."""
    positive = positive.astype(bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    _, accepted, tp = _ranked_counts(scores, positive)
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float((tp / accepted * recall_gain).sum())


def _ranked_counts(scores: np.ndarray, positive: np.ndarray):
    """Scores sorted descending, and at each distinct score (tied scores are one threshold)
    how many samples score at or above it and how many of those are positive."""
    order = np.argsort(-scores, kind="stable")
    s, tp = scores[order], np.cumsum(positive[order])
    last = np.r_[s[1:] != s[:-1], True]  # end of each run of tied scores
    return s, np.nonzero(last)[0] + 1, tp[last]


def verdict_figures(pred: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Available-vs-not P/R/F1, accuracy and the confusion matrix (rows = truth) of verdict
    class indices ``pred`` against ``labels``."""
    a = list(classes).index(AVAILABLE)
    is_pos, said_pos = labels == a, pred == a
    tp = int((is_pos & said_pos).sum())
    precision = tp / max(1, int(said_pos.sum()))
    recall = tp / max(1, int(is_pos.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return {
        "n": int(len(labels)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": float((pred == labels).mean()),
        "classes": list(classes),
        "confusion": confusion.tolist(),
    }


def evaluate_rfnet(
    probs: torch.Tensor,
    labels: torch.Tensor,
    classes: tuple[str, ...],
    accept_threshold: float | None = None,
) -> dict:
    """Available-vs-not P/R/F1/AP, accuracy and the confusion matrix (rows = truth), of the
    verdicts at ``accept_threshold`` (the model's operating point; None: the most probable
    class)."""
    probs_np, labels_np = probs.numpy(), labels.numpy()
    a = classes.index(AVAILABLE)
    pred = verdict_indices(probs_np, classes, accept_threshold)
    return verdict_figures(pred, labels_np, classes) | {
        "ap": average_precision(probs_np[:, a], labels_np == a)
    }
