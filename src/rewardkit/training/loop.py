"""The training loop every recipe shares, its configs' base, checkpoints and data helpers.

Recipes (``training/reward.py``, ``training/rfnet.py``, ...) are plain functions that prepare
data and a ``step_loss(rows) -> loss`` closure and hand them to :func:`run_training`, which
owns the optimiser, accelerate, checkpoints (safetensors for weights) and exact resume.

Several processes (``accelerate launch --num_processes N``, ``torchrun``): the step function
runs as the forward of a DDP-wrapped module, each process takes an equal, disjoint share of
every step's rows (``batch_size`` is the global batch; ``grad_accum`` splits it further into
micro-steps), BatchNorm statistics are those of the whole batch (:class:`GlobalBatchNorm`),
random draws inside a step are keyed by (seed, step, row) (:func:`keyed_generator`) so they do
not depend on the split, and only the main process writes. Dropout is switched off during
training unless a config asks for it (``dropout: true``): its masks would come from each
process's RNG and so depend on the split. Each process's RNG state is checkpointed, so resume
at the same number of processes is exact.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
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
    recover_dir,
    to_strict_json,
    write_folder_atomic,
    write_json_atomic,
)
from rewardkit.training.distributed import (
    GlobalBatchNorm,
    disable_dropout,
    gather_objects,
    gather_rows,
    globalize_batchnorm,
    is_main_process,
    keyed_generator,
    keyed_seed,
    mean_over_processes,
    on_main,
    own_rng,
    restore_dropout,
    restore_rng,
    rng_state,
    shared_accelerator,
    write_rng,
)

__all__ = [
    "GlobalBatchNorm",
    "MicroBatch",
    "TrainConfigBase",
    "TrainResult",
    "as_float",
    "gather_rows",
    "is_main_process",
    "keyed_generator",
    "keyed_seed",
    "load_checkpoint",
    "load_images",
    "mean_over_processes",
    "on_main",
    "permutation",
    "read_table",
    "resumable",
    "run_training",
    "save_checkpoint",
    "shared_accelerator",
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
    grad_accum: int = 1  # micro-steps per optimiser step (batch_size stays the global batch)
    device: str | None = None  # None: accelerate's choice (cuda when present); "cpu", "cuda:1"
    # Loader processes that read the next micro-batches ahead (recipes with a fetch); 0: the
    # step reads its own rows. Not part of a checkpoint's signature: any count resumes.
    loader_workers: int = 0
    # Dropout in the trained model. Off by default: its masks come from each process's RNG,
    # so with it N processes train other weights than one (equal only in distribution).
    dropout: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr: must be positive; got {self.lr}")
        for name in ("batch_size", "epochs", "checkpoint_every", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1; got {getattr(self, name)}")
        if int(self.loader_workers) < 0:
            raise ValueError(f"loader_workers: must be >= 0; got {self.loader_workers}")
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
    """A Parquet file, or a Parquet folder partitioned Hive-style (``curate --engine spark``
    writes ``split=train/...``), as one table; partition columns come back as strings."""
    if path.is_dir():
        from rewardkit.data.curation import read_pairs

        table = read_pairs(path)
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    else:
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
    keep.pop("device", None)  # a run may resume on another device
    keep.pop("loader_workers", None)  # or with another number of loader processes
    for name, default in (("grad_accum", 1), ("dropout", False), ("kl_beta", 0.0)):
        if keep.get(name) == default:  # defaults: checkpoints from before the field resume
            keep.pop(name)
    return keep


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer, state: dict, rng: list[dict] | None = None
) -> None:
    """Trainable weights (safetensors), optimiser state and counters, and with ``rng`` each
    process's RNG states (``rng_rank<i>.safetensors``), written atomically."""
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
        if rng is not None:
            write_rng(tmp, rng)

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


# ---------------------------------------------------------------------------------------
# Processes: micro-batches and the step module (collectives and RNG: distributed.py).


