"""The engine's own work per step, counted in Python bytecodes: deterministic, unlike time.

What a step of the engine costs over a hand-written loop is its own Python (the step loop,
the phases, the processor's step API); timing it on a shared machine moves by 10-40% between
runs (``benchmarks/paired_overhead.py``), counting the bytecodes it runs does not move at
all. The budgets below hold the per-step path to what it is, with some room: a regression
like a context manager built per step, a heartbeat per phase or a decision taken through
three calls shows up here as a failure rather than as noise in a benchmark.
"""

from __future__ import annotations

import collections
import sys
import types
from pathlib import Path
from typing import Any

import anyio
import torch
from torch import nn

import asynchat
from asynchat import Callback, LoopState, Phase, Trainer

PACKAGE = str(Path(asynchat.__file__).parent)


class CountBytecodes(Callback):
    """Counts the bytecodes the compute thread runs in asynchat's own files, per function,
    from ``on_loop_begin`` to ``on_loop_end``."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def _trace(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if not code.co_filename.startswith(PACKAGE):
            return None  # not ours: neither its lines nor its bytecodes
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.counts[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
        return self._trace

    def on_loop_begin(self, state: LoopState) -> None:
        sys.settrace(self._trace)  # this thread's frames from now on

    def on_loop_end(self, state: LoopState) -> None:
        sys.settrace(None)


class DefHook(Callback):
    def on_step_end(self, state: LoopState) -> None:
        pass


def bytecodes(steps: int, *callbacks: Callback) -> collections.Counter[str]:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    batches = [(torch.randn(2, 4), torch.randn(2, 4)) for _ in range(steps)]
    counter = CountBytecodes()
    trainer = Trainer(
        model,
        batches,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.MSELoss(),
        num_epochs=1,
        callbacks=[counter, *callbacks],
        device="cpu",
    )
    anyio.run(trainer.fit)
    return counter.counts


def per_step(*callbacks: Callback) -> tuple[float, list[tuple[str, float]]]:
    """Bytecodes per step of asynchat's code, and the functions that run them: the
    difference of a 20-step and a 60-step run, so a run's fixed cost drops out, after a
    first run that is not counted: on Python 3.12 the first traced run of a path counts
    more of its bytecodes than the runs after it (829.125 a step without it, not an integer;
    534 with it, at the time), on 3.11 as many."""
    bytecodes(20, *callbacks)
    short, long = bytecodes(20, *callbacks), bytecodes(60, *callbacks)
    each = {name: (long[name] - short[name]) / 40 for name in long}
    top = sorted(((n, c) for n, c in each.items() if c), key=lambda item: -item[1])
    return sum(each.values()), top


def test_the_engine_runs_few_bytecodes_of_its_own_per_step() -> None:
    """A Trainer on the CPU without hooks: 586 a step on Python 3.11, 546 on 3.12 (3 for
    the check of several optimizers; on 3.11: 573 before the batch was split through
    ``split_for``, for ``model_loss``; 556 before
    the step asked whether its optimizer evaluates the loss again, as LBFGS does; 747
    before the change that introduced this test: silent phases, the idle boundary, no
    staging on the CPU)."""
    total, top = per_step()
    assert 300 < total < 650, f"{total:.0f} bytecodes a step, in {top}"
    assert total == int(total), "every step of a run runs the same code"


def test_a_def_hook_costs_its_call_and_no_more() -> None:
    """A hook at one step-level phase: that phase runs its hooks; the others stay silent."""
    plain, _ = per_step()
    hooked, top = per_step(DefHook())
    assert 0 < hooked - plain < 80, f"{hooked - plain:.0f} more bytecodes a step, in {top}"


def test_silent_phases_still_record_where_the_loop_is() -> None:
    """A phase without hooks is recorded in state.phase (an error's note reads it)."""
    seen = []

    class Boom(Exception):
        pass

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(trainer.state.phase)
        raise Boom

    model = nn.Linear(4, 4)
    trainer = Trainer(
        model,
        [(torch.randn(2, 4), torch.randn(2, 4))],
        torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=loss_fn,
        num_epochs=1,
        device="cpu",
    )
    try:
        anyio.run(trainer.fit)
    except Boom as exc:
        assert any("phase on_batch_begin" in note for note in exc.__notes__), exc.__notes__
    else:
        raise AssertionError("the loss function's error reached fit()")
    assert seen == [Phase.ON_BATCH_BEGIN]
