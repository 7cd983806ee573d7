"""Reading ahead in worker processes: one DataLoader shape for every command that decodes.

:func:`read_ahead` runs ``load(item)`` for each item of a list in ``workers`` DataLoader
processes (0: in this process, when the consumer asks) and yields the results in order, at
most ``2 x workers`` ahead, in pinned memory when the consumer runs on CUDA. Scoring,
inspection and the training image store use it; the training loop has its own schedule
(``training/loop.py``) on the same DataLoader.

``load`` should return errors as values rather than raise: a worker's exception reaches the
consumer wrapped in its traceback, not as the one line a bad file deserves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from torch.utils.data import DataLoader, Dataset

__all__ = ["read_ahead"]

T = TypeVar("T")


class _Calls(Dataset):
    def __init__(self, load: Callable[[Any], T], items: Sequence[Any]) -> None:
        self.load, self.items = load, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> T:
        return self.load(self.items[k])


def _as_is(item):
    return item


def read_ahead(
    load: Callable[[Any], T], items: Sequence[Any], workers: int, pin: bool = False
) -> Iterator[T]:
    """``load(item)`` for every item, in order, computed ahead by ``workers`` processes."""
    if workers == 0:
        for item in items:
            yield load(item)
        return
    loader = DataLoader(
        _Calls(load, items), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=pin, prefetch_factor=2, collate_fn=_as_is,
    )  # fmt: skip
    yield from loader
