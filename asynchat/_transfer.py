"""Bring device tensors to the host from the event loop without blocking it."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, Generic, TypeVar

import anyio
import torch

from asynchat._mailbox import running_trio_token
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


class HostCopy(Generic[T]):
    """``obj`` with every tensor in it copied to host memory: queued when made, landed later.

    The one way asynchat brings tensors to the host (``to_host``, the loggers, a streaming
    Predictor's outputs and checkpoint snapshots all use it). Each CUDA tensor is copied with
    ``non_blocking=True`` into pinned memory, queued on ``streams[device]`` when given (a side
    stream the caller has ordered after the producer) or else on its own device's current
    stream, and one CUDA event per device marks its copies landed. CPU tensors are cloned, so
    the copy never changes under the caller. Making one never waits for the device.
    """

    def __init__(
        self, obj: T, *, streams: Mapping[torch.device, torch.cuda.Stream] | None = None
    ) -> None:
        used: dict[torch.device, torch.cuda.Stream] = {}

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.detach()
            if not tensor.is_cuda:  # a CPU clone; from another accelerator, a waiting copy
                return tensor.to("cpu", copy=True)
            stream = used.get(tensor.device)
            if stream is None:
                side = streams.get(tensor.device) if streams is not None else None
                stream = side if side is not None else torch.cuda.current_stream(tensor.device)
                used[tensor.device] = stream
            with torch.cuda.stream(stream):  # also makes the tensor's device current
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                if streams is not None:  # the caching allocator must not reuse the source
                    tensor.record_stream(stream)  # before a side stream's copy has run
            return host

        self._value: T = map_tensors(copy, obj)
        self._events = [stream.record_event() for stream in used.values()]

    def ready(self) -> bool:
        """Whether every copy has landed (asks the device; never waits)."""
        return all(event.query() for event in self._events)

    def wait(self) -> T:
        """The host copy, blocking this thread until it has landed (a host/device sync, only
        if it has not landed yet; never call it on the event loop's thread)."""
        for event in self._events:
            event.synchronize()
        return self._value

    async def landed(self) -> T:
        """The host copy, awaited by polling its events, so the event loop never blocks."""
        delay = _FIRST_POLL_S
        for event in self._events:
            while not event.query():
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_POLL_S)
        if not self._events:
            await anyio.lowlevel.checkpoint()
        return self._value


def to_host(obj: T, *, after: torch.cuda.Stream | None = None) -> Coroutine[Any, Any, T]:
    """Return ``obj`` with every tensor in it replaced by a host (CPU) copy, without blocking:
    ``host = await asynchat.to_host(obj)``, in async code only (an ``async def`` hook): called
    where no event loop runs (a ``def`` hook, on the compute thread) it raises at once,
    naming what to do there; it handed back a coroutine that nothing would await.

    CUDA tensors are copied into pinned memory on a side stream with ``non_blocking=True``
    after the work already queued on ``after`` (the loop's compute stream), and the event
    loop awaits the copy's CUDA event by polling it, so no host/device sync ever stalls the
    loop. CPU tensors are cloned, so the result never changes under the caller. Meant for
    scalars and small tensors (losses, metrics, a few predictions).

    Without ``after``, the copy is ordered after the compute stream of the loop whose
    ``fit()`` runs in the calling task (so ``await asynchat.to_host(state.loss)`` in an
    ``async def`` hook is correct), else after the caller's current stream.
    """
    awaited_here("asynchat.to_host()")
    return copy_to_host(obj, after)


def awaited_here(what: str) -> None:
    """Refuse ``what`` (a coroutine function's name) where no event loop runs in this thread
    to await it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        if running_trio_token() is None:
            raise RuntimeError(
                f"{what} is awaited in async code (an async def hook: `await "
                f"state.loop.to_host(x)`); a def hook runs on the compute thread, where the "
                f"tensors can be read directly (x.item(), x.cpu())"
            ) from None


async def copy_to_host(obj: T, after: torch.cuda.Stream | None) -> T:
    """:func:`to_host`'s copy, once it is known to be awaited."""
    if after is None:
        after = compute_stream.get()
    streams = {}
    for device in {t.device for t in iter_tensors(obj) if t.is_cuda}:
        stream = streams[device] = _side_stream(device)
        # The copy must see the values the compute stream is still producing: order it after
        # that stream's queued work on the device, without waiting for it here.
        producer = after if after is not None and after.device == device else None
        stream.wait_stream(producer if producer is not None else torch.cuda.current_stream(device))
    return await HostCopy(obj, streams=streams).landed()
