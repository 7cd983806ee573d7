"""Recipes for dual encoders: contrastive pre-training and reward tuning on preference pairs.

Both are plain functions over a model folder and a Parquet file, run by the shared loop
(``training/loop.py``: accelerate, one process or several, ``batch_size`` global) and
checkpointed in safetensors so a killed run resumes where it stopped:

- :func:`pretrain_contrastive`: CLIP's symmetric InfoNCE on (image, caption) rows of a
  manifest; the embedded default's stand-in for "pretrained CLIP".
- :func:`train_reward`: Social Reward tuning on ``pairs.parquet`` (prompt, pos_path,
  neg_path, weight, split): triplet loss with the prompt as anchor (the paper's) or
  Bradley-Terry on the cosine scores; the preset names which layers learn.

Images are decoded once, at the model's input side, by worker processes into a uint8 row file
in ``<out>/data_cache`` (keyed by the files' bytes: a resumed run reuses it;
``training/image_store.py``); each step's rows are read from it ahead of the step by the
loop's loader (``loader_workers`` processes), so memory follows the batch, not the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rewardkit.data.keys import TrainingKeys, write_training_keys
from rewardkit.losses import bradley_terry_loss, contrastive_clip_loss, triplet_loss
from rewardkit.models.social_reward import PRESETS, SocialReward, apply_preset
from rewardkit.training.image_store import image_rows
from rewardkit.training.loop import (
    MicroBatch,
    TrainConfigBase,
    TrainResult,
    as_float,
    gather_rows,
    read_table,
    resumable,
    run_training,
)

__all__ = ["PretrainConfig", "RewardTrainConfig", "pretrain_contrastive", "train_reward"]

LOSSES = ("triplet", "bradley-terry")
DATA_CACHE = "data_cache"  # decoded images, inside the run folder


@dataclass
class _DualEncoderConfig(TrainConfigBase):
    preset: str = "paper"
    text_base: str | None = None  # save packed (see SocialReward.save_pretrained)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {PRESETS}; got {self.preset!r}")


@dataclass
class RewardTrainConfig(_DualEncoderConfig):
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
class PretrainConfig(_DualEncoderConfig):
    """Contrastive pre-training on image-caption pairs (CLIP's objective). The in-batch
    negatives are the rows of a micro-step across every process: ``batch_size`` of them with
    ``grad_accum`` 1, ``batch_size / grad_accum`` otherwise (accumulation then trades
    negatives for memory)."""

    preset: str = "vision"  # a new vision tower against the pre-trained text tower
    lr: float = 5e-4  # a randomly initialised small tower learns fast
    batch_size: int = 128  # InfoNCE wants many in-batch negatives
    epochs: int = 8
    weight_decay: float = 0.05
    text_column: str = "prompt"  # the scene description; "caption" describes the product


# ---------------------------------------------------------------------------------------
# Data.


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


def _images(paths: list[str], root: Path, side: int, out_dir: Path, progress: bool):
    """The images at ``side``, decoded once into ``out_dir/data_cache`` (reused on resume)."""
    from rewardkit.training.distributed import is_main_process

    workers = 0 if len(paths) <= 256 else min(4, os.cpu_count() or 1)
    return image_rows(
        paths, root, side, out_dir / DATA_CACHE, workers, progress and is_main_process()
    )


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
    table = read_table(manifest, ["path", config.text_column])
    texts = [str(t) for t in table.column(config.text_column).to_pylist()]
    n_val = min(512, len(texts) // 10)
    n_train = len(texts) - n_val
    if n_train < config.batch_size:
        raise ValueError(f"{manifest}: {n_train} training rows < batch_size {config.batch_size}")

    reward = SocialReward.from_pretrained(model_dir)
    # Decoded at the model's input size, as scoring does, onto disk (module docstring).
    paths = table.column("path").to_pylist()
    images = _images(paths, manifest.parent, reward.image_size, out_dir, progress)
    apply_preset(reward, config.preset)
    embed_text_rows = _text_embedder(reward, texts)

    def fetch(micro: MicroBatch) -> torch.Tensor:
        return images[micro.rows]  # (b, 3, S, S) uint8

    def step_loss(rows: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
        # InfoNCE needs the whole batch: every process gathers every process's embeddings
        # (gradients flow back to their owners) and computes the same loss.
        pixels = micro.data.to(reward.device, non_blocking=True)
        img = gather_rows(reward.embed_images(as_float(pixels)))  # (B, D)
        txt = gather_rows(embed_text_rows(rows))  # (B, D)
        scale = reward.model.logit_scale.exp().clamp(max=100.0)
        return contrastive_clip_loss(img, txt, scale)

    val_rows = torch.arange(n_train, n_train + n_val)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if n_val < 2:
            return {}
        img = torch.cat([reward.embed_images(as_float(images[r])) for r in val_rows.split(128)])
        txt = torch.cat([embed_text_rows(r) for r in val_rows.split(128)])
        sims = img @ txt.T  # (V, V)
        # Duplicate texts count as hits: retrieve a row whose text equals the true one.
        val_texts = [texts[i] for i in val_rows.tolist()]
        best = sims.argmax(dim=1).tolist()
        hit = sum(val_texts[b] == val_texts[i] for i, b in enumerate(best)) / n_val
        return {"val_image_to_text_top1": hit}

    seen = TrainingKeys.starting_from(model_dir)
    seen.add_prompts(texts[:n_train], "train")
    seen.add_prompts(texts[n_train:], "val")
    if "product_key" in table.column_names:
        keys = table.column("product_key").to_pylist()
        seen.add("product", keys[:n_train], "train")
        seen.add("product", keys[n_train:], "val")

    def save(path: Path) -> None:
        reward.save_pretrained(path, text_base=config.text_base)
        write_training_keys(path, seen)

    signature = {"recipe": "pretrain", "config": resumable(config), "rows": len(texts)}
    return run_training(
        reward, n_train, step_loss, config, out_dir, signature, evaluate, save, progress,
        fetch=fetch,
    )  # fmt: skip


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
    table = read_table(pairs, ["prompt", "pos_path", "neg_path"])
    split = table.column("split").to_pylist() if "split" in table.column_names else None
    prompts = [str(p) for p in table.column("prompt").to_pylist()]
    pos_paths = table.column("pos_path").to_pylist()
    neg_paths = table.column("neg_path").to_pylist()
    unique = sorted(set(pos_paths) | set(neg_paths))
    index = {p: i for i, p in enumerate(unique)}
    pos = torch.tensor([index[p] for p in pos_paths])
    neg = torch.tensor([index[p] for p in neg_paths])
    weights = torch.ones(len(prompts))
    weighted = config.use_weights and "weight" in table.column_names
    if weighted:
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
    images = _images(unique, pairs.parent, reward.image_size, out_dir, progress)  # (U, 3, S, S)
    apply_preset(reward, config.preset)
    embed_text_rows = _text_embedder(reward, prompts)

    def fetch(micro: MicroBatch) -> torch.Tensor:
        rows = train_rows[micro.rows]
        return images[torch.cat([pos[rows], neg[rows]])]  # (2b, 3, S, S) uint8

    def step_loss(batch: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
        rows = train_rows[batch]
        txt = embed_text_rows(rows)  # (B, D)
        both = as_float(micro.data.to(reward.device, non_blocking=True))  # (2B, 3, H, W)
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
            s_pos = (txt * reward.embed_images(as_float(images[pos[rows]]))).sum(-1)
            s_neg = (txt * reward.embed_images(as_float(images[neg[rows]]))).sum(-1)
            wins += float((s_pos > s_neg).sum()) + 0.5 * float((s_pos == s_neg).sum())
        return {"val_pair_accuracy": wins / len(val_rows)}

    # What this model has seen: the training and validation prompts (pairs are split by
    # prompt), and whatever the starting model had seen.
    seen = TrainingKeys.starting_from(model_dir)
    seen.add_prompts([prompts[i] for i in train_rows.tolist()], "train")
    seen.add_prompts([prompts[i] for i in val_rows.tolist()], "val")

    def save(path: Path) -> None:
        reward.save_pretrained(path, text_base=config.text_base)
        write_training_keys(path, seen)

    signature = {"recipe": "reward", "config": resumable(config), "pairs": len(prompts)}
    # Weighted means over a micro-batch count by their share of the batch's weight.
    row_weight = weights[train_rows] if weighted else None
    return run_training(
        reward, len(train_rows), step_loss, config, out_dir, signature, evaluate, save, progress,
        row_weight=row_weight, fetch=fetch,
    )  # fmt: skip
