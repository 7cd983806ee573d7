"""Training on several processes: one Accelerator per process, collectives, keyed draws,
whole-batch BatchNorm, and per-process RNG state (used by ``loop.run_training``).

Under ``accelerate launch`` or ``torchrun`` every process runs the same recipe; these helpers
make the processes agree: :func:`gather_rows` (embeddings of the whole batch, with gradients),
:func:`on_main` (computed once, broadcast), :func:`mean_over_processes` (logged values),
:func:`keyed_generator` (draws that depend on (seed, step, row), not on the split),
:class:`GlobalBatchNorm` (statistics of the whole batch, on any device), and the RNG state
that checkpoints carry so resume is exact. In a single process each is the identity.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rewardkit.io import to_strict_json

__all__ = [
    "GlobalBatchNorm",
    "gather_rows",
    "is_main_process",
    "keyed_generator",
    "keyed_seed",
    "mean_over_processes",
    "on_main",
    "shared_accelerator",
]


_ACCELERATOR: Any = None


def shared_accelerator(mixed_precision: str = "no", device: str | None = None):
    """The process's one ``Accelerator``, made on first use. accelerate's state is a
    per-process singleton (a second Accelerator with another precision raises), so a run with
    another precision resets the Accelerator's part of it and keeps the process group.

    Under a multi-process launch on a machine without a GPU (``torchrun``, ``accelerate
    launch --multi_gpu``) the processes train on the CPU over gloo: accelerate would otherwise
    see no GPU and run each process alone. ``device`` ``"cpu"`` keeps a GPU machine's
    processes on the CPU (a config's ``device`` field, where it has one)."""
    global _ACCELERATOR
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = (
        device == "cpu"
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or (launched and not torch.cuda.is_available())
    )
    if not cpu and device is not None and device.startswith("cuda:") and not launched:
        torch.cuda.set_device(int(device.split(":", 1)[1]))  # one process on a chosen GPU
    acc = _ACCELERATOR
    if acc is not None and acc.mixed_precision == mixed_precision and acc.state._cpu == cpu:
        return acc
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    # Unused trainable parameters (logit_scale under the triplet loss, adapters a branch
    # skips) are allowed; buffers are not broadcast: BatchNorm statistics are global (see
    # GlobalBatchNorm) and EMA buffers follow the synchronised weights on every process.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    _ACCELERATOR = Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[ddp])
    return _ACCELERATOR


def is_main_process() -> bool:
    """True in the process that writes (rank 0), and when not launched on several. Before
    the process group exists (data prepared before training joins it), the launcher's
    ``RANK`` decides, so that only rank 0 builds what every rank then reads."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (b, ...) of every process concatenated in rank order (W*b, ...), with gradients
    flowing back to each process's own rows; ``x`` itself in a single process. For losses
    over the whole batch (InfoNCE's in-batch negatives)."""
    world, _ = _world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` in the main process only, its result broadcast to every process (probes,
    validation: computed once, logged the same everywhere)."""
    world, rank = _world()
    if world == 1:
        return fn()
    import torch.distributed as dist

    box = [fn() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (every process passes the same keys)."""
    world, _ = _world()
    if world == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


def keyed_seed(*key: int) -> int:
    """A 63-bit seed from integers (run seed, step, row, ...): the same in every process,
    whatever the split of rows across them."""
    words = [int(k) % (1 << 64) for k in key]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`keyed_seed` of ``key``."""
    return torch.Generator().manual_seed(keyed_seed(*key))


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the batch of all processes (what one
    process would compute on the whole batch), on any device: torch's SyncBatchNorm refuses
    the CPU. Same parameters and buffers as the BatchNorm it replaces (:func:`globalize_batchnorm`).
    The statistics travel through autograd-aware all-reduces, so gradients are exact too."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world, _ = _world()
        if not (self.training and world > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = all_reduce(torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device))
        mean = all_reduce(x.sum(dims)) / n  # (C,)
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n  # (C,), biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                if m is None:  # cumulative average, as nn.BatchNorm
                    m = 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), m)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def globalize_batchnorm(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """Turn every BatchNorm of ``model`` into a :class:`GlobalBatchNorm` in place (names,
    parameters and buffers kept); returns what to turn back."""
    swapped = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, (GlobalBatchNorm, nn.SyncBatchNorm)):
            swapped.append((m, type(m)))
            m.__class__ = GlobalBatchNorm
    return swapped


# RNG state per process, in the checkpoint folder (safetensors with a JSON header).
RNG_META = "rewardkit_rng"


def rng_state() -> dict:
    """This process's torch (CPU and CUDA), numpy and Python RNG states as tensors + JSON."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
        "python": torch.tensor(internal, dtype=torch.int64),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "gauss_next": gauss_next},
    }  # fmt: skip
    return {"tensors": tensors, "meta": meta}


def set_rng_state(state: dict) -> None:
    """Undo :func:`rng_state`: every RNG it holds back to that state."""
    tensors, meta = state["tensors"], state["meta"]
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    n, p = meta["numpy"], meta["python"]
    key = tensors["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], key, n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(tensors["python"].tolist()), p["gauss_next"]))


def write_rng(folder: Path, states: list[dict]) -> None:
    for rank, s in enumerate(states):
        meta = {RNG_META: to_strict_json(s["meta"])}
        save_file(s["tensors"], str(folder / f"rng_rank{rank}.safetensors"), metadata=meta)


def restore_rng(folder: Path, rank: int) -> bool:
    """Restore this process's RNG states from ``folder``; False when it holds none for it
    (a checkpoint of a run on fewer processes: the draws the recipes make are keyed by step
    and row, so only global-RNG users such as dropout then differ)."""
    from safetensors import safe_open

    path = folder / f"rng_rank{rank}.safetensors"
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[RNG_META])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    set_rng_state({"tensors": tensors, "meta": meta})
    return True


@contextmanager
def own_rng(seed: int):
    """Within: the global torch (CPU, CUDA), numpy and Python RNGs seeded with ``seed``;
    afterwards the caller's states are back (a library function does not reseed them)."""
    saved = rng_state()
    try:
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        np.random.seed(seed % (1 << 32))
        random.seed(seed)
        yield
    finally:
        set_rng_state(saved)


def gather_objects(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


_DROPOUT_ATTRS = ("dropout", "attention_dropout", "dropout_p", "dropout_prob", "attn_dropout")


def disable_dropout(model: nn.Module) -> list[tuple[object, str, float]]:
    """Switch every dropout in ``model`` off: ``nn.Dropout`` modules (p = 0) and the float
    rates attention layers keep as attributes (``nn.MultiheadAttention.dropout``, CLIP's
    ``attention_dropout`` ...). Returns what was changed, for :func:`restore_dropout`.

    Why the training loop does this by default: dropout masks come from each process's RNG,
    so N processes would train other weights than one (random draws inside a step must not
    depend on how rows are split; noise and timesteps are keyed by row instead)."""
    changed: list[tuple[object, str, float]] = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if module.p:
                changed.append((module, "p", module.p))
                module.p = 0.0
            continue
        for name in _DROPOUT_ATTRS:
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0 and not isinstance(value, bool):
                changed.append((module, name, value))
                setattr(module, name, 0.0)
    return changed


def restore_dropout(changed: list[tuple[object, str, float]]) -> None:
    for module, name, value in changed:
        setattr(module, name, value)
