"""Async data sources: a loop reads an async iterable on the event loop, one batch when its
step asks; stop() and cancellation end a read that waits; a batch read from data read once
(an iterator, sync or async: a stream) is trained rather than dropped when stop() ends the
loop; an async generator is closed as its epoch's reading ends."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import torch
from conftest import (
    AsyncBatches,
    CancelAt,
    StopAt,
    Unsized,
    engine_threads,
    finished,
    load_example,
    make_loader,
    make_model,
    make_trainer,
    sgd,
    wait_until,
)
from torch import nn

from asynchat import (
    BasicBatchProcessor,
    Callback,
    InUseError,
    LoopState,
    LoopStatus,
    Predictor,
    Trainer,
)
from asynchat.callbacks import Checkpoint, Validation

pytestmark = pytest.mark.anyio


def numbered(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of 4 samples whose features are all the batch's number."""
    return [(torch.full((4, 8), float(i)), torch.zeros(4, dtype=torch.long)) for i in range(count)]


class Seen(Callback):
    """The number of each batch trained on, in order."""

    def __init__(self) -> None:
        self.numbers: list[int] = []

    def on_step_end(self, state: LoopState) -> None:
        self.numbers.append(int(state.batch[0][0, 0]))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


async def wait_for(condition: Any) -> None:
    """Until ``condition()`` holds (a loop's step count: the loop offers no event for it)."""
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_an_async_iterable_trains_as_its_batches_in_a_list_would() -> None:
    source = AsyncBatches(list(make_loader(96, 16)))
    trainer = make_trainer(loader=source, num_epochs=2)
    await trainer.fit()
    reference = make_trainer(loader=list(make_loader(96, 16)), num_epochs=2)
    await reference.fit()
    assert trainer.state.global_step == 12 and trainer.state.epoch_complete
    assert same_weights(trainer.model, reference.model)
    assert source.read_on == {threading.current_thread().name}, "read on the event loop"
    assert source.closed == 2, "each epoch's generator closed as its reading ended"


async def test_an_async_iterator_is_read_once() -> None:
    send, receive = anyio.create_memory_object_stream[Any](4)
    with send, receive, pytest.raises(TypeError, match=r"async iterator.*read only once"):
        make_trainer(loader=receive, num_epochs=2)


async def test_two_loops_reading_one_async_iterator_at_once_are_refused() -> None:
    send, receive = anyio.create_memory_object_stream[Any](4)
    first = make_trainer(loader=receive, num_epochs=1)
    second = make_trainer(loader=receive, num_epochs=1)
    with send, receive:
        async with anyio.create_task_group() as group:
            group.start_soon(first.fit)
            await wait_for(lambda: first.status is LoopStatus.RUNNING)
            with pytest.raises(InUseError, match="an iterator, which is read once"):
                await second.fit()
            first.stop()


async def test_a_stream_fed_by_a_task_is_trained_in_order_to_its_end() -> None:
    send, receive = anyio.create_memory_object_stream[Any](2)
    seen = Seen()
    trainer = make_trainer(seen, loader=receive, num_epochs=1)
    async with anyio.create_task_group() as group:
        group.start_soon(trainer.fit)
        async with send:
            for batch in numbered(7):
                await send.send(batch)
    receive.close()  # (the caller's: the loop leaves a stream it did not open as it is)
    assert seen.numbers == list(range(7))
    assert trainer.status is LoopStatus.FINISHED and trainer.state.epoch_complete


