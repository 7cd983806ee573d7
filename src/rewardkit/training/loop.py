"""The training loop every recipe shares, its configs' base, checkpoints and data helpers.

Recipes (``training/reward.py``, ``training/rfnet.py``) are plain functions that prepare
data and a ``step_loss(rows) -> loss`` closure and hand them to :func:`run_training`, which
owns the optimiser, accelerate, checkpoints (safetensors for weights) and exact resume.
"""

from __future__ import annotations

import json
import math
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
from torch import nn
from tqdm import tqdm

from rewardkit.io import (
    decode_image,
    json_safe,
    probe_image,
    to_strict_json,
    write_folder_atomic,
    write_json_atomic,
)

__all__ = [
    "TrainConfigBase",
    "TrainResult",
    "as_float",
    "load_checkpoint",
    "load_images",
    "permutation",
    "read_table",
    "resumable",
    "run_training",
    "save_checkpoint",
    "summarize_names",
]

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfigBase:
    lr: float
    batch_size: int
    epochs: int
    max_steps: int | None = None  # stop early (smoke tests, budgets); None: all epochs
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max grad norm; None: off
    seed: int = 0
    checkpoint_every: int = 200  # optimiser steps between checkpoints
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate)

    def __post_init__(self) -> None:
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
class TrainResult:
    """What a recipe did: where the model is, its curve and its validation figures."""

    out_dir: Path
    steps: int
    seconds: float
    resumed_from: int
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


MIXED_SIZE_MAX_SIDE = 512  # mixed sizes without a side meet at most here (>= CLIP inputs)


def load_images(
    paths: Sequence[str], root: Path, progress: bool = False, side: int | None = None
) -> torch.Tensor:
    """Decode images of any size into a uint8 tensor (N, 3, H, W) with the shared reader.

    With ``side``, every image is brought to ``side`` x ``side`` as scoring does (shorter
    edge to ``side``, antialiased bilinear, centre crop: ``images_to_pixel_values``), decoded
    already reduced toward it, so memory follows ``side`` and not the files. Without it,
    images of one size are kept as they are, and mixed sizes meet at the smallest shorter
    edge among them (at most :data:`MIXED_SIZE_MAX_SIDE`).

    Raises:
        FileNotFoundError / ValueError: naming the file that cannot be read.
    """
    from rewardkit.scoring import scorer_input  # imported on use: it loads transformers

    files = [Path(rel) if Path(rel).is_absolute() else root / rel for rel in paths]
    if not files:
        raise ValueError(f"{root}: no images to load")
    if side is None:  # headers only: are the sizes mixed?
        sizes = {(p.width, p.height) for p in map(probe_image, files)}
        if len(sizes) > 1:
            side = min(MIXED_SIZE_MAX_SIDE, min(min(s) for s in sizes))
    bar = tqdm(files, desc="load", disable=not progress, unit="img")
    if side is not None:
        return _as_tensor([scorer_input(decode_image(p, "RGB", side), side) for p in bar])
    decoded = [decode_image(p, "RGB") for p in bar]
    if any(d.array.shape != decoded[0].array.shape for d in decoded):  # EXIF turns
        side = min(MIXED_SIZE_MAX_SIDE, min(min(d.array.shape[:2]) for d in decoded))
        return _as_tensor([scorer_input(d, side) for d in decoded])
    return _as_tensor([d.array for d in decoded])


def _as_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def read_table(path: Path, required: Sequence[str]):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    table = pq.read_table(path)
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    return table


# ---------------------------------------------------------------------------------------
# The shared loop: an epoch-wise seeded permutation of row indices, one closure per step.


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def resumable(config: TrainConfigBase) -> dict:
    """The settings a checkpoint must share with the run that resumes it (budgets aside)."""
    keep = asdict(config)
    for budget in ("max_steps", "checkpoint_every"):
        keep.pop(budget)
    return keep


def save_checkpoint(folder: Path, model: nn.Module, optimizer, state: dict) -> None:
    """Trainable weights (safetensors), optimiser state and counters, written atomically."""
    trainable = {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }
    # Buffers too (BatchNorm statistics, EMA weights): resume must continue them exactly.
    trainable.update(
        {f"buffer:{n}": b.detach().cpu().contiguous() for n, b in _persistent_buffers(model)}
    )

    def write(tmp: Path) -> None:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        # The optimiser state (tensors, numbers, lists) is read back with weights_only=True,
        # torch's restricted unpickler that refuses code; weights are safetensors.
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(to_strict_json(state, indent=2) + "\n")

    write_folder_atomic(folder, write)


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    names = set(model.state_dict().keys())
    return [(n, b) for n, b in model.named_buffers() if n in names]


