"""The engine's cost per step against the hand-written loop, measured in pairs (CPU).

``step_overhead.py`` interleaves rounds of every variant; on a VM whose speed drifts by
tens of percent between seconds its medians still move a lot. Here each engine run is
paired with a hand-written run right before or after it (the order alternates), and the
table shows the median and quartiles of the per-pair ratios, which the drift mostly
cancels out of. Same model as ``step_overhead.py`` (``nn.Linear(32, 32)``, batch 32, Adam,
one torch thread), default engine settings, uvloop; over ready batches (a list) and over a
shuffled ``DataLoader`` without workers. Then the fixed cost of one ``fit()`` (one step):
from ``anyio.run`` to its return, and inside an event loop that runs on (a service's case,
where the compute thread of the last loop is reused). Last, the engine's own Python per step
with a no-op step (a batch processor that only runs the batch phases, against a plain
``for`` loop calling the same function): at the CUDA-graph floor (about 0.1 ms a step on an
H100) the host must stay under the device's time per step, and this is what it spends.

Run: python benchmarks/paired_overhead.py [--pairs 30] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import torch
from _common import machine, median, table
from step_overhead import UVLOOP, data_loader, hand_written, model_and_optimizer, ready_batches
from torch import nn

from asynchat import BatchProcessor, LoopState, Phase, Trainer
from asynchat._processor import RunPhase


def engine(data: Iterable[Any], steps: int) -> float:
    model, optimizer = model_and_optimizer()
    trainer = Trainer(model, data, optimizer, loss_fn=nn.MSELoss(), num_epochs=1, device="cpu")
    start = time.perf_counter()
    anyio.run(trainer.fit, backend="asyncio", backend_options=UVLOOP)
    return (time.perf_counter() - start) / steps


def one_step_trainer() -> Trainer:
    model, optimizer = model_and_optimizer()
    return Trainer(
        model, ready_batches(1), optimizer, loss_fn=nn.MSELoss(), num_epochs=1, device="cpu"
    )


def fixed_costs(fits: int) -> tuple[float, float]:
    """Median seconds of a one-step fit(): with its own anyio.run; inside a running loop."""
    alone = []
    for _ in range(fits):
        trainer = one_step_trainer()
        start = time.perf_counter()
        anyio.run(trainer.fit, backend="asyncio", backend_options=UVLOOP)
        alone.append(time.perf_counter() - start)

    async def in_a_loop() -> list[float]:
        seconds = []
        for _ in range(fits):
            trainer = one_step_trainer()
            start = time.perf_counter()
            await trainer.fit()
            seconds.append(time.perf_counter() - start)
        return seconds

    inside = anyio.run(in_a_loop, backend="asyncio", backend_options=UVLOOP)
    return median(alone[3:]), median(inside[3:])


class NoOpStep(BatchProcessor):
    """A step that does no torch work: the batch phases, and the batch as the outputs (no
    update, on purpose: the engine warns of that once a run, which is not measured)."""

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        run_phase(Phase.ON_BATCH_BEGIN)
        state.outputs = state.batch
        run_phase(Phase.ON_BATCH_END)


def no_op_step(batch: Any) -> Any:
    return batch


def engine_no_op(steps: int) -> float:
    model = nn.Linear(1, 1)
    trainer = Trainer(
        model, list(range(steps)), torch.optim.SGD(model.parameters()), num_epochs=1,
        batch_processor=NoOpStep(samples=lambda batch: 1), device="cpu",
    )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "NoOpStep.step made no update", RuntimeWarning)
        anyio.run(trainer.fit, backend="asyncio", backend_options=UVLOOP)
    return (time.perf_counter() - start) / steps


def hand_written_no_op(steps: int) -> float:
    data = list(range(steps))
    start = time.perf_counter()
    for batch in data:
        no_op_step(batch)
    return (time.perf_counter() - start) / steps


def paired(
    first: Callable[[], float], second: Callable[[], float], pairs: int
) -> tuple[list[float], list[float]]:
    """``pairs`` runs of each, back to back, alternating which goes first."""
    for _ in range(3):  # warm-up
        first(), second()
    a, b = [], []
    for i in range(pairs):
        if i % 2:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = args.steps
    sources: dict[str, Callable[[], Iterable[Any]]] = {
        "ready batches": lambda: ready_batches(steps),
        "DataLoader": lambda: data_loader(steps),
    }
    rows = []
    for name, make in sources.items():
        ours, theirs = paired(
            lambda make=make: engine(make(), steps),
            lambda make=make: hand_written(make(), steps),
            args.pairs,
        )
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        q1, _, q3 = statistics.quantiles(ratios)
        rows.append((
            name, f"{median(theirs) * 1e6:.1f}", f"{median(ours) * 1e6:.1f}",
            f"{(median(ours) - median(theirs)) * 1e6:.1f}",
            f"{median(ratios):.3f}x", f"{q1:.3f}-{q3:.3f}",
        ))  # fmt: skip
    one, inside = fixed_costs(40)
    engine_floor, loop_floor = paired(
        lambda: engine_no_op(10 * steps), lambda: hand_written_no_op(10 * steps), args.pairs
    )
    print(f"machine: {machine()}")
    print(f"nn.Linear(32, 32), batch 32, Adam, 1 torch thread, uvloop; {args.pairs} pairs of "
          f"{steps}-step runs, engine at default settings")  # fmt: skip
    print(table(["data", "hand-written us/step", "engine us/step", "difference us",
                 "paired ratio (median)", "quartiles"], rows))  # fmt: skip
    print(
        f"one fit() of one step, from anyio.run to its return: {one * 1e3:.2f} ms "
        f"(in the runs above: {one / steps * 1e6:.1f} us a step); inside a running event "
        f"loop: {inside * 1e3:.2f} ms"
    )
    print(
        f"a no-op step, {10 * steps} steps a run: the engine {median(engine_floor) * 1e6:.1f} us "
        f"a step, a plain for loop {median(loop_floor) * 1e6:.2f} us (fit()'s fixed cost "
        f"included: {one / (10 * steps) * 1e6:.1f} us a step)"
    )


if __name__ == "__main__":
    main()
