"""Apply a function to every tensor in a nested batch: tuples, lists, dicts (a
``defaultdict`` keeps its default), named tuples and dataclass instances."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """Return ``obj`` with each tensor ``t`` in it replaced by ``fn(t)``; other leaves are kept.

    A dataclass instance is rebuilt with ``dataclasses.replace`` (its ``__post_init__`` runs
    again); its fields that ``__init__`` does not take are left as that sets them."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [map_tensors(fn, item) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [map_tensors(fn, item) for item in obj]
    if isinstance(obj, Mapping):
        mapped = {key: map_tensors(fn, value) for key, value in obj.items()}
        if isinstance(obj, collections.defaultdict):
            return type(obj)(obj.default_factory, mapped)
        return type(obj)(mapped)  # type: ignore[call-arg]
    if _is_dataclass_instance(obj):
        changes = {
            field.name: map_tensors(fn, getattr(obj, field.name))
            for field in dataclasses.fields(obj)
            if field.init
        }
        return dataclasses.replace(obj, **changes)
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
    elif _is_dataclass_instance(obj):
        for field in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, field.name))


def batch_size(batch: Any) -> int:
    """The leading dimension of the first tensor in ``batch`` (0 if it holds none)."""
    for tensor in iter_tensors(batch):
        return int(tensor.shape[0]) if tensor.ndim else 1
    return 0


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)
