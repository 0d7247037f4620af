"""A job for the signal-handler tests: stop() or pause() from a handler installed with
signal.signal, the signal raised where the main thread is in the middle of a change (where a
real signal's handler may run: between any two bytecodes of the main thread).

python signal_handler_job.py WHERE BACKEND   # WHERE: "stop" or "pause" in a status change
                                             # made on the event loop, "subscribe": stop() in
                                             # a subscription to the loop's events (inside
                                             # the hub's lock)
"""

from __future__ import annotations

import signal
import sys
import threading

import anyio
from conftest import make_trainer

from asynchat import LoopStatus


class RaisingLock:
    """A lock that raises SIGUSR1 in this thread once held, the first time."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock, self.armed = lock, True

    def __enter__(self) -> None:
        self.lock.acquire()
        if self.armed:
            self.armed = False
            signal.raise_signal(signal.SIGUSR1)

    def __exit__(self, *exc_info: object) -> None:
        self.lock.release()

    def acquire(self, blocking: bool = True) -> bool:
        return self.lock.acquire(blocking)

    def release(self) -> None:
        self.lock.release()


async def main(where: str) -> None:
    trainer = make_trainer(num_epochs=100_000)
    if where == "pause":
        signal.signal(signal.SIGUSR1, lambda signum, frame: trainer.pause())
    else:
        signal.signal(signal.SIGUSR1, lambda signum, frame: trainer.stop("SIGUSR1"))
    seen: list[LoopStatus] = []
    on_status = trainer._control._on_status

    def raising(status: LoopStatus) -> None:  # (called inside the change)
        on_status(status)
        seen.append(status)
        if status is LoopStatus.RUNNING and len(seen) == 1 and where != "subscribe":
            assert threading.current_thread() is threading.main_thread()
            signal.raise_signal(signal.SIGUSR1)  # its handler runs here, in the change
        elif status is LoopStatus.PAUSED:
            threading.Timer(0.2, trainer.resume).start()
        elif status is LoopStatus.RUNNING and LoopStatus.PAUSED in seen:
            threading.Timer(0.1, trainer.stop, args=("resumed",)).start()

    trainer._control._on_status = raising
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.fit)
        if where == "subscribe":
            await anyio.sleep(0.1)
            watching = trainer.events()  # (a subscriber, so that a status change publishes)
            trainer._events._lock = RaisingLock(trainer._events._lock)  # type: ignore[assignment]
            trainer.events()
            await watching.aclose()
    print(" ".join(status.value for status in seen), trainer.state.stop_reason, flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], backend=sys.argv[2])
