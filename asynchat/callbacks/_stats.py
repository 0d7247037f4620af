"""StatsMonitor (step time, throughput, time waiting for data, ETA) and LossMonitor (the
mean training losses of each interval)."""

from __future__ import annotations

import time
from typing import Any

import torch

from asynchat._callback import Callback
from asynchat._checks import positive_int, text
from asynchat._every import every_n_steps
from asynchat._state import LoopState
from asynchat._transfer import HostCopy


class StatsMonitor(Callback):
    """Publishes timing statistics to ``state.metrics`` every ``every_n_steps`` steps.

    ``stats/step_time`` (seconds per step), ``stats/samples_per_s``, ``stats/data_wait``
    (the fraction of the time spent waiting for batches; high means the data loader is the
    bottleneck) and ``stats/eta_s`` (seconds to the end, when the loop's length is known),
    averaged over the last interval, less the time the loop was held by ``pause()`` (before,
    the interval of a pause reported its hold as step time). Host wall-clock only: on a GPU
    the figures include the queue of work in flight and settle after the first interval. In
    a distributed trainer they are each rank's own (``state.metrics.is_per_rank``).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps

    def on_loop_begin(self, state: LoopState) -> None:
        self._start_interval(state)

    def _start_interval(self, state: LoopState) -> None:
        self._since = time.perf_counter()
        self._paused_before = state.loop.paused_s
        self._steps = 0
        self._samples = 0
        self._data_time = 0.0

    def on_step_begin(self, state: LoopState) -> None:
        self._samples += state.loop.samples_in(state.batch)
        self._data_time += state.data_time

    def on_step_end(self, state: LoopState) -> None:
        self._steps += 1
        if self._steps >= self.every_n_steps:
            self.publish(state)

    def on_epoch_end(self, state: LoopState) -> None:
        if self._steps:
            self.publish(state)

    def publish(self, state: LoopState) -> None:
        paused = state.loop.paused_s - self._paused_before
        elapsed = max(time.perf_counter() - self._since - paused, 1e-9)
        step_time = elapsed / self._steps
        values = {
            "stats/step_time": step_time,
            "stats/samples_per_s": self._samples / elapsed,
            "stats/data_wait": min(1.0, self._data_time / elapsed),
        }
        remaining = _remaining_steps(state)
        if remaining is not None:
            values["stats/eta_s"] = remaining * step_time
        state.metrics.update_per_rank(values)  # this rank's clock
        self._start_interval(state)


def _remaining_steps(state: LoopState) -> int | None:
    if state.num_steps is not None:
        return max(0, state.num_steps - state.global_step)
    if state.num_epochs is not None and state.steps_per_epoch is not None:
        return max(0, state.num_epochs * state.steps_per_epoch - state.global_step)
    return None


def step_losses(state: LoopState) -> dict[str, torch.Tensor]:
    """The step's losses by scalar name: ``loss`` (``state.loss``) and ``loss/<name>`` for each
    of ``state.losses`` (a step with several updates), detached, still on the device."""
    losses = {f"loss/{name}": loss.detach() for name, loss in state.losses.items()}
    if state.loss is not None:
        losses["loss"] = state.loss.detach()
    return losses


class LossMonitor(Callback):
    """Publishes the mean training losses of every ``every_n_steps`` steps to
    ``state.metrics``, so :class:`Progress`, the loggers and ``loop.snapshot()`` show them.

    ``train/mean_loss`` is the mean of ``state.loss`` over the interval, and
    ``train/mean_loss/<name>`` the mean of each of ``state.losses`` (a step with several
    updates, e.g. a GAN's ``d`` and ``g``). The sums stay on the device; at the end of each
    interval their means are copied to the host without waiting and published once they have
    landed (checked without blocking at later steps, waited for at the end of each epoch), so
    the monitor costs no host/device sync per step and a figure appears at most an interval
    late on a GPU. (The loggers write each logged step's own losses as ``train/loss...``.)

    The interval in progress is kept in checkpoints, so a run stopped inside it and resumed
    publishes the mean of the whole interval, as an uninterrupted run does (in a distributed
    trainer each rank's, whose losses are its own: ``state_per_rank``); at the loop's end
    the mean of the interval so far is published.

    In a distributed trainer the means are each rank's own, of its own losses
    (``state.metrics.is_per_rank``): shown and logged (rank 0's), and an
    :class:`EarlyStopping` on them stops every rank when one rank's stops improving, but an
    :class:`LRSchedule` refuses to follow them (the ranks would train at different rates).
    On a GPU a mean is published when its copy has landed, so the step it appears at
    depends on timing: what acts on it (a plateau schedule, early stopping) acts at that
    step, which may differ from run to run.
    """

    state_per_rank = True

    def __init__(self, every_n_steps: int = 50, *, prefix: str = "train/mean_") -> None:
        positive_int("every_n_steps", every_n_steps)
        text("prefix", prefix)
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._pending: list[HostCopy[dict[str, torch.Tensor]]] = []
        self._loaded: tuple[dict[str, torch.Tensor], dict[str, int]] | None = None

    def on_loop_begin(self, state: LoopState) -> None:
        sums, counts = self._loaded if self._loaded is not None else ({}, {})
        self._sums = {name: total.to(state.device) for name, total in sums.items()}
        self._counts, self._pending, self._loaded = dict(counts), [], None

    def on_step_end(self, state: LoopState) -> None:
        for name, loss in step_losses(state).items():
            total = self._sums.get(name)
            value = loss.float()
            self._sums[name] = value.clone() if total is None else total.add_(value)
            self._counts[name] = self._counts.get(name, 0) + 1
        if every_n_steps(state, self.every_n_steps):
            self._close_interval()
        self._publish(state, wait=False)

    def on_epoch_end(self, state: LoopState) -> None:
        self._publish(state, wait=True)

    def on_loop_end(self, state: LoopState) -> None:
        self._close_interval(keep=True)  # a resumed run goes on with it
        self._publish(state, wait=True)

    def _close_interval(self, *, keep: bool = False) -> None:
        if self._sums:
            means = {name: total / self._counts[name] for name, total in self._sums.items()}
            self._pending.append(HostCopy(means))
        if not keep:
            self._sums, self._counts = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self._sums), "counts": dict(self._counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = (dict(state_dict["sums"]), dict(state_dict["counts"]))

    def _publish(self, state: LoopState, *, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].ready()):
            means = self._pending.pop(0).wait()
            state.metrics.update_per_rank(  # this rank's losses alone
                {self.prefix + name: float(v) for name, v in means.items()}
            )
