"""Bring device tensors to the host from the event loop without blocking it."""

from __future__ import annotations

import contextvars
import threading
from typing import TypeVar

import anyio
import torch

from asynchat._tree import iter_tensors, map_tensors

T = TypeVar("T")

_FIRST_POLL_S = 50e-6
_MAX_POLL_S = 1e-3

# The compute stream of the loop whose fit() runs in this context (its async hooks run in it),
# so that asynchat.to_host(x) without `after` is ordered after the step that produced x.
compute_stream: contextvars.ContextVar[torch.cuda.Stream | None] = contextvars.ContextVar(
    "asynchat_compute_stream", default=None
)

# One side stream per device for host copies, made once: a new pool stream per call would
# strand cached blocks on streams nobody uses again.
_side_streams: dict[torch.device, torch.cuda.Stream] = {}
_side_streams_lock = threading.Lock()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    with _side_streams_lock:
        stream = _side_streams.get(device)
        if stream is None:
            stream = _side_streams[device] = torch.cuda.Stream(device)
        return stream


async def to_host(obj: T, *, after: torch.cuda.Stream | None = None) -> T:
    """Return ``obj`` with every tensor in it replaced by a host (CPU) copy, without blocking.

    CUDA tensors are copied into pinned memory on a side stream with ``non_blocking=True``
    after the work already queued on ``after`` (the loop's compute stream), and the event
    loop awaits the copy's CUDA event by polling it, so no host/device sync ever stalls the
    loop. CPU tensors are cloned, so the result never changes under the caller. Meant for
    scalars and small tensors (losses, metrics, a few predictions).

    Without ``after``, the copy is ordered after the compute stream of the loop whose
    ``fit()`` runs in the calling task (so ``await asynchat.to_host(state.loss)`` in an
    ``async def`` hook is correct), else after the caller's current stream.
    """
    cuda_devices = {t.device for t in iter_tensors(obj) if t.is_cuda}
    if not cuda_devices:
        result: T = map_tensors(_clone_detached, obj)
        await anyio.lowlevel.checkpoint()
        return result
    events = []
    streams = {}
    if after is None:
        after = compute_stream.get()
    for device in cuda_devices:
        stream = _side_stream(device)
        # The copy must see the values the compute stream is still producing: order it after
        # that stream's queued work on the device, without waiting for it here.
        producer = after if after is not None and after.device == device else None
        stream.wait_stream(producer if producer is not None else torch.cuda.current_stream(device))
        streams[device] = stream

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_cuda:
            return _clone_detached(tensor)
        stream = streams[tensor.device]
        with torch.cuda.stream(stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor.detach(), non_blocking=True)
            tensor.record_stream(stream)  # keep the source alive until the copy has run
        return host

    result = map_tensors(copy, obj)
    for stream in streams.values():
        event = torch.cuda.Event()
        event.record(stream)
        events.append(event)
    delay = _FIRST_POLL_S
    for event in events:
        while not event.query():  # non-blocking: asks whether the copy has run
            await anyio.sleep(delay)
            delay = min(delay * 2, _MAX_POLL_S)
    return result


def _clone_detached(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


class PendingCopy:
    """A device-to-host copy of one tensor in flight, for ``def`` hooks on the compute thread.

    Started with :func:`start_host_copy`; :meth:`ready` asks without blocking whether it has
    landed, :meth:`value` returns it (waiting only if it has not).
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._event: torch.cuda.Event | None = None
        if tensor.is_cuda:
            with torch.cuda.device(tensor.device):  # the tensor's device, not the current one
                self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                self._host.copy_(tensor, non_blocking=True)  # queued on that device's stream
                self._event = torch.cuda.Event()
                self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.clone()

    def ready(self) -> bool:
        return self._event is None or bool(self._event.query())

    def value(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()  # host sync, only if asked before the copy landed
        return self._host


def start_host_copy(tensor: torch.Tensor) -> PendingCopy:
    """Start copying ``tensor`` to the host without waiting for it (see :class:`PendingCopy`)."""
    return PendingCopy(tensor)


def start_host_copies(obj: T) -> tuple[T, torch.cuda.Event | None]:
    """On the compute thread: ``obj`` with its tensors copied to the host, and the event that
    marks the copies done (``None`` if nothing was on a CUDA device). The copies are queued on
    the current stream without waiting; hand the event to :func:`wait_for_event`."""
    if not any(t.is_cuda for t in iter_tensors(obj)):
        return map_tensors(_clone_detached, obj), None

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_cuda:
            return _clone_detached(tensor)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor.detach(), non_blocking=True)

    result: T = map_tensors(copy, obj)
    event = torch.cuda.Event()
    event.record()
    return result, event


async def wait_for_event(event: torch.cuda.Event | None) -> None:
    """Await a CUDA event by polling it, without blocking the event loop."""
    delay = _FIRST_POLL_S
    while event is not None and not event.query():
        await anyio.sleep(delay)
        delay = min(delay * 2, _MAX_POLL_S)