async def test_stop_while_a_stream_waits_trains_the_batch_read_and_reads_no_more() -> None:
    # The loop reads data without len() one batch ahead: it waits for the fourth batch to
    # know whether the third is the last. The stop ends that wait at once; the third batch,
    # taken from the stream, is trained, and the fourth, sent after, is left in the stream.
    send, receive = anyio.create_memory_object_stream[Any](8)
    seen = Seen()
    trainer = make_trainer(seen, loader=receive, num_epochs=1)
    batches = numbered(4)
    with send, receive:
        async with anyio.create_task_group() as group:
            group.start_soon(trainer.fit)
            for batch in batches[:3]:
                await send.send(batch)
            await wait_for(lambda: trainer.state.global_step == 2)
            await anyio.sleep(0.2)  # (waiting for the fourth batch)
            started = time.perf_counter()
            trainer.stop("enough")
        assert time.perf_counter() - started < 5
        await send.send(batches[3])
        assert int(receive.receive_nowait()[0][0, 0]) == 3
    assert seen.numbers == [0, 1, 2]
    assert trainer.status is LoopStatus.FINISHED and not trainer.state.epoch_complete


def queue_of(batches: list[Any]) -> queue.Queue[Any]:
    items: queue.Queue[Any] = queue.Queue()
    for batch in batches:
        items.put(batch)
    return items


def drained(items: queue.Queue[Any]) -> Iterator[Any]:
    """A live stream: each batch is taken from the queue as it is read (``get`` blocks), up
    to a None."""
    while (batch := items.get()) is not None:
        yield batch


@pytest.mark.parametrize("prefetch", [0, 2], ids=["compute-thread", "data-thread"])
async def test_stop_at_a_boundary_trains_the_batch_an_iterator_read_ahead(prefetch: int) -> None:
    # A generator over a queue: stopped after step 2, the loop had already read batch 2 to
    # know whether batch 1 was the last; that batch was dropped, gone from the queue.
    items = queue_of(numbered(6))
    seen = Seen()
    trainer = make_trainer(StopAt(2), seen, loader=drained(items), num_epochs=1, prefetch=prefetch)
    await trainer.fit()
    assert seen.numbers == [0, 1, 2]
    assert int(items.get_nowait()[0][0, 0]) == 3, "no batch read past the one trained"


async def test_stop_at_a_boundary_drops_the_batch_a_re_iterable_read_ahead() -> None:
    # Data iterated anew each epoch is read again by a resumed run: a stop ends after the
    # step in progress, as with a list.
    seen = Seen()
    trainer = make_trainer(StopAt(2), seen, loader=Unsized(numbered(6)), num_epochs=1)
    await trainer.fit()
    assert seen.numbers == [0, 1]


class Stopped(NamedTuple):
    trainer: Trainer
    items: queue.Queue[Any]
    seen: Seen
    group: anyio.abc.TaskGroup


@contextlib.asynccontextmanager
async def stopped_while_its_data_thread_waits() -> AsyncIterator[Stopped]:
    """A trainer over a generator of a queue of 3 batches, its ``fit()`` in a task group,
    stopped after step 2 once its data thread waits in the queue's ``get()`` for a fourth."""
    items = queue_of(numbered(3))
    seen = Seen()
    trainer = make_trainer(seen, loader=drained(items), num_epochs=1)
    async with anyio.create_task_group() as group:
        group.start_soon(trainer.fit)
        await wait_for(lambda: trainer.state.global_step == 2)
        await anyio.sleep(0.2)  # (the data thread waits in the queue's get)
        trainer.stop()
        yield Stopped(trainer, items, seen, group)


async def test_stop_while_a_generator_blocks_on_the_data_thread_trains_the_batch_read() -> None:
    async with stopped_while_its_data_thread_waits() as run:
        await wait_for(lambda: run.trainer.state.global_step == 3)
        run.items.put(None)  # (the data thread, still waiting, returns: the loop has left)
    assert run.seen.numbers == [0, 1, 2]


async def test_a_batch_that_comes_after_a_stop_ended_the_wait_is_trained() -> None:
    # The data thread stays in the generator's get() after a stop ends the loop's wait: a
    # batch put on the queue within the 10 s the loop waits for that thread was taken from
    # it and dropped (the stream's). It is trained now, as the epoch's last step.
    async with stopped_while_its_data_thread_waits() as run:
        await wait_for(lambda: run.trainer.state.global_step == 3)  # (the batch read ahead)
        await anyio.sleep(0.2)
        run.items.put(numbered(4)[3])
    assert run.seen.numbers == [0, 1, 2, 3]
    assert run.items.empty()


