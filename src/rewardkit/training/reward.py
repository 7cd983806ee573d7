"""Recipes for dual encoders: contrastive pre-training and reward tuning on preference pairs.

Both are plain functions over a model folder and a Parquet file, run with ``accelerate``
(device placement and mixed precision; one process for now: the step functions call the
model's embedding methods, which a DDP wrapper would not see) and checkpointed in
safetensors so a killed run resumes where it stopped:

- :func:`pretrain_contrastive`: CLIP's symmetric InfoNCE on (image, caption) rows of a
  manifest; the embedded default's stand-in for "pretrained CLIP".
- :func:`train_reward`: Social Reward tuning on ``pairs.parquet`` (prompt, pos_path,
  neg_path, weight, split): triplet loss with the prompt as anchor (the paper's) or
  Bradley-Terry on the cosine scores; the preset names which layers learn.

Images are decoded once into a uint8 tensor held in memory (N x 3 x H x W; 20k images at
64 px are 250 MB); larger sets belong on a streaming loader, which the step functions
below do not care about.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rewardkit.io import default_permissions, read_image_rgb, write_json_atomic
from rewardkit.losses import bradley_terry_loss, contrastive_clip_loss, triplet_loss
from rewardkit.models.social_reward import PRESETS, SocialReward, apply_preset

__all__ = [
    "PretrainConfig",
    "RewardTrainConfig",
    "TrainResult",
    "load_images",
    "pretrain_contrastive",
    "train_reward",
]

LOSSES = ("triplet", "bradley-terry")
CHECKPOINT_DIR = "checkpoint"


@dataclass
class _Common:
    preset: str
    lr: float
    batch_size: int
    epochs: int
    max_steps: int | None = None  # stop early (smoke tests, budgets); None: all epochs
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max grad norm; None: off
    seed: int = 0
    checkpoint_every: int = 200  # optimiser steps between checkpoints
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate)
    text_base: str | None = None  # save packed (see SocialReward.save_pretrained)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {PRESETS}; got {self.preset!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be positive; got {self.lr}")
        for name in ("batch_size", "epochs", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1; got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1 or null; got {self.max_steps}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision: 'no', 'bf16' or 'fp16'; got {self.mixed_precision}")

    @classmethod
    def from_yaml(cls, path: str | Path):
        """Load from YAML; unknown keys are an error naming the file and the key."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None


@dataclass
class RewardTrainConfig(_Common):
    """Reward tuning on preference pairs. Defaults follow the paper where it says."""

    preset: str = "paper"  # top vision/text blocks + final norms + projections (paper)
    lr: float = 3e-5  # the public code's default
    batch_size: int = 32  # paper
    epochs: int = 10  # paper
    loss: str = "triplet"  # paper; "bradley-terry" on cosine * logit scale
    margin: float = 0.3  # paper
    use_weights: bool = True  # weight triplets by the curation's pair weights
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}; got {self.loss!r}")


@dataclass
class PretrainConfig(_Common):
    """Contrastive pre-training on image-caption pairs (CLIP's objective)."""

    preset: str = "vision"  # a new vision tower against the pre-trained text tower
    lr: float = 5e-4  # a randomly initialised small tower learns fast
    batch_size: int = 128  # InfoNCE wants many in-batch negatives
    epochs: int = 8
    weight_decay: float = 0.05
    text_column: str = "prompt"  # the scene description; "caption" describes the product


@dataclass
class TrainResult:
    """What a recipe did: where the model is, its curve and its validation figures."""

    out_dir: Path
    steps: int
    seconds: float
    resumed_from: int
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Data.


