"""Choosing the loop's device."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | int | None) -> torch.device:
    """``None`` picks CUDA when available, else the CPU; anything else must be a usable device."""
    if device is None:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be None, a torch.device, or a string like 'cpu' or 'cuda:0', "
            f"got {device!r}"
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but CUDA is not available here "
                "(torch.cuda.is_available() is False); use device='cpu' or device=None"
            )
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        resolved = torch.device("cuda", index)
    elif resolved.type != "cpu":
        raise ValueError(f"device={device!r}: asynchat runs on 'cpu' or 'cuda' devices")
    return resolved
