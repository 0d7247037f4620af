"""Shared fixtures: the three event-loop backends, small data, and a thread-leak check."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import Callback, LoopState, Trainer
from asynchat.callbacks import Checkpoint

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


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite's jobs are Ctrl-C'd as jobs started from a terminal are: a suite started in
    the background of a script (``cmd &`` in a shell without job control) ignores SIGINT, and
    so would every process it starts, which the engine, as Python does, leaves ignoring it
    (``ending_signals``): every Ctrl-C test hung there."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


#: The signals whose handling a test must leave as it found it.
KEPT_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTSTP, signal.SIGCONT]


@contextlib.contextmanager
def signal_handling_put_back() -> Iterator[dict[signal.Signals, Any]]:
    """The handling of :data:`KEPT_SIGNALS` as it was before the block (yielded), put back
    after it."""
    before = {signum: signal.getsignal(signum) for signum in KEPT_SIGNALS}
    try:
        yield before
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def signal_handlers_kept() -> Iterator[None]:
    """No test leaves a signal's handling changed for the tests after it (and for the
    processes they start, which inherit an ignored signal): stop_on_signals on asyncio left
    SIGINT's ``default_int_handler`` where it had been ignored."""
    with signal_handling_put_back() as before:
        yield
        changed = {s.name: h for s in before if (h := signal.getsignal(s)) != before[s]}
    assert not changed, f"the test left these signals' handling changed: {changed}"


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


class AskAt(Callback):
    """Calls ``checkpoint.request_save()`` at the end of each global step in ``steps`` (and
    at the loop's end if ``at_end``), before the Checkpoint's own hooks (it runs last); in
    a distributed trainer on the last rank alone (an ask from a rank that writes nothing).
    ``asked``: each ask's future."""

    def __init__(self, checkpoint: Checkpoint, *steps: int, at_end: bool = False) -> None:
        self.checkpoint, self.steps, self.at_end = checkpoint, steps, at_end
        self.asked: list[Future[Path | None]] = []

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step in self.steps:
            self._ask(state)

    def on_loop_end(self, state: LoopState) -> None:
        if self.at_end:
            self._ask(state)

    def _ask(self, state: LoopState) -> None:
        if state.loop.rank == state.loop.world_size - 1:
            self.asked.append(self.checkpoint.request_save())

    def served(self) -> list[Path | None]:
        return [future.result(timeout=0) for future in self.asked]


class FailAt(Callback):
    """Raises ``RuntimeError("the step failed")`` at the end of global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == self.step:
            raise RuntimeError("the step failed")


class AsksAsItResumes(Callback):
    """Saved with a state of its own; loaded as a run resumes (before any callback's
    ``on_loop_begin``, so no ``on_loop_end`` comes), it calls ``ask`` (what it returns
    is kept in ``answers``) and fails."""

    def __init__(self, ask: Callable[[], Any] | None = None) -> None:
        self.ask = ask
        self.answers: list[Any] = []

    def state_dict(self) -> dict[str, Any]:
        return {"saved": True}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.ask is not None:
            self.answers.append(self.ask())
        raise ValueError("this state cannot be loaded")


async def asked_as_a_run_fails_to_resume(
    directory: Path, callback: Callback, ask: Callable[[], Any]
) -> list[Any]:
    """What ``ask()`` gave, called as a run with ``callback`` failed to resume (from a
    checkpoint saved into ``directory`` first)."""
    await make_trainer(AsksAsItResumes(), Checkpoint(directory), num_steps=2).fit()
    failing = AsksAsItResumes(ask)
    with pytest.raises(ValueError, match="this state cannot be loaded"):
        await make_trainer(failing, callback, num_steps=4, resume_from=directory).fit()
    return failing.answers


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


class AsyncBatches:
    """An async iterable whose every ``aiter()`` is an async generator over ``batches``
    (each read after ``nap`` seconds), recording the thread of each read and each close
    (its ``finally``)."""

    def __init__(self, batches: Any, nap: float = 0) -> None:
        self.batches = batches
        self.nap = nap
        self.read_on: set[str] = set()
        self.closed = 0

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items()

    async def _items(self) -> AsyncIterator[Any]:
        try:
            for batch in self.batches:
                await anyio.sleep(self.nap)
                self.read_on.add(threading.current_thread().name)
                yield batch
        finally:
            self.closed += 1


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


class Job:
    """A job of a test in a process of its own (``python *argv``), its output read line by
    line as it comes, every wait bounded: a job that has not said what the test waits for,
    or not ended, within the time given writes its threads' stacks to its stderr (SIGUSR1,
    which the jobs register with :mod:`faulthandler`), is killed, and the test fails with
    its output. Before, a hung job held its test until pytest-timeout ended the whole suite,
    the job's stacks and every later test's result lost with it."""

    def __init__(self, *argv: str, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, *argv], cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.pid = self.process.pid
        self._lines = {"stdout": queue.SimpleQueue[str | None](), "stderr": queue.SimpleQueue()}
        self._readers = [
            threading.Thread(target=self._read, args=(name,), name=f"job-{name}", daemon=True)
            for name in self._lines
        ]
        for reader in self._readers:
            reader.start()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:  # (a test that failed before the job ended)
            self.process.kill()
        self.process.wait()
        for reader in self._readers:
            reader.join()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def _read(self, name: str) -> None:
        stream = getattr(self.process, name)
        for line in stream:
            self._lines[name].put(line)
        self._lines[name].put(None)
        stream.close()

    def line(self, stream: str = "stdout", timeout: float = 60) -> str:
        """The job's next line on ``stream``, without its newline."""
        try:
            line = self._lines[stream].get(timeout=timeout)
        except queue.Empty:
            self.fail(f"no line on its {stream} within {timeout:g} s")
        if line is None:
            self._lines[stream].put(None)  # (for the next caller too)
            self.fail(f"its {stream} closed before the line the test waits for")
        return line.rstrip("\n")

    def ended(self, timeout: float = 60) -> tuple[str, str]:
        """Once the job has ended: the rest of its stdout and of its stderr."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"not ended within {timeout:g} s")
        return self._rest("stdout"), self._rest("stderr")

    def _rest(self, stream: str) -> str:
        for reader in self._readers:
            reader.join()
        lines = []
        while (line := self._lines[stream].get()) is not None:
            lines.append(line)
        self._lines[stream].put(None)
        return "".join(lines)

    def fail(self, what: str) -> NoReturn:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGUSR1)
            time.sleep(1.0)  # (faulthandler writes at once)
            self.process.kill()
        self.process.wait()
        out, err = self._rest("stdout"), self._rest("stderr")
        pytest.fail(f"the job {what}\n--- its stdout:\n{out}\n--- its stderr:\n{err}")


def start_lock_holder(directory: Path) -> subprocess.Popen[str]:
    """Another process that holds ``directory``'s checkpoint lock, as a live writer does,
    once it has said so (for two minutes at most, unless killed)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(directory)], stdout=subprocess.PIPE, text=True
    )
    wait_for_line(holder, "locked")
    return holder


