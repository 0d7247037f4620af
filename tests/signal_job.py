"""A job for the signal test: trains until SIGTERM, then stops with a final checkpoint.

python signal_job.py BACKEND DIRECTORY [reload]   # reload: SIGHUP handled by the program
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio
from conftest import make_trainer

from asynchat import Callback, LoopState, stop_on_signals
from asynchat.callbacks import Checkpoint


class Announce(Callback):
    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == 3:
            print("training", flush=True)


async def main(directory: Path) -> None:
    trainer = make_trainer(Announce(), Checkpoint(directory), num_epochs=100_000)
    async with stop_on_signals(trainer):
        state = await trainer.fit()
    print(f"stopped: {state.stop_reason} at step {state.global_step}", flush=True)


if __name__ == "__main__":
    if sys.argv[3:] == ["reload"]:  # a daemon's SIGHUP: reload its configuration
        signal.signal(signal.SIGHUP, lambda signum, frame: print("reloaded", flush=True))
    anyio.run(main, Path(sys.argv[2]), backend=sys.argv[1])
