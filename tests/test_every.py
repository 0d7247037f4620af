"""@every(steps=n | epochs=n): a hook that runs only when due, decided on the compute thread,
so an ``async def`` hook costs no hop to the event loop on the steps between."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import make_trainer

from asynchat import Callback, LoopState, every
from asynchat._compute import ComputeThread
from asynchat.callbacks import Checkpoint

pytestmark = pytest.mark.anyio


class EveryThird(Callback):
    """Records (phase, global_step, epoch, thread) at the hooks it marks @every(steps=3)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, str]] = []

    def _record(self, phase: str, state: LoopState) -> None:
        self.calls.append((phase, state.global_step, state.epoch, threading.current_thread().name))

    @every(steps=3)
    async def on_step_end(self, state: LoopState) -> None:
        self._record("on_step_end", state)

    @every(steps=3)
    def on_step_begin(self, state: LoopState) -> None:
        self._record("on_step_begin", state)

    @every(steps=3)
    async def on_batch_end(self, state: LoopState) -> None:
        self._record("on_batch_end", state)

    @every(epochs=2)
    async def on_epoch_end(self, state: LoopState) -> None:
        self._record("on_epoch_end", state)

    @every(epochs=2)
    def on_epoch_begin(self, state: LoopState) -> None:
        self._record("on_epoch_begin", state)


async def test_hooks_run_on_every_nth_step_and_epoch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    hops = 0
    call_async = ComputeThread.call_async

    def counting(self: ComputeThread, fn: Any) -> Any:
        nonlocal hops
        hops += 1
        return call_async(self, fn)

    monkeypatch.setattr(ComputeThread, "call_async", counting)
    hooks = EveryThird()
    state = await make_trainer(hooks, num_epochs=5).fit()  # 6 steps an epoch: 30 steps
    assert state.global_step == 30

    def at(phase: str) -> list[tuple[int, int]]:
        return [(step, epoch) for p, step, epoch, _ in hooks.calls if p == phase]

    # The n-th step of the loop is the one that makes global_step n (counted at on_step_end,
    # one ahead before it): steps 3, 6, ..., 30.
    assert at("on_step_end") == [(s, (s - 1) // 6) for s in range(3, 31, 3)]
    assert at("on_step_begin") == [(s - 1, (s - 1) // 6) for s in range(3, 31, 3)]
    assert at("on_batch_end") == at("on_step_begin")
    assert at("on_epoch_begin") == [(6, 1), (18, 3)]  # the 2nd and 4th epochs
    assert at("on_epoch_end") == [(12, 1), (24, 3)]
    # async hooks on the event loop, def hooks on the compute thread, as without @every
    threads = {p: {t for q, _, _, t in hooks.calls if q == p} for p, *_ in hooks.calls}
    loop = threading.current_thread().name
    assert threads["on_step_end"] == threads["on_batch_end"] == {loop}
    assert threads["on_step_begin"] == threads["on_epoch_begin"] != {loop}
    # One hop per due async hook, and none on the steps between.
    assert hops == len(at("on_step_end")) + len(at("on_batch_end")) + len(at("on_epoch_end"))


async def test_an_epoch_cut_short_is_acted_on_by_the_run_that_finishes_it(tmp_path: Path) -> None:
    class StopInSecondEpoch(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 8:
                state.loop.stop()

    def epoch_ends(hooks: EveryThird) -> list[tuple[int, int]]:
        return [(step, epoch) for phase, step, epoch, _ in hooks.calls if phase == "on_epoch_end"]

    hooks = EveryThird()
    checkpoint = Checkpoint(tmp_path, save_on_end=True)
    await make_trainer(StopInSecondEpoch(), hooks, checkpoint, num_epochs=3).fit()
    assert epoch_ends(hooks) == []  # the second epoch ended at step 8, incomplete
    hooks = EveryThird()
    await make_trainer(hooks, Checkpoint(tmp_path), num_epochs=3, resume_from=tmp_path).fit()
    assert epoch_ends(hooks) == [(12, 1)]  # the resumed run finishes it


def test_bad_every_arguments_name_themselves() -> None:
    with pytest.raises(TypeError, match=r"one of steps=\.\.\. or epochs=\.\.\., got steps=None"):
        every()
    with pytest.raises(TypeError, match=r"got steps=2, epochs=3"):
        every(steps=2, epochs=3)
    with pytest.raises(ValueError, match=r"steps must be a positive int or None, got 0"):
        every(steps=0)
    with pytest.raises(ValueError, match=r"epochs must be a positive int or None, got 1\.5"):
        every(epochs=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"decorates a hook method, got 3"):
        every(steps=2)(3)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("rule", "phase", "message"),
    [
        (every(steps=2), "on_epoch_end", r"@every\(steps=2\) applies to step-level hooks"),
        (every(epochs=2), "on_step_end", r"@every\(epochs=2\) applies to on_epoch_begin and"),
        (every(steps=2), "on_loop_begin", r"@every\(steps=2\) .* not to on_loop_begin"),
        (every(epochs=1), "on_loop_end", r"@every\(epochs=1\) .* not to on_loop_end"),
    ],
)
def test_every_on_a_phase_it_does_not_fit_is_refused_when_the_loop_is_built(
    rule: Any, phase: str, message: str
) -> None:
    def hook(self: Callback, state: LoopState) -> None:
        pass

    callback = type("Misplaced", (Callback,), {phase: rule(hook)})()
    with pytest.raises(TypeError, match=rf"Misplaced\.{phase}: {message}"):
        make_trainer(callback)
