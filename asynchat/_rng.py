"""Capturing and restoring every random number generator a training run draws from."""

from __future__ import annotations

import random
import sys
from typing import Any

import torch


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's (if imported), torch's and CUDA's global generators.

    Only types that ``torch.load(weights_only=True)`` accepts are used, so a checkpoint that
    holds them loads without unpickling arbitrary objects.
    """
    states: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        states["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` captured."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy

        np_state = states["numpy"]
        numpy.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].numpy().astype("uint32"),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
