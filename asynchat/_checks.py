"""Argument checks shared by the public constructors: one rule each, one wording."""

from __future__ import annotations

import math
import os
from typing import Any

import torch


def positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    """``value`` must be an int (not a bool) >= ``minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(
            f"{name} must be {wanted}{' or None' if allow_none else ''}, got {value!r}"
        )


def positive_number(name: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` must be a finite int or float > 0 (or None when allowed)."""
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{name} must be a positive number{' or None' if allow_none else ''}, got {value!r}"
        )


def real(name: str, value: Any) -> None:
    """``value`` must be an int or float, not a bool (its range is the caller's to check,
    written so that NaN fails it: ``if not value > 0``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")


def function(name: str, value: Any, signature: str) -> None:
    """``value`` must be callable, as ``signature`` (the error's example) says."""
    if not callable(value):
        raise TypeError(f"{name} must be a function {signature}, got {value!r}")


def flag(name: str, value: Any) -> None:
    """``value`` must be True or False (not 1, nor a string, which are always true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def text(name: str, value: Any) -> None:
    """``value`` must be a str (a metric name's prefix)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}")


def metric_name(name: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` must name a metric: a non-empty str (or None when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"{name} must be a metric name (a str){' or None' if allow_none else ''}, got {value!r}"
        )


def path(name: str, value: Any) -> None:
    """``value`` must be a non-empty str or os.PathLike."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a non-empty path (a str or os.PathLike), got {value!r}")


def optimizer_trains(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, name: str = "optimizer"
) -> None:
    """An optimizer that holds none of the model's parameters would train nothing."""
    mine = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if mine and held and not any(id(p) in mine for p in held):
        raise ValueError(
            f"{name} {type(optimizer).__name__} holds none of the model's parameters (was "
            "it built over another model, or a copy?); pass a factory that builds it over the "
            "model it trains: optimizer=lambda model: torch.optim.SGD(model.parameters(), ...)"
        )


def loss_function(name: str, value: Any) -> None:
    """``value`` must be callable, and not a loss *class* (``nn.CrossEntropyLoss`` for
    ``nn.CrossEntropyLoss()``: callable too, it builds a module from the outputs and
    targets, and failed with "Boolean value of Tensor with more than one value is
    ambiguous")."""
    if isinstance(value, type):
        raise TypeError(
            f"{name} is the class {value.__name__}, not a loss function; pass an instance: "
            f"{value.__name__}()"
        )
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")
