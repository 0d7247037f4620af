"""Callbacks that record what the engine did, for the tests."""

from __future__ import annotations

import threading
from typing import Any

from asynchat import Callback, LoopState, Phase

ALL_PHASES = [phase.value for phase in Phase]


class Recorder(Callback):
    """Records (phase, epoch, step, global_step, thread name) for every phase, as ``def`` hooks."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int, str]] = []

    def record(self, state: LoopState) -> None:
        assert state.phase is not None
        self.events.append(
            (
                state.phase.value,
                state.epoch,
                state.step,
                state.global_step,
                threading.current_thread().name,
            )
        )

    def phases(self) -> list[str]:
        return [event[0] for event in self.events]

    def count(self, phase: str) -> int:
        return self.phases().count(phase)


def _make_sync(name: str) -> Any:
    def hook(self: Recorder, state: LoopState) -> None:
        self.record(state)

    hook.__name__ = name
    return hook


def _make_async(name: str) -> Any:
    async def hook(self: Recorder, state: LoopState) -> None:
        self.record(state)

    hook.__name__ = name
    return hook


SyncRecorder = type("SyncRecorder", (Recorder,), {p: _make_sync(p) for p in ALL_PHASES})
AsyncRecorder = type("AsyncRecorder", (Recorder,), {p: _make_async(p) for p in ALL_PHASES})


def expected_phases(
    steps_per_epoch: list[int], batches_per_step: int = 1, *, training: bool = True
) -> list[str]:
    """The phase sequence of a loop whose epochs ran the given numbers of steps (each step
    of a trainer ending in an optimizer update)."""
    out = ["on_loop_begin"]
    for steps in steps_per_epoch:
        out.append("on_epoch_begin")
        for _ in range(steps):
            out.append("on_step_begin")
            out += ["on_batch_begin", "on_batch_end"] * batches_per_step
            out += ["on_before_update"] if training else []
            out.append("on_step_end")
        out.append("on_epoch_end")
    out.append("on_loop_end")
    return out
