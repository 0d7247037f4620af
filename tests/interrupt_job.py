"""A job for the Ctrl-C tests: trains until SIGINT arrives, with no signal handling of its own.

    python interrupt_job.py BACKEND DIRECTORY [asynchook] [slowend] [failend] [window]
                                              [asyncfeed]

Prints ``training`` once steps run, and after fit() raised: the exception, the loop's status
and its global step. With ``slowend`` an ``async def`` on_loop_end hook prints ``winding down``
and then sleeps 60 s, so that a second Ctrl-C can cut it short; with ``failend`` a ``def``
on_loop_end hook after it raises ``RuntimeError("the teardown failed")``; with ``window`` the
whole run is one gradient-accumulation window (200000 steps), which a first Ctrl-C waits for;
with ``asyncfeed`` the data is an async generator that yields 5 batches, prints ``waiting for
data`` and waits forever for a sixth.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import torch
from conftest import make_loader, make_model, make_trainer, sgd

from asynchat import BasicBatchProcessor, Callback, LoopState, Trainer
from asynchat.callbacks import Checkpoint


class Announce(Callback):
    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == 3:
            print("training", flush=True)


class AsyncStep(Callback):
    async def on_step_end(self, state: LoopState) -> None:
        await anyio.lowlevel.checkpoint()


class SlowEnd(Callback):
    async def on_loop_end(self, state: LoopState) -> None:
        print("winding down", flush=True)
        await anyio.sleep(60)


class Feed:
    """Async data: 5 batches, then a wait for a sixth that never comes."""

    def __aiter__(self) -> Any:
        return self._items()

    async def _items(self) -> Any:
        for batch in list(make_loader())[:5]:
            yield batch
        print("waiting for data", flush=True)
        await anyio.sleep_forever()


class FailEnd(Callback):
    def on_loop_end(self, state: LoopState) -> None:
        raise RuntimeError("the teardown failed")


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks, if it hangs
    backend, directory, options = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    callbacks: list[Callback] = [Announce()]
    if "asynchook" in options:
        callbacks.append(AsyncStep())
    if "slowend" in options:
        callbacks.append(SlowEnd())
    if "failend" in options:
        callbacks.append(FailEnd())
    callbacks.append(Checkpoint(directory, every_n_steps=50))
    if "window" in options:
        model = make_model()
        trainer = Trainer(
            model, [next(iter(make_loader()))] * 200_000, sgd, num_epochs=1, callbacks=callbacks,
            batch_processor=BasicBatchProcessor(
                torch.nn.CrossEntropyLoss(), grad_accumulation_steps=1_000_000
            ),
        )  # fmt: skip
    elif "asyncfeed" in options:
        trainer = make_trainer(*callbacks, loader=Feed(), num_epochs=1)
    else:
        trainer = make_trainer(*callbacks, num_epochs=1_000_000)
    name, options_ = (backend, {}) if backend != "uvloop" else ("asyncio", {"use_uvloop": True})
    try:
        anyio.run(trainer.fit, backend=name, backend_options=options_)
    except KeyboardInterrupt:
        print(f"KeyboardInterrupt {trainer.status} {trainer.state.global_step}", flush=True)
    else:
        print(f"returned {trainer.status} {trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main()
