"""stop_on_signals(): SIGTERM in a real process becomes a graceful stop with a checkpoint."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import (
    BACKENDS,
    HAVE_TRIO,
    StopAt,
    finished,
    make_trainer,
    signal_handling_put_back,
    wait_for_line,
)

from asynchat import Callback, LoopState, Trainer, stop_on_signals
from asynchat._signals import ending_signals, listen, unlisten, unwatch, watch

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize(
    "backend",
    ["asyncio", pytest.param("trio", marks=pytest.mark.skipif(not HAVE_TRIO, reason="needs trio"))],
)
def test_a_signal_stops_the_loop_gracefully(
    tmp_path: Path, backend: str, signum: signal.Signals
) -> None:
    # SIGHUP (a closed terminal) killed the process: no final checkpoint.
    with subprocess.Popen(
        [sys.executable, str(HERE / "signal_job.py"), backend, str(tmp_path)],
        cwd=HERE, stdout=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        wait_for_line(process, "training")
        os.kill(process.pid, signum)
        out, _ = finished(process)
    assert process.returncode == 0, "the process ended normally, not by the signal"
    assert out.startswith(f"stopped: received {signum.name} at step ")
    step = int(out.split()[-1])
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["checkpoints"]
    assert entry["global_step"] == step, "the final checkpoint is the last step"


@pytest.mark.parametrize(
    ("where", "expected"),
    [("stop", "running stopping finished SIGUSR1"),
     ("pause", "running paused running stopping finished resumed"),
     ("subscribe", "running stopping finished SIGUSR1")],
)  # fmt: skip
@pytest.mark.parametrize(
    "backend",
    ["asyncio", pytest.param("trio", marks=pytest.mark.skipif(not HAVE_TRIO, reason="needs trio"))],
)
def test_stop_and_pause_from_a_signal_handler_of_ones_own(
    where: str, expected: str, backend: str
) -> None:
    # A handler installed with signal.signal runs on the main thread between two bytecodes:
    # in the middle of a status change made on the event loop, its stop() or pause() waited
    # forever for the control's lock, held by the code it interrupted; in a subscription,
    # the status event its stop() published waited for the events' lock.
    done = subprocess.run(
        [sys.executable, str(HERE / "signal_handler_job.py"), where, backend],
        cwd=HERE, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == expected


@pytest.mark.parametrize("how", ["nohup", "handled"])
def test_sighup_is_left_alone_where_the_program_asks_for_it(tmp_path: Path, how: str) -> None:
    # nohup asks the job to outlive its terminal, and a daemon's own SIGHUP handler reloads
    # its configuration or rotates its logs: stop_on_signals() must not take SIGHUP over,
    # and the job trains on until a SIGTERM.
    command = [sys.executable, str(HERE / "signal_job.py"), "asyncio", str(tmp_path)]
    command = ["nohup", *command] if how == "nohup" else [*command, "reload"]
    with subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, text=True) as process:
        wait_for_line(process, "training")
        os.kill(process.pid, signal.SIGHUP)
        if how == "nohup":
            time.sleep(0.5)
        else:
            wait_for_line(process, "reloaded")
        assert process.poll() is None
        os.kill(process.pid, signal.SIGTERM)
        out, _ = finished(process)
    assert process.returncode == 0
    assert out.startswith("stopped: received SIGTERM at step ")


def test_only_in_the_main_thread_and_with_a_loop() -> None:
    errors: list[BaseException] = []

    def in_thread() -> None:
        async def use() -> None:
            async with stop_on_signals(make_trainer()):
                pass

        try:
            anyio.run(use)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "must run in the main thread" in str(errors[0])

    async def without_loops() -> None:
        async with stop_on_signals():
            pass

    with pytest.raises(ValueError, match="needs at least one loop"):
        anyio.run(without_loops)

    async def without_signals() -> None:
        async with stop_on_signals(make_trainer(), signals=()):
            pass

    with pytest.raises(ValueError, match=r"stop_on_signals\(signals=\(\)\) would catch nothing"):
        anyio.run(without_signals)

    async def uncatchable(*signals: int) -> None:
        async with stop_on_signals(make_trainer(), signals=signals):  # type: ignore[arg-type]
            raise AssertionError("not entered")

    for signals, name in [((signal.SIGTERM, signal.SIGKILL), "SIGKILL"), ((99999,), "99999")]:
        with pytest.raises(ValueError, match=rf"signals=\.\.\.\): {name} cannot be caught"):
            anyio.run(uncatchable, *signals)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # (put back: none is open)

    # Accepted: a string (or a list of loops) as a loop, whose stop() the handler then
    # called, raising AttributeError in the main thread wherever the signal came; signal
    # names, or one signal, failed with "'str' object cannot be interpreted as an integer".
    async def given(*loops: object, signals: object = None) -> None:
        async with stop_on_signals(*loops, signals=signals):  # type: ignore[arg-type]
            raise AssertionError("not entered")

    trainer = make_trainer()
    for loops, signals, match in [
        (("trainer",), None, r"takes loops \(a Trainer, \.\.\.\), got 'trainer'$"),
        (([trainer],), None, r"got \[<Trainer .*\]; pass them one by one: stop_on_signals\(\*"),
        ((trainer,), ["SIGTERM"], r"signals must be a tuple of signals, .*got 'SIGTERM' among"),
        ((trainer,), signal.SIGUSR1, r"got the one signal .*SIGUSR1.*: pass signals=\("),
        ((trainer,), "SIGUSR1", r"signals must be a tuple of signals, .*got 'SIGUSR1'$"),
    ]:
        with pytest.raises(TypeError, match=match):
            anyio.run(functools.partial(given, *loops, signals=signals))
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_no_handler_is_installed_at_import() -> None:
    code = (
        "import signal; before = signal.getsignal(signal.SIGTERM); import asynchat, "
        "asynchat.callbacks; assert signal.getsignal(signal.SIGTERM) is before; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


class SignalSelf(Callback):
    """Sends ``signum`` to this process at the end of step 2."""

    def __init__(self, signum: signal.Signals) -> None:
        self.signum = signum

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == 2:
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def handlers_put_back() -> Iterator[None]:
    """For a test that sets handlers of its own: the ones it found, put back after it."""
    with signal_handling_put_back():
        yield


@pytest.mark.usefixtures("handlers_put_back")
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_handlers_the_signals_had_come_back_after_the_block(
    backend: tuple[str, dict[str, Any]],
) -> None:
    # On asyncio and uvloop, a signal the block received was left with its default handling
    # (SIGINT: KeyboardInterrupt) however it had been handled: a program's own SIGTERM
    # handler (a server's graceful shutdown) was gone after the block, an ignored SIGINT
    # was heard.
    def own(signum: int, frame: object) -> None:
        raise AssertionError("not while the block catches it")

    signal.signal(signal.SIGTERM, own)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trainer = make_trainer(SignalSelf(signal.SIGTERM), num_epochs=2)

    async def run() -> None:
        async with stop_on_signals(trainer, signals=(signal.SIGINT, signal.SIGTERM)):
            await trainer.fit()

    anyio.run(run, backend=backend[0], backend_options=backend[1])
    assert trainer.state.stop_reason == "received SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is own
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


@pytest.mark.usefixtures("handlers_put_back")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_signal_the_process_ignores_stays_ignored(backend: tuple[str, dict[str, Any]]) -> None:
    # A process that ignores SIGINT (what a script starts in the background, `cmd &`) or
    # SIGHUP (nohup) was asked to: by default the block leaves it ignored, as the process
    # would without it; when it ignores every one, the block catches none (trio refused to
    # open a receiver of no signal).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    assert signal.SIGINT not in ending_signals() and signal.SIGTERM in ending_signals()
    trainer = make_trainer(SignalSelf(signal.SIGINT), num_epochs=2)

    async def run() -> None:
        async with stop_on_signals(trainer):
            await trainer.fit()

    anyio.run(run, backend=backend[0], backend_options=backend[1])
    assert (trainer.status, trainer.state.stop_reason) == ("finished", None)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    assert ending_signals() == ()
    trainer = make_trainer(SignalSelf(signal.SIGTERM), num_epochs=2)
    anyio.run(run, backend=backend[0], backend_options=backend[1])
    assert (trainer.status, trainer.state.stop_reason) == ("finished", None)


@pytest.mark.usefixtures("handlers_put_back")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_signal_stops_the_loops_of_every_block_open(backend: tuple[str, dict[str, Any]]) -> None:
    # A service's jobs, each in a block of its own. On asyncio and uvloop the event loop
    # keeps one receiver per signal: a SIGTERM stopped the newest block's loops alone, and
    # once a block had ended, the others' loops no more (the signal was swallowed).
    first = make_trainer(num_epochs=1_000_000)
    second = make_trainer(StopAt(3), num_epochs=1_000_000)  # its block ends first
    third = make_trainer(SignalSelf(signal.SIGTERM), num_epochs=1_000_000)

    async def run(trainer: Trainer) -> None:
        async with stop_on_signals(trainer, signals=(signal.SIGTERM,)):
            await trainer.fit()

    async def service() -> None:
        async with anyio.create_task_group() as jobs:
            jobs.start_soon(run, first)
            await run(second)
            await run(third)
            with anyio.move_on_after(10):
                while first.status != "finished":  # noqa: ASYNC110 (a test's poll)
                    await anyio.sleep(0.05)
            first.stop("the signal did not stop it")

    anyio.run(service, backend=backend[0], backend_options=backend[1])
    assert first.state.stop_reason == third.state.stop_reason == "received SIGTERM"
    assert second.state.stop_reason == "stop here"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the last block put it back"


@pytest.mark.usefixtures("handlers_put_back")
@pytest.mark.parametrize("last", ["first", "second"])
def test_whoever_listens_hears_the_signal_until_the_last_leaves(last: str) -> None:
    # A stop_on_signals block and launch_async's relay, in either order. Before, each set a
    # handler of its own in the other's place: the signal reached the newest alone, and the
    # one that left first put back the handler from before it under the other.
    heard: list[str] = []

    def first(signum: int) -> None:
        heard.append(f"first {signal.Signals(signum).name}")

    def second(signum: int) -> None:
        heard.append(f"second {signal.Signals(signum).name}")

    listen(signal.SIGTERM, first)
    listen(signal.SIGTERM, second)
    os.kill(os.getpid(), signal.SIGTERM)
    assert heard == ["first SIGTERM", "second SIGTERM"]
    unlisten(signal.SIGTERM, second if last == "first" else first)
    os.kill(os.getpid(), signal.SIGTERM)
    assert heard[2:] == [f"{last} SIGTERM"]
    unlisten(signal.SIGTERM, first if last == "first" else second)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.usefixtures("handlers_put_back")
def test_a_signal_the_engine_listens_to_still_counts_as_one_that_would_end_the_process() -> None:
    # Regression: launch_async's relay, listening to a SIGHUP left to its default, made it
    # look like a handler of the program's to a stop_on_signals block opened after it: the
    # block left SIGHUP out, and a closed terminal killed the block's loops.
    heard: list[int] = []
    listen(signal.SIGHUP, heard.append)
    try:
        assert signal.SIGHUP in ending_signals()
        watch(negated := lambda signum: heard.append(-signum))  # (it hears it too, after)
        os.kill(os.getpid(), signal.SIGHUP)
        unwatch(negated)
        os.kill(os.getpid(), signal.SIGHUP)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        listen(signal.SIGINT, heard.append)
        assert signal.SIGINT not in ending_signals(), "ignored before the engine listened"
        unlisten(signal.SIGINT, heard.append)
    finally:
        unlisten(signal.SIGHUP, heard.append)
    assert heard == [signal.SIGHUP, -signal.SIGHUP, signal.SIGHUP]
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def _report_handling(to: Connection) -> None:
    from asynchat import _signals

    listening = len(_signals._open) + len(_signals._listeners) + len(_signals._watchers)
    to.send((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP), listening))


@pytest.mark.usefixtures("handlers_put_back")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_process_forked_inside_a_block_has_the_handlers_from_before_it() -> None:
    # A DataLoader worker, forked as its loop begins: the blocks and their loops are the
    # parent's. A Ctrl-C to the process group ran the engine's handler in every worker,
    # which asked its copies of the parent's loops to stop. So are launch_async's jobs,
    # whose relay listens to SIGHUP here (a worker forked under it kept its handler).
    trainer = make_trainer()
    reports: list[tuple[object, object, int]] = []
    relayed: list[int] = []

    async def fork_inside() -> None:
        listen(signal.SIGHUP, relayed.append)
        watch(relayed.append)
        async with stop_on_signals(trainer, signals=(signal.SIGTERM,)):
            theirs, ours = multiprocessing.get_context("fork").Pipe(duplex=False)
            child = multiprocessing.get_context("fork").Process(
                target=_report_handling, args=(ours,)
            )
            child.start()
            ours.close()  # (a child that fails: recv() meets the pipe's end, not a wait)
            assert theirs.poll(30), "the child said nothing in 30 s"
            reports.append(theirs.recv())
            child.join(30)
        unwatch(relayed.append)
        unlisten(signal.SIGHUP, relayed.append)

    anyio.run(fork_inside)
    assert reports == [(signal.SIG_DFL, signal.SIG_DFL, 0)]
