"""Shared fixtures: the three event-loop backends, small data, and a thread-leak check."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import Callback, LoopState, Trainer

try:
    import trio  # noqa: F401

    HAVE_TRIO = True
except ImportError:  # the GPU machine's image has no trio; CI installs it with the test extra
    HAVE_TRIO = False

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(
        ("trio", {}), id="trio", marks=pytest.mark.skipif(not HAVE_TRIO, reason="needs trio")
    ),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def engine_threads() -> list[threading.Thread]:
    """The engine's threads at work: compute threads of a loop, data threads; not the idle
    compute workers waiting in the pool for the next loop (``asynchat-idle-<device>``)."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("asynchat-") and not t.name.startswith("asynchat-idle-")
    ]


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """Every test must end with no compute or data thread of the engine at work."""
    assert engine_threads() == [], f"threads alive before the test: {engine_threads()}"
    yield
    # Threads are joined before fit() returns or raises; nothing should be left even briefly.
    left = engine_threads()
    if left:
        time.sleep(0.5)  # report what is *still* there, not a race in the report itself
        pytest.fail(f"threads left behind: {engine_threads()}")


@pytest.fixture(autouse=True)
def environment_kept() -> Iterator[None]:
    """No test leaves ``os.environ`` changed for the tests after it. (Importing an example
    sets ``OMP_WAIT_POLICY``: every launch after that one spawned its ranks, since the fork
    server had started without it.)"""
    volatile = "PYTEST_CURRENT_TEST"  # (pytest's own, set anew for each phase)
    before = {k: v for k, v in os.environ.items() if k != volatile}
    yield
    for name in set(os.environ) - set(before) - {volatile}:
        del os.environ[name]
    os.environ.update(before)


class StopAt(Callback):
    """Calls ``stop(reason)`` at the end of global step ``at``."""

    def __init__(self, at: int, reason: str = "stop here") -> None:
        self.at, self.reason = at, reason

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == self.at:
            state.loop.stop(self.reason)


class StuckUntilReported:
    """Holds a hook until the engine reports that its job runs on after being asked to end
    (the warning on the ``asynchat.loop`` logger): the hook calls :meth:`block`, which sets
    ``stuck`` and waits for ``released``; the run goes inside :meth:`releasing`."""

    def __init__(self) -> None:
        self.stuck, self.released = threading.Event(), threading.Event()

    def block(self) -> None:
        self.stuck.set()
        self.released.wait(30)

    @contextlib.contextmanager
    def releasing(self) -> Iterator[None]:
        """Release on the report, from a handler on the root logger added after caplog's:
        the record is captured before the release lets the job, then the test, go on
        (released from the ``asynchat.loop`` logger's own handler, a test could assert
        before caplog had the record)."""
        released = self.released

        class ReleaseOnReport(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.name == "asynchat.loop":
                    released.set()

        root = logging.getLogger()
        root.addHandler(handler := ReleaseOnReport())
        try:
            yield
        finally:
            root.removeHandler(handler)


class CancelAt(Callback):
    """Cancels the scope ``fit()`` runs in at the end of global step ``at`` (from an
    ``async def`` hook, on the event loop): ``with anyio.CancelScope() as cancel.scope:
    await loop.fit()``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.scope: anyio.CancelScope | None = None

    async def on_step_end(self, state: LoopState) -> None:
        if state.global_step == self.at and self.scope is not None:
            self.scope.cancel()
            # Cancelled here, the hook's request makes the loop register the cancellation
            # before the compute thread goes on: it ends at this step's boundary, whatever
            # the threads' timing (else the event loop could register it a step late).
            await anyio.lowlevel.checkpoint()


def load_example(filename: str) -> ModuleType:
    """Import ``examples/<filename>`` (the examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / filename
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_data(n: int = 96, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def make_loader(
    n: int = 96, batch_size: int = 16, *, shuffle: bool = False, seed: int = 0
) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(make_data(n), batch_size=batch_size, shuffle=shuffle, generator=generator)


class Unsized:
    """``data`` without ``len()``: the engine reads it one batch ahead to find an epoch's
    last."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)


def make_model(seed: int = 0, features: int = 8, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def make_trainer(
    *callbacks: Callback, loader: Any = None, model: nn.Module | None = None, **kwargs: Any
) -> Trainer:
    """A small classifier trainer (96 samples, batches of 16, 6 steps an epoch)."""
    if "num_steps" not in kwargs:
        kwargs.setdefault("num_epochs", 3)
    return Trainer(
        model if model is not None else make_model(),
        loader if loader is not None else make_loader(96, 16),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        callbacks=list(callbacks),
        **kwargs,
    )


def newest_listed(directory: Path) -> int | None:
    """The newest global step the checkpoint manifest of ``directory`` lists (None: none)."""
    try:
        entries = json.loads((directory / "manifest.json").read_text())["checkpoints"]
    except FileNotFoundError:
        return None
    return max((e["global_step"] for e in entries), default=None)


def wait_until_listed(directory: Path, step: int, timeout: float = 60) -> None:
    """Wait (in a ``def`` hook: the loop waits) until the manifest of ``directory`` lists
    global step ``step`` or a later one: that checkpoint is written."""
    deadline = time.monotonic() + timeout
    while (newest_listed(directory) or 0) < step:
        assert time.monotonic() < deadline, f"step {step} was never checkpointed"
        time.sleep(0.01)
