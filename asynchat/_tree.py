"""Apply a function to every tensor in a nested batch (tuples, lists, dicts, named tuples)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """Return ``obj`` with each tensor ``t`` in it replaced by ``fn(t)``; other leaves are kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [map_tensors(fn, item) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [map_tensors(fn, item) for item in obj]
    if isinstance(obj, Mapping):
        return type(obj)({key: map_tensors(fn, value) for key, value in obj.items()})  # type: ignore[call-arg]
    return obj


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``, depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from iter_tensors(item)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value)


def batch_size(batch: Any) -> int:
    """The leading dimension of the first tensor in ``batch`` (0 if it holds none)."""
    for tensor in iter_tensors(batch):
        return int(tensor.shape[0]) if tensor.ndim else 1
    return 0