async def test_a_batch_that_does_not_come_in_time_after_a_stop_is_not_waited_for_twice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("asynchat._prefetch.JOIN_TIMEOUT_S", 2.0)
    async with stopped_while_its_data_thread_waits() as run:
        stopped = time.monotonic()
        with pytest.warns(RuntimeWarning, match="did not return from __next__ within 2 s"):
            await wait_for(lambda: run.trainer.status.done)
        took = time.monotonic() - stopped
    assert run.seen.numbers == [0, 1, 2]
    assert took < 2 + 1.5, "waited once for the thread, not again as the epoch ended"
    with caplog.at_level("WARNING", logger="asynchat.loop"):
        run.items.put(numbered(4)[3])  # (too late: the thread, left blocked, takes it)
        await wait_for(lambda: "returned a batch after the loop had left" in caplog.text)
    await wait_for(lambda: engine_threads() == [])  # (it ends, having dropped it)


async def test_a_cancellation_ends_the_wait_for_a_batch_after_a_stop() -> None:
    # The second interrupt: the loop waits for the blocked read no more, nor as it leaves.
    with pytest.warns(RuntimeWarning, match="did not return from __next__"):
        async with stopped_while_its_data_thread_waits() as run:
            await wait_for(lambda: run.trainer.state.global_step == 3)  # (then it waits)
            cancelled = time.monotonic()
            run.group.cancel_scope.cancel()
    took = time.monotonic() - cancelled
    run.items.put(None)  # (the thread left blocked returns, and ends)
    await wait_for(lambda: engine_threads() == [])
    assert run.seen.numbers == [0, 1, 2]
    assert took < 5, f"took {took:.1f} s: the 10 s wait for the data thread"


async def test_cancelling_while_an_async_generator_waits_ends_at_once_and_closes_it() -> None:
    closed = anyio.Event()

    async def two_then_wait() -> AsyncIterator[Any]:
        try:
            for batch in numbered(2):
                yield batch
            await anyio.sleep_forever()
        finally:
            closed.set()

    trainer = make_trainer(loader=two_then_wait(), num_epochs=1)
    with anyio.move_on_after(0.5):
        await trainer.fit()
    assert trainer.status is LoopStatus.CANCELLED
    assert closed.is_set()
    assert trainer.state.global_step == 1, "the first step ran; the second's read waited"


async def test_an_async_generator_is_closed_as_a_loop_cancelled_between_reads_ends() -> None:
    # Cancelled at a step's boundary (not in a read), the generator was left suspended at a
    # yield for the garbage collector: trio's said "Async generator ... was garbage
    # collected before it had been exhausted", and its finally ran whenever that came.
    source = AsyncBatches(numbered(6))
    cancel = CancelAt(2)
    trainer = make_trainer(cancel, loader=source, num_epochs=1)
    with anyio.CancelScope() as cancel.scope:
        await trainer.fit()
    assert trainer.status is LoopStatus.CANCELLED and trainer.state.global_step == 2
    assert source.closed == 1


async def test_an_error_from_an_async_source_is_raised_as_itself_after_the_batches_before() -> None:
    async def broken() -> AsyncIterator[Any]:
        for batch in numbered(3):
            yield batch
        raise ConnectionError("the feed went away")

    seen = Seen()
    trainer = make_trainer(seen, loader=broken(), num_epochs=1)
    with pytest.raises(ConnectionError, match="the feed went away") as caught:
        await trainer.fit()
    assert seen.numbers == [0, 1, 2]
    assert any("reading its data" in note for note in caught.value.__notes__)


