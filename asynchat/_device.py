"""Choosing the loop's device: the CPU, CUDA, or another accelerator that ``torch.accelerator``
knows (mps, xpu, ...). The CUDA-stream parts of the engine are used on CUDA devices only;
elsewhere the compute thread runs on the device's default queue and host copies wait for it.
"""

from __future__ import annotations

import torch


def accelerator() -> torch.device | None:
    """The machine's usable accelerator type (``cuda``, ``mps``, ``xpu``...), or None."""
    return torch.accelerator.current_accelerator(check_available=True)


def resolve_device(device: str | torch.device | int | None) -> torch.device:
    """``None`` picks the accelerator when one is usable, else the CPU; anything else must be
    a usable device. The result always has an index, except the CPU's."""
    if device is None:
        found = accelerator()
        if found is None:
            return torch.device("cpu")
        device = found
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be None, a torch.device, or a string like 'cpu' or 'cuda:0', "
            f"got {device!r}"
        ) from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but CUDA is not available here "
                "(torch.cuda.is_available() is False); use device='cpu' or device=None"
            )
        count, current = torch.cuda.device_count(), torch.cuda.current_device
    else:
        found = accelerator()
        if found is None or found.type != resolved.type:
            have = f"this machine's is {found.type}" if found is not None else "it finds none"
            raise ValueError(
                f"device={device!r} but torch.accelerator has no {resolved.type!r} device "
                f"({have}); use device='cpu' or device=None"
            )
        count, current = torch.accelerator.device_count(), torch.accelerator.current_device_index
    index = current() if resolved.index is None else resolved.index
    if index >= count:
        raise ValueError(f"device={device!r} but only {count} {resolved.type} device(s) exist")
    return torch.device(resolved.type, index)