_LOCK_HOLDER = """
import sys, time
from pathlib import Path
from asynchat._checkpoint_io import DirectoryLock
DirectoryLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 60) -> None:
    """Read ``process``'s stdout up to its line ``text`` (stripped), for ``timeout`` seconds
    at most: a process that has not said it by then, or that ended without saying it, is
    killed and the test fails with what it said. A bare ``readline()`` waited for a hung
    process forever (pytest-timeout's end then took the whole suite), and a loop over
    ``readline()`` spun forever once the output had ended."""
    stream = process.stdout
    assert stream is not None
    said: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            said.append(line)
            if line.strip() == text:
                found.set()
                return

    reader = threading.Thread(target=read, name="test-reader", daemon=True)
    reader.start()
    reader.join(timeout)
    if found.is_set():
        return
    if process.poll() is None:
        process.kill()
        process.wait()
    reader.join(10)  # (its children may hold the pipe a moment longer)
    pytest.fail(
        f"the process did not say {text!r} within {timeout:g} s (returncode "
        f"{process.returncode}); it said:\n{''.join(said)}"
    )


def wait_until(
    done: Callable[[], bool], process: subprocess.Popen[str], what: str, timeout: float = 120
) -> None:
    """Poll ``done()`` until it holds. A ``process`` that ends first, or that has not got
    there within ``timeout`` seconds, is killed (its process group, if it leads one: a
    launcher and its ranks) and the test fails saying ``what`` was awaited, with all the
    process said (a bare deadline said only "both jobs train": once in five runs of
    test_launch.py beside other tests, nothing to tell a hang from a slow start)."""
    deadline = time.monotonic() + timeout
    while not done():
        if process.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    else:
        return
    ended = process.poll()
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    out, err = process.communicate(timeout=60)
    why = f"it ended first (returncode {ended})" if ended is not None else f"not in {timeout:g} s"
    pytest.fail(f"waited for {what}: {why}; it said:\n{out[-3000:]}\n--- stderr:\n{err[-6000:]}")


def finished(process: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    """``process``'s remaining stdout and stderr once it has ended, within ``timeout``
    seconds; one that has not is killed and the test fails with its output (a bare
    ``communicate(timeout=...)`` inside ``with Popen(...)`` raised, and Popen's exit then
    waited for the process forever)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(
            f"the process had not ended within {timeout:g} s; it said:\n{out or ''}\n"
            f"--- its stderr:\n{err or ''}"
        )
    return out or "", err or ""


def table_beside(trace: Path) -> Path:
    """The table of ops the Profiler writes beside ``trace`` (``...-step<n>.txt``)."""
    return trace.with_name(trace.name.removesuffix(".pt.trace.json") + ".txt")


def assert_table_is_torchs(profile: torch.profiler.profile, *, by_shapes: bool) -> None:
    """The Profiler's table rows of a stopped recording (``op_rows``) have the rows and the
    figures of torch's ``key_averages()`` of it: calls, CPU and device times (self and
    total), and memory (self and total), on the host and on a device."""
    from torch.profiler import DeviceType

    from asynchat.callbacks._op_table import op_rows

    theirs = {}
    for event in profile.key_averages(group_by_input_shape=by_shapes):
        device = event.device_type
        kind = "annotation" if event.is_user_annotation else "op"
        if device != DeviceType.CPU:
            kind = f"{device.name} annotation" if event.is_user_annotation else device.name
        key = (event.key, kind, str(event.input_shapes) if by_shapes else "")
        theirs[key] = (event.count, event.self_cpu_time_total, event.cpu_time_total,
                       event.self_device_time_total, event.device_time_total,
                       event.self_cpu_memory_usage, event.cpu_memory_usage,
                       event.self_device_memory_usage, event.device_memory_usage)  # fmt: skip
    rows = op_rows(profile.profiler.kineto_results.events(), by_shapes=by_shapes)
    ours = {}
    for key, row in rows.items():
        ours[key] = (row.calls, row.self_cpu / 1e3, row.cpu / 1e3, row.self_device / 1e3,
                     row.device / 1e3, row.self_cpu_memory, row.cpu_memory,
                     row.self_device_memory, row.device_memory)  # fmt: skip
    assert sorted(ours) == sorted(theirs)
    for key, figures in theirs.items():  # (torch's in float microseconds, ours in ns)
        assert ours[key] == pytest.approx(figures, rel=1e-9, abs=1e-6), key
