"""StatsMonitor: step time, throughput, time waiting for data, and ETA."""

from __future__ import annotations

import time

from asynchat._callback import Callback
from asynchat._checks import positive_int
from asynchat._state import LoopState
from asynchat._tree import batch_size


class StatsMonitor(Callback):
    """Publishes timing statistics to ``state.metrics`` every ``every_n_steps`` steps.

    ``stats/step_time`` (seconds per step), ``stats/samples_per_s``, ``stats/data_wait``
    (the fraction of the time spent waiting for batches; high means the data loader is the
    bottleneck) and ``stats/eta_s`` (seconds to the end, when the loop's length is known),
    averaged over the last interval. Host wall-clock only: on a GPU the figures include the
    queue of work in flight and settle after the first interval.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps

    def on_loop_begin(self, state: LoopState) -> None:
        self._start_interval()

    def _start_interval(self) -> None:
        self._since = time.perf_counter()
        self._steps = 0
        self._samples = 0
        self._data_time = 0.0

    def on_step_begin(self, state: LoopState) -> None:
        self._samples += batch_size(state.batch)
        self._data_time += state.data_time

    def on_step_end(self, state: LoopState) -> None:
        self._steps += 1
        if self._steps >= self.every_n_steps:
            self.publish(state)

    def on_epoch_end(self, state: LoopState) -> None:
        if self._steps:
            self.publish(state)

    def publish(self, state: LoopState) -> None:
        elapsed = max(time.perf_counter() - self._since, 1e-9)
        step_time = elapsed / self._steps
        state.metrics["stats/step_time"] = step_time
        state.metrics["stats/samples_per_s"] = self._samples / elapsed
        state.metrics["stats/data_wait"] = min(1.0, self._data_time / elapsed)
        remaining = _remaining_steps(state)
        if remaining is not None:
            state.metrics["stats/eta_s"] = remaining * step_time
        self._start_interval()


def _remaining_steps(state: LoopState) -> int | None:
    if state.num_steps is not None:
        return max(0, state.num_steps - state.global_step)
    if state.num_epochs is not None and state.steps_per_epoch is not None:
        return max(0, state.num_epochs * state.steps_per_epoch - state.global_step)
    return None