def load_images(paths: Sequence[str], root: Path, progress: bool = False) -> torch.Tensor:
    """Decode images into a uint8 tensor (N, 3, H, W); every image must have the same size.

    Raises:
        FileNotFoundError / ValueError: naming the file that cannot be read, or the first
            image whose size differs from the others.
    """
    arrays, shape = [], None
    for rel in tqdm(paths, desc="load", disable=not progress, unit="img"):
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        arr = read_image_rgb(path)  # (H, W, 3)
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise ValueError(f"{path}: size {arr.shape[:2]} differs from {shape[:2]}")
        arrays.append(arr)
    if not arrays:
        raise ValueError(f"{root}: no images to load")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def _read_table(path: Path, required: Sequence[str]):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    table = pq.read_table(path)
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    return table


# ---------------------------------------------------------------------------------------
# The shared loop: an epoch-wise seeded permutation of row indices, one closure per step.


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _resumable(config: _Common) -> dict:
    """The settings a checkpoint must share with the run that resumes it (budgets aside)."""
    keep = asdict(config)
    for budget in ("max_steps", "checkpoint_every"):
        keep.pop(budget)
    return keep


def _save_checkpoint(folder: Path, reward: SocialReward, optimizer, state: dict) -> None:
    """Trainable weights (safetensors), optimiser state and counters, written atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {
        n: p.detach().cpu().contiguous() for n, p in reward.named_parameters() if p.requires_grad
    }
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    default_permissions(tmp)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, reward: SocialReward, optimizer, signature: dict) -> dict:
    state = json.loads((folder / "state.json").read_text())
    if state.get("signature") != signature:
        raise ValueError(
            f"{folder}: checkpoint was made with other settings or data; remove it or use "
            f"another --out (checkpoint {state.get('signature')}, now {signature})"
        )
    weights = load_file(folder / "trainable.safetensors")
    params = dict(reward.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{folder}: checkpoint has unknown parameters {unknown[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return state


def _text_embedder(
    reward: SocialReward, texts: list[str]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """rows -> text embeddings (B, D) of ``texts[rows]``. A frozen text tower gives the same
    pooled states every step, so they are computed once per distinct text; only the
    projection runs per step (the text tower dominates a step's cost otherwise)."""
    if any(p.requires_grad for p in reward.model.text_model.parameters()):
        return lambda rows: reward.embed_texts([texts[i] for i in rows.tolist()])
    unique = sorted(set(texts))
    with torch.no_grad():
        pooled = torch.cat(
            [reward.pool_texts(unique[i : i + 256]) for i in range(0, len(unique), 256)]
        )  # (U, H)
    index = {t: i for i, t in enumerate(unique)}
    cache = pooled[torch.tensor([index[t] for t in texts])]  # (N, H)
    return lambda rows: reward.project_texts(cache[rows].to(reward.device))


def _run(
    reward: SocialReward,
    n_rows: int,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    config: _Common,
    out_dir: Path,
    signature: dict,
    evaluate: Callable[[], dict[str, float]] | None,
    progress: bool,
) -> TrainResult:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=None)
    torch.manual_seed(config.seed)
    params = [p for p in reward.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"preset {config.preset!r} leaves nothing to train")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    reward, optimizer = accelerator.prepare(reward, optimizer)
    model = accelerator.unwrap_model(reward)

    steps_per_epoch = max(1, n_rows // config.batch_size)  # drop the ragged last batch
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    ckpt = out_dir / CHECKPOINT_DIR
    step, history = 0, []
    if (ckpt / "state.json").is_file():
        state = _load_checkpoint(ckpt, model, optimizer, signature)
        step, history = int(state["step"]), list(state["history"])
    resumed_from = step
    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train", disable=not progress, unit="step")
    running: list[float] = []
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        order = _permutation(n_rows, config.seed, epoch)
        rows = order[within * config.batch_size : (within + 1) * config.batch_size]
        model.train()
        with accelerator.autocast():
            loss = step_loss(rows)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.grad_clip is not None:
            accelerator.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        step += 1
        running.append(float(loss.detach()))
        bar.update()
        bar.set_postfix(loss=f"{np.mean(running[-50:]):.4f}")
        end_of_epoch = step % steps_per_epoch == 0 or step == total
        if end_of_epoch:
            entry: dict[str, Any] = {"step": step, "epoch": math.ceil(step / steps_per_epoch)}
            entry["loss"] = float(np.mean(running)) if running else float("nan")
            running = []
            if evaluate is not None:
                model.eval()
                entry.update(evaluate())
            history.append(entry)
            if progress:  # epoch lines on stderr: stdout carries the CLI's JSON summary
                bar.write(json.dumps(entry), file=sys.stderr)
        if step % config.checkpoint_every == 0 or end_of_epoch:
            state = {"step": step, "history": history, "signature": signature}
            _save_checkpoint(ckpt, model, optimizer, state)
    bar.close()
    model.eval()
    metrics = evaluate() if evaluate is not None else {}
    model.save_pretrained(out_dir / "model", text_base=config.text_base)
    result = TrainResult(
        out_dir=out_dir,
        steps=step,
        seconds=time.perf_counter() - start,
        resumed_from=resumed_from,
        history=history,
        metrics=metrics,
    )
    summary = {**asdict(result), "out_dir": str(out_dir), "config": asdict(config)}
    write_json_atomic(out_dir / "train_summary.json", summary)
    return result


# ---------------------------------------------------------------------------------------
# Contrastive pre-training.


def pretrain_contrastive(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    config: PretrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Pre-train a dual encoder with CLIP's loss on the (image, text) rows of a manifest.

    Args:
        model_dir: Starting dual encoder folder (e.g. from ``build_default_dual_encoder``).
        manifest: Parquet with ``path`` (relative to its folder) and ``config.text_column``.
        out_dir: Output folder: ``model/`` (the trained encoder), ``checkpoint/`` (resume),
            ``train_summary.json``.
        config: Settings; defaults train the vision tower and both projections.
        progress: Show progress bars.

    Returns:
        The run's :class:`TrainResult`; ``metrics`` holds retrieval accuracy on the last
        ``min(512, N/10)`` rows (held out from training).
    """
    config = config or PretrainConfig()
    manifest, out_dir = Path(manifest), Path(out_dir)
    table = _read_table(manifest, ["path", config.text_column])
    texts = [str(t) for t in table.column(config.text_column).to_pylist()]
    images = load_images(table.column("path").to_pylist(), manifest.parent, progress)
    n_val = min(512, len(texts) // 10)
    n_train = len(texts) - n_val
    if n_train < config.batch_size:
        raise ValueError(f"{manifest}: {n_train} training rows < batch_size {config.batch_size}")

    reward = SocialReward.from_pretrained(model_dir)
    apply_preset(reward, config.preset)
    embed_text_rows = _text_embedder(reward, texts)

    def step_loss(rows: torch.Tensor) -> torch.Tensor:
        img = reward.embed_images(_as_float(images[rows]))  # (B, D)
        txt = embed_text_rows(rows)  # (B, D)
        scale = reward.model.logit_scale.exp().clamp(max=100.0)
        return contrastive_clip_loss(img, txt, scale)

    val_rows = torch.arange(n_train, n_train + n_val)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if n_val < 2:
            return {}
        img = torch.cat([reward.embed_images(_as_float(images[r])) for r in val_rows.split(128)])
        txt = torch.cat([embed_text_rows(r) for r in val_rows.split(128)])
        sims = img @ txt.T  # (V, V)
        # Duplicate texts count as hits: retrieve a row whose text equals the true one.
        val_texts = [texts[i] for i in val_rows.tolist()]
        best = sims.argmax(dim=1).tolist()
        hit = sum(val_texts[b] == val_texts[i] for i, b in enumerate(best)) / n_val
        return {"val_image_to_text_top1": hit}

    signature = {"recipe": "pretrain", "config": _resumable(config), "rows": len(texts)}
    return _run(reward, n_train, step_loss, config, out_dir, signature, evaluate, progress)


# ---------------------------------------------------------------------------------------
# Reward tuning on preference pairs.


def train_reward(
    model_dir: str | Path,
    pairs: str | Path,
    out_dir: str | Path,
    config: RewardTrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Tune a dual encoder into a reward model on curated preference pairs.

    Args:
        model_dir: The starting dual encoder (pre-trained CLIP, or the embedded default).
        pairs: ``pairs.parquet`` from ``rewardkit curate``: prompt, pos_path, neg_path
            (relative to the file's folder, or absolute), optional weight and split.
        out_dir: Output folder: ``model/``, ``checkpoint/``, ``train_summary.json``.
        config: Settings (paper defaults).
        progress: Show progress bars.

    Returns:
        The run's :class:`TrainResult`; ``metrics`` holds the pairwise accuracy on the
        validation split (ties count half) when it has pairs.
    """
    config = config or RewardTrainConfig()
    pairs, out_dir = Path(pairs), Path(out_dir)
    table = _read_table(pairs, ["prompt", "pos_path", "neg_path"])
    split = table.column("split").to_pylist() if "split" in table.column_names else None
    prompts = [str(p) for p in table.column("prompt").to_pylist()]
    pos_paths = table.column("pos_path").to_pylist()
    neg_paths = table.column("neg_path").to_pylist()
    unique = sorted(set(pos_paths) | set(neg_paths))
    index = {p: i for i, p in enumerate(unique)}
    images = load_images(unique, pairs.parent, progress)  # (U, 3, H, W) uint8
    pos = torch.tensor([index[p] for p in pos_paths])
    neg = torch.tensor([index[p] for p in neg_paths])
    weights = torch.ones(len(prompts))
    if config.use_weights and "weight" in table.column_names:
        weights = torch.tensor(table.column("weight").to_pylist(), dtype=torch.float32)
    all_rows = torch.arange(len(prompts))
    if split is None:
        train_rows, val_rows = all_rows, all_rows[:0]
    else:
        train_rows = all_rows[[s == config.train_split for s in split]]
        val_rows = all_rows[[s == config.val_split for s in split]]
    if len(train_rows) < config.batch_size:
        raise ValueError(
            f"{pairs}: {len(train_rows)} pairs in split {config.train_split!r} "
            f"< batch_size {config.batch_size}"
        )

    reward = SocialReward.from_pretrained(model_dir)
    apply_preset(reward, config.preset)
    embed_text_rows = _text_embedder(reward, prompts)

    def step_loss(batch: torch.Tensor) -> torch.Tensor:
        rows = train_rows[batch]
        txt = embed_text_rows(rows)  # (B, D)
        both = _as_float(torch.cat([images[pos[rows]], images[neg[rows]]]))  # (2B, 3, H, W)
        img_pos, img_neg = reward.embed_images(both).chunk(2)  # (B, D) each
        w = weights[rows].to(txt.device)
        if config.loss == "triplet":
            return triplet_loss(txt, img_pos, img_neg, margin=config.margin, weight=w)
        scale = reward.model.logit_scale.exp().detach()
        s_pos, s_neg = (txt * img_pos).sum(-1), (txt * img_neg).sum(-1)  # (B,)
        return bradley_terry_loss(s_pos, s_neg, weight=w, scale=float(scale))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if len(val_rows) == 0:
            return {}
        wins = 0.0
        for rows in val_rows.split(128):
            txt = embed_text_rows(rows)
            s_pos = (txt * reward.embed_images(_as_float(images[pos[rows]]))).sum(-1)
            s_neg = (txt * reward.embed_images(_as_float(images[neg[rows]]))).sum(-1)
            wins += float((s_pos > s_neg).sum()) + 0.5 * float((s_pos == s_neg).sum())
        return {"val_pair_accuracy": wins / len(val_rows)}

    signature = {"recipe": "reward", "config": _resumable(config), "pairs": len(prompts)}
    return _run(reward, len(train_rows), step_loss, config, out_dir, signature, evaluate, progress)