async def test_stop_inside_an_accumulation_window_waits_for_the_windows_batch() -> None:
    send, receive = anyio.create_memory_object_stream[Any](8)
    seen = Seen()
    model = make_model()
    processor = BasicBatchProcessor(nn.CrossEntropyLoss(), grad_accumulation_steps=2)
    trainer = Trainer(
        model, receive, sgd, batch_processor=processor, num_epochs=1, callbacks=[seen]
    )
    batches = numbered(3)
    with send, receive:
        async with anyio.create_task_group() as group:
            group.start_soon(trainer.fit)
            for batch in batches[:2]:
                await send.send(batch)
            await wait_for(lambda: trainer.state.global_step == 1)
            trainer.stop()
            await anyio.sleep(0.3)
            assert not trainer.status.done, f"the window's second batch is due: {trainer.status}"
            assert trainer.state.global_step == 1
            assert trainer.state.accumulating
            await send.send(batches[2])
    # Batch 1 closes the window; batch 2, read ahead of it from the stream, is trained too.
    assert seen.numbers == [0, 1, 2]
    assert not trainer.state.accumulating


async def test_a_predictor_streams_the_outputs_of_an_async_source() -> None:
    batches = list(make_loader(64, 16))
    model = make_model()
    predictor = Predictor(model, AsyncBatches(batches))
    async with contextlib.aclosing(predictor.stream()) as outputs:
        got = [out async for out in outputs]
    with torch.no_grad():
        want = [model.eval()(x) for x, _ in batches]
    assert len(got) == 4
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


async def test_validation_over_an_async_source_measures_what_it_does_over_a_list() -> None:
    batches = list(make_loader(48, 16, seed=1))
    results = []
    for data in (AsyncBatches(batches), batches):
        validation = Validation(data, loss_fn=nn.CrossEntropyLoss())
        trainer = make_trainer(validation, num_epochs=2)
        await trainer.fit()
        results.append(trainer.state.metrics["val/loss"])
    assert results[0] == results[1]


async def test_a_run_over_an_async_iterable_resumed_mid_epoch_equals_one_never_stopped(
    tmp_path: Path,
) -> None:
    batches = list(make_loader(96, 16, shuffle=False))
    stopped = make_trainer(
        StopAt(8), Checkpoint(tmp_path), loader=AsyncBatches(batches), num_epochs=2
    )
    await stopped.fit()
    assert stopped.state.global_step == 8
    resumed = make_trainer(loader=AsyncBatches(batches), num_epochs=2, resume_from=tmp_path)
    await resumed.fit()
    whole = make_trainer(loader=AsyncBatches(batches), num_epochs=2)
    await whole.fit()
    assert resumed.state.global_step == whole.state.global_step == 12
    assert same_weights(resumed.model, whole.model)


async def test_the_stream_example_learns_the_digits_from_its_feed(tmp_path: Path) -> None:
    example = load_example("digits_stream.py")
    start, steps, accuracy = await example.train(batches=300, every_ms=0, out=tmp_path)
    assert (start, steps) == (0, 300)
    assert accuracy > 0.9
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert listed["checkpoints"], "the most accurate weights are kept"