@dataclass(frozen=True)
class MicroBatch:
    """One process's share of one optimiser step: its rows and where they sit in the step.

    A plain dataclass (not a tensor, tuple or dict), so DDP hands it to the step function
    without moving ``rows`` to the GPU (the recipes index CPU tensors with them)."""

    rows: torch.Tensor  # (b,) row indices in [0, n_rows)
    step: int  # the optimiser step being taken, 0-based
    index: int  # this part among the step's: micro_step * world_size + rank
    count: int  # parts per step: grad_accum * world_size
    data: Any = None  # run_training's fetch(micro), read ahead by the loader; else None

    def pin_memory(self) -> MicroBatch:
        """The DataLoader's pinning hook (CUDA): the fetched tensors in page-locked memory."""
        return replace(self, data=_pinned(self.data))


def _pinned(data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return data.pin_memory()
    if isinstance(data, dict):
        return {k: _pinned(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_pinned(v) for v in data)
    return data


class _StepModule(nn.Module):
    """The trained model and the recipe's step function as one module whose forward is the
    step's loss: DDP wraps this, so the forward runs under DDP and its hooks see the
    gradients of the model's parameters (the step function uses them)."""

    def __init__(self, model: nn.Module, step_loss: Callable, takes_micro: bool) -> None:
        super().__init__()
        self.model = model
        self.step_loss = step_loss
        self.takes_micro = takes_micro

    def forward(self, micro: MicroBatch) -> torch.Tensor:
        if self.takes_micro:
            return self.step_loss(micro.rows, micro)
        return self.step_loss(micro.rows)


class _Schedule(torch.utils.data.Dataset):
    """The micro-batches this process takes from step ``start`` to ``total``, in order: item
    ``k`` is micro-step ``k % grad_accum`` of step ``start + k // grad_accum``, with
    ``fetch(micro)`` as its data. A DataLoader over it reads ahead in worker processes (the
    shares are the loop's own: seeded epoch permutations, split by micro-step and rank)."""

    def __init__(
        self, fetch: Callable, n_rows: int, config: TrainConfigBase, steps_per_epoch: int,
        start: int, total: int, world: int, rank: int,
    ) -> None:  # fmt: skip
        self.fetch, self.n_rows, self.config = fetch, n_rows, config
        self.steps_per_epoch, self.start, self.total = steps_per_epoch, start, total
        self.world, self.rank = world, rank
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return (self.total - self.start) * self.config.grad_accum

    def shares(self, step: int) -> torch.Tensor:
        """Step ``step``'s rows as (micro-steps, processes, rows each)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, permutation(self.n_rows, self.config.seed, epoch))
        size = self.config.batch_size
        rows = self._order[1][within * size : (within + 1) * size]
        return rows.view(self.config.grad_accum, self.world, -1)

    def micro(self, step: int, m: int) -> MicroBatch:
        accum = self.config.grad_accum
        part = self.shares(step)[m, self.rank]
        return MicroBatch(part, step, m * self.world + self.rank, accum * self.world)

    def __getitem__(self, k: int) -> MicroBatch:
        step, m = divmod(k, self.config.grad_accum)
        micro = self.micro(self.start + step, m)
        return replace(micro, data=self.fetch(micro))


def _micro_batches(
    schedule: _Schedule, fetch: Callable | None, workers: int, pin: bool
) -> Iterator[MicroBatch]:
    """The schedule's micro-batches in order: without a fetch, bare rows; with one, read
    ahead by ``workers`` loader processes (0: read in this process, when the step needs it),
    in pinned memory for a CUDA device."""
    if fetch is None:
        for step in range(schedule.start, schedule.total):
            for m in range(schedule.config.grad_accum):
                yield schedule.micro(step, m)
        return
    if workers == 0:
        yield from (schedule[k] for k in range(len(schedule)))
        return
    loader = torch.utils.data.DataLoader(
        schedule, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
        prefetch_factor=2, collate_fn=lambda item: item,
    )  # fmt: skip
    yield from loader


def _takes_micro(step_loss: Callable) -> bool:
    params = inspect.signature(step_loss).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def run_training(
    model: nn.Module,
    n_rows: int,
    step_loss: Callable[..., torch.Tensor],
    config: TrainConfigBase,
    out_dir: Path,
    signature: dict,
    evaluate: Callable[[], dict[str, float]] | None,
    save_model: Callable[[Path], object],
    progress: bool,
    lr_factor: Callable[[int, int], float] | None = None,
    after_step: Callable[[int], dict | None] | None = None,
    row_weight: torch.Tensor | None = None,
    fetch: Callable[[MicroBatch], Any] | None = None,
) -> TrainResult:
    """The loop every recipe shares, in one process or several (``accelerate launch``,
    ``torchrun``): seeded epoch permutations of ``n_rows`` row indices, ``config.batch_size``
    rows per optimiser step (the global batch), split into ``config.grad_accum`` micro-steps
    and across the processes (equal, disjoint shares of the same permutation); AdamW on the
    parameters that require grad, the forward under DDP; checkpoints (trainable weights in
    safetensors, optimiser, counters, each process's RNG state) every ``checkpoint_every``
    steps and at each epoch end, exact resume from them, ``evaluate()`` after each epoch, and
    ``save_model(out_dir / "model")`` at the end. Only the main process writes; validation
    runs there and its figures are shared.

    Args:
        step_loss: ``step_loss(rows)`` or ``step_loss(rows, micro)`` (a :class:`MicroBatch`:
            the step, for draws keyed by step and row with :func:`keyed_generator`): the loss
            of a micro-batch, the mean over its rows, so that the average over micro-steps
            and processes is the global batch's mean. A loss over the whole batch gathers
            with :func:`gather_rows` and returns the same value in every process.
        lr_factor: ``(step, total_steps) -> multiplier`` of ``config.lr`` (a schedule);
            None keeps the rate constant.
        after_step: called in every process with the step count after every optimiser step
            (EMA updates, periodic probes); a dict it returns is logged to the history.
        row_weight: Weights (n_rows,) of a loss that is a weighted mean over its rows
            (``sum(w * l) / sum(w)``): each part's loss is scaled by its share of the step's
            weight, so that the parts average to the global batch's weighted mean.
        fetch: ``fetch(micro) -> data``: reads a micro-batch's rows (CPU tensors; from disk,
            decoded, augmented with draws keyed by step and row). The loop calls it ahead
            of the step in ``config.loader_workers`` DataLoader processes (pinned memory on
            CUDA) and hands the result to ``step_loss`` as ``micro.data``.

    Raises:
        ValueError: when ``batch_size`` is not divisible by processes x ``grad_accum``.
    """
    accelerator = shared_accelerator(config.mixed_precision, getattr(config, "device", None))
    world, rank = accelerator.num_processes, accelerator.process_index
    parts = world * config.grad_accum
    if config.batch_size % parts:
        raise ValueError(
            f"--batch-size {config.batch_size} (the global batch) is not divisible by "
            f"{world} process(es) x --grad-accum {config.grad_accum}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    main = accelerator.is_main_process
    seed = config.seed if rank == 0 else keyed_seed(config.seed, rank)
    swapped = globalize_batchnorm(model) if world > 1 else []
    dropped = [] if config.dropout else disable_dropout(model)
    try:
        with own_rng(seed):
            return _train(
                accelerator, model, n_rows, step_loss, config, out_dir, signature, evaluate,
                save_model, progress and main, lr_factor, after_step, row_weight, params, fetch,
            )  # fmt: skip
    finally:
        for module, cls in swapped:
            module.__class__ = cls
        restore_dropout(dropped)  # the model keeps its own rates (saved configs unchanged)
        accelerator.free_memory()


def _train(
    accelerator, model, n_rows, step_loss, config, out_dir, signature, evaluate, save_model,
    progress, lr_factor, after_step, row_weight, params, fetch,
) -> TrainResult:  # fmt: skip
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    accum = config.grad_accum
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    stepper = _StepModule(model, step_loss, _takes_micro(step_loss))
    prepared, optimizer = accelerator.prepare(stepper, optimizer)

    steps_per_epoch = max(1, n_rows // config.batch_size)  # drop the ragged last batch
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    ckpt = out_dir / CHECKPOINT_DIR
    step, history, running = 0, [], []  # running: this epoch's step losses so far
    if main and ckpt.parent.is_dir():  # a run killed while replacing its checkpoint
        recover_dir(ckpt)
    accelerator.wait_for_everyone()
    if (ckpt / "state.json").is_file():
        state = load_checkpoint(ckpt, model, optimizer, signature)
        step, running = int(state["step"]), [float(x) for x in state.get("running", [])]
        history = [h for h in state["history"] if not h.get("partial_epoch")]
        restore_rng(ckpt, rank)
    resumed_from = step
    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train", disable=not progress, unit="step")
    evaluated_at: tuple[int, dict] | None = None
    schedule = _Schedule(fetch, n_rows, config, steps_per_epoch, step, total, world, rank)
    pin = accelerator.device.type == "cuda"
    micro_batches = _micro_batches(schedule, fetch, config.loader_workers, pin)
    while step < total:
        rows = schedule.shares(step).reshape(-1)  # the global batch
        if lr_factor is not None:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, total)
        prepared.train()
        optimizer.zero_grad(set_to_none=True)
        step_loss_value = 0.0
        for m in range(accum):
            micro = next(micro_batches)
            weight = _part_weight(row_weight, micro.rows, rows, accum * world)
            sync = m == accum - 1  # DDP all-reduces the accumulated gradients once
            with nullcontext() if sync else accelerator.no_sync(prepared):
                loss = prepared(micro)
                if weight != 1.0:
                    loss = loss * weight
                accelerator.backward(loss / accum if accum > 1 else loss)
            step_loss_value += float(loss.detach()) / accum
        if config.grad_clip is not None:
            accelerator.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        step += 1
        running.append(mean_over_processes({"loss": step_loss_value})["loss"])
        if after_step is not None:
            logged = after_step(step)
            if logged:
                entry = {"step": step, **logged}
                history.append(entry)
                if progress:
                    bar.write(json.dumps(entry), file=sys.stderr)
        bar.update()
        bar.set_postfix(loss=f"{np.mean(running[-50:]):.4f}")
        # A budget (--max-steps) that stops inside an epoch logs that part as a partial
        # epoch: a later run with a larger budget resumes the epoch and replaces the entry.
        partial = step == total and step % steps_per_epoch != 0
        end_of_epoch = step % steps_per_epoch == 0 or partial
        if end_of_epoch:
            entry: dict[str, Any] = {"step": step, "epoch": math.ceil(step / steps_per_epoch)}
            entry["loss"] = float(np.mean(running)) if running else float("nan")
            if partial:
                entry["partial_epoch"] = True
            else:
                running = []
            if evaluate is not None:
                model.eval()
                figures = on_main(evaluate)
                entry.update(figures)
                evaluated_at = (step, figures)
            history.append(entry)
            if progress:  # epoch lines on stderr: stdout carries the CLI's JSON summary
                bar.write(json.dumps(entry), file=sys.stderr)
        if step % config.checkpoint_every == 0 or end_of_epoch:
            state = {"step": step, "history": history, "signature": signature,
                     "running": running}  # fmt: skip
            rng = gather_objects(rng_state(), world)
            if main:
                save_checkpoint(ckpt, model, optimizer, state, rng=rng)
            accelerator.wait_for_everyone()
    bar.close()
    micro_batches.close()  # stops the loader's processes
    model.eval()
    if evaluated_at is not None and evaluated_at[0] == step:
        metrics = evaluated_at[1]  # the last epoch's validation: not run twice
    else:
        metrics = on_main(evaluate) if evaluate is not None else {}
    if main:
        save_model(out_dir / "model")
    result = TrainResult(
        out_dir=out_dir,
        steps=step,
        seconds=time.perf_counter() - start,
        resumed_from=resumed_from,
        history=history,
        metrics=metrics,
    )
    if main:
        summary = {**asdict(result), "out_dir": str(out_dir), "config": asdict(config)}
        summary["processes"] = world
        write_json_atomic(out_dir / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    return result


def _part_weight(
    row_weight: torch.Tensor | None, part: torch.Tensor, rows: torch.Tensor, count: int
) -> float:
    """The factor that makes a part's weighted mean count by its share of the step's
    weight (1 for plain means, and in a single process with one micro-step)."""
    if row_weight is None or count == 1:
        return 1.0
    total = float(row_weight[rows].sum())
    return float(row_weight[part].sum()) * count / total if total > 0 else 0.0
