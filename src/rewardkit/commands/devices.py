"""One device and precision model for every command (``--device``, ``--mixed-precision``).

- ``--device``: where every module and every tensor of a step lives (default: ``cuda`` when
  this machine has it, else ``cpu``). Inference commands load their models there; training
  commands hand it to the loop (``accelerate``), which places the trained module, and each
  step moves the frozen parts it uses beside it.
- ``--mixed-precision no|fp16|bf16``: training runs under ``accelerate``'s autocast with
  fp32 weights; inference casts the generator's weights to the dtype (memory, speed) and
  runs the other models (inspector, scorers) under autocast, whose fp32 islands (FFT
  saliency, normalisation) keep working.

Schedule arithmetic (alpha-bar, x0_hat, DDIM eq. 1, product blend eq. 2, the CC scaling) is
fp32 whatever the precision: see ``generation/pipeline.py``.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch

__all__ = ["PRECISIONS", "autocast", "default_device", "for_training", "precision_dtype"]

PRECISIONS = ("no", "fp16", "bf16")
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    """``cuda`` when this machine has a CUDA device, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_dtype(mixed_precision: str | None) -> torch.dtype:
    """The compute dtype of a ``--mixed-precision`` value (``no``/None: float32)."""
    try:
        return _DTYPES[mixed_precision or "no"]
    except KeyError:
        raise ValueError(f"mixed precision: one of {PRECISIONS}; got {mixed_precision!r}") from None


def autocast(device: str | torch.device, mixed_precision: str | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device``'s type at the precision's dtype; nothing for ``no``."""
    dtype = precision_dtype(mixed_precision)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


Config = TypeVar("Config")


def for_training(config: Config, device: str | None, mixed_precision: str | None) -> Config:
    """A training config with ``--mixed-precision`` (when given) and ``--device`` set.

    ``mixed_precision`` is a field of every training config (``TrainConfigBase``); the loop
    hands it to ``accelerate``. ``device`` is set on configs that have a ``device`` field,
    which the training loop reads (``Accelerator(cpu=config.device == "cpu")``, frozen
    modules and batches on ``accelerator.device``); a config without one leaves the choice to
    ``accelerate`` (CUDA when present), which the default ``--device`` agrees with.
    """
    names = {f.name for f in dataclasses.fields(config)}
    changes = {}
    if mixed_precision is not None:
        precision_dtype(mixed_precision)  # validates
        changes["mixed_precision"] = mixed_precision
    if device is not None and "device" in names:
        changes["device"] = str(device)
    return dataclasses.replace(config, **changes) if changes else config