def test_the_stream_example_stopped_by_ctrl_c_goes_on_with_resume(tmp_path: Path) -> None:
    example = Path(__file__).parents[1] / "examples" / "digits_stream.py"
    process = subprocess.Popen(
        [sys.executable, str(example), "--every", "20", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    manifest = tmp_path / "checkpoints" / "manifest.json"
    wait_until(manifest.exists, process, "the first checkpoint (step 50)")
    process.send_signal(signal.SIGINT)
    out, err = finished(process)
    assert process.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    steps = int(out.split("trained to step ")[1].split()[0])
    assert 50 <= steps < 400
    resumed = subprocess.run(
        [sys.executable, str(example), "--resume", "--batches", "60", "--every", "0",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"trained to step {steps + 60} on the feed" in resumed.stdout, "none skipped"
    again = subprocess.run(  # the run has finished: its stream closed
        [sys.executable, str(example), "--resume", "--every", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert f"had finished (its feed closed at step {steps + 60}): nothing to resume" in (
        again.stderr
    )


class CoroutineAiter:
    async def __aiter__(self) -> Any:  # (a mistake: aiter() gives a coroutine)
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration


async def batches_of_a_feed() -> AsyncIterator[Any]:
    for batch in numbered(2):
        yield batch


def batches_of_a_file() -> Iterator[Any]:
    yield from numbered(2)


@pytest.mark.parametrize(
    ("data", "error"),
    [(CoroutineAiter(), "__aiter__ (CoroutineAiter.__aiter__) is an async def that returns"),
     (batches_of_a_feed, "the generator function batches_of_a_feed, not its batches: call it"),
     (batches_of_a_file, "the generator function batches_of_a_file, not its batches: call it")],
    ids=["async-def-aiter", "async-generator-function", "generator-function"],
)  # fmt: skip
def test_data_that_cannot_be_read_is_named_as_the_loop_is_made(data: Any, error: str) -> None:
    # Found only as the first epoch began: "aiter() returned not an async iterator of type
    # 'coroutine'" (and a coroutine never awaited); "must be iterable ..., got function".
    with pytest.raises(TypeError, match=re.escape(error)):
        make_trainer(loader=data, num_epochs=1)


@pytest.mark.parametrize("kind", ["generator", "async-generator"])
async def test_validation_over_data_read_once_that_would_run_twice_is_refused_at_start(
    kind: str,
) -> None:
    # The second validation failed with "yielded no batch", an epoch of training later.
    def data() -> Any:
        if kind == "generator":
            return iter(numbered(2))
        return AsyncBatches(numbered(2)).__aiter__()

    validation = Validation(data(), loss_fn=nn.CrossEntropyLoss())
    trainer = make_trainer(validation, num_epochs=2)
    with pytest.raises(ValueError, match=r"read once, but it validates more than once"):
        await trainer.fit()
    assert trainer.state.global_step == 0
    once = make_trainer(Validation(data(), loss_fn=nn.CrossEntropyLoss()), num_epochs=1)
    state = await once.fit()
    assert "val/loss" in state.metrics


async def test_a_save_waited_for_in_a_read_of_async_data_is_refused_naming_the_read(
    tmp_path: Path,
) -> None:
    # The loop waits for the read, and the save is made at the step's boundary after it:
    # refused rather than waited for forever, but as if a hook had waited ("the hook
    # waiting for it").
    checkpoint = Checkpoint(tmp_path)

    async def saves_midway() -> AsyncIterator[Any]:
        for i, batch in enumerate(numbered(4)):
            if i == 2:
                await checkpoint.request_save()
            yield batch

    trainer = make_trainer(checkpoint, loader=saves_midway(), num_epochs=1)
    with pytest.raises(RuntimeError, match=r"once the read of a batch waiting for it") as caught:
        await trainer.fit()
    assert "reading its data" in caught.value.__notes__[0]
    assert trainer.state.global_step == 2, "batches 0 and 1, read before the error, trained"


@pytest.mark.parametrize("kind", ["stream", "generator"])
async def test_a_run_resumed_over_data_read_once_drops_none_of_its_batches(
    tmp_path: Path, kind: str
) -> None:
    # A stream goes on: the resumed run's stream holds new batches, and the run read and
    # dropped as many of them as the interrupted epoch had trained (3 of 4 here), silently.
    def feed(numbers: range) -> Any:
        batches = [numbered(20)[n] for n in numbers]
        if kind == "generator":
            return iter(batches)
        send, receive = anyio.create_memory_object_stream[Any](len(batches))
        with send:
            for batch in batches:
                send.send_nowait(batch)
        return receive

    first = make_trainer(StopAt(2), Checkpoint(tmp_path), loader=feed(range(5)), num_epochs=1)
    await first.fit()
    stopped_at = first.state.global_step  # (2, and the batch read ahead: 3)
    seen = Seen()
    data = feed(range(10, 14))
    resumed = make_trainer(seen, loader=data, num_epochs=1, resume_from=tmp_path)
    await resumed.fit()
    assert seen.numbers == [10, 11, 12, 13]
    assert resumed.state.global_step == stopped_at + 4
    for stream in (first.data_loader, data):
        if kind == "stream":
            stream.close()