def load_checkpoint(folder: Path, model: nn.Module, optimizer, signature: dict) -> dict:
    """Restore a :func:`save_checkpoint` folder into ``model`` and ``optimizer``; returns its
    state (step, history).

    Raises:
        ValueError: naming ``folder``, when the checkpoint was made with another signature,
            or its weights are not exactly the model's trainable parameters and persistent
            buffers (names missing or extra, shapes differing): nothing is loaded partially.
    """
    state = json.loads((folder / "state.json").read_text())
    if state.get("signature") != json_safe(signature):  # as the signature reads back from JSON
        raise ValueError(
            f"{folder}: checkpoint was made with other settings or data; remove it or use "
            f"another --out (checkpoint {state.get('signature')}, now {signature})"
        )
    weights = load_file(folder / "trainable.safetensors")
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected.update({f"buffer:{n}": b for n, b in _persistent_buffers(model)})
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{folder}: checkpoint does not hold the model's trainable parameters: "
            f"{summarize_names(missing)} missing, {summarize_names(extra)} extra; "
            "remove it or use another --out"
        )
    shapes = [
        f"{n} {tuple(v.shape)} vs {tuple(expected[n].shape)}"
        for n, v in sorted(weights.items())
        if v.shape != expected[n].shape
    ]
    if shapes:
        shapes_text = summarize_names(shapes)
        raise ValueError(f"{folder}: checkpoint shapes differ from the model's: {shapes_text}")
    with torch.no_grad():
        for name, value in weights.items():
            expected[name].copy_(value)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return state


def summarize_names(names: list[str], first: int = 5) -> str:
    """How many names and the first few, for errors: ``"3 (a, b, c)"``,
    ``"12 (a, b, c, d, e, ...)"`` or ``"0"``."""
    if not names:
        return "0"
    more = ", ..." if len(names) > first else ""
    return f"{len(names)} ({', '.join(names[:first])}{more})"


def run_training(
    model: nn.Module,
    n_rows: int,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    config: TrainConfigBase,
    out_dir: Path,
    signature: dict,
    evaluate: Callable[[], dict[str, float]] | None,
    save_model: Callable[[Path], object],
    progress: bool,
    lr_factor: Callable[[int, int], float] | None = None,
    after_step: Callable[[int], dict | None] | None = None,
) -> TrainResult:
    """The loop every recipe shares: seeded epoch permutations of ``n_rows`` row indices,
    ``step_loss(rows)`` per step, AdamW on the parameters that require grad, checkpoints
    (trainable weights in safetensors, optimiser, counters) every ``checkpoint_every`` steps
    and at each epoch end, exact resume from them, ``evaluate()`` after each epoch, and
    ``save_model(out_dir / "model")`` at the end.

    Args:
        lr_factor: ``(step, total_steps) -> multiplier`` of ``config.lr`` (a schedule);
            None keeps the rate constant.
        after_step: called with the step count after every optimiser step (EMA updates,
            periodic probes); a dict it returns is logged to the history with the step.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=None)
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    model = accelerator.unwrap_model(prepared)

    steps_per_epoch = max(1, n_rows // config.batch_size)  # drop the ragged last batch
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    ckpt = out_dir / CHECKPOINT_DIR
    step, history = 0, []
    if (ckpt / "state.json").is_file():
        state = load_checkpoint(ckpt, model, optimizer, signature)
        step, history = int(state["step"]), list(state["history"])
    resumed_from = step
    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train", disable=not progress, unit="step")
    running: list[float] = []
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        order = permutation(n_rows, config.seed, epoch)
        rows = order[within * config.batch_size : (within + 1) * config.batch_size]
        if lr_factor is not None:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, total)
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
        if after_step is not None:
            logged = after_step(step)
            if logged:
                entry = {"step": step, **logged}
                history.append(entry)
                if progress:
                    bar.write(json.dumps(entry), file=sys.stderr)
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
            save_checkpoint(ckpt, model, optimizer, state)
    bar.close()
    model.eval()
    metrics = evaluate() if evaluate is not None else {}
    save_model(out_dir / "model")
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
