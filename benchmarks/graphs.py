"""The launch bound: CUDA-graph steps and compiled steps against eager and the graph floor.

The workloads of ``gpu.py`` (an MLP at batch 256; ResNet-18 on 3x32x32 at batch 256, fp32
and bf16), with the batches already on the device (a list of them), SGD with momentum,
trained by:

- eager engine: ``BasicBatchProcessor``;
- graph processor: ``CudaGraphBatchProcessor`` (3 eager warm-up updates, then replays);
- compiled engine: ``BasicBatchProcessor(compile={"mode": "reduce-overhead"})``;
- the floor: a hand-written whole-step CUDA graph (static inputs, one ``replay()`` a step).

Each engine run is timed from the end of its step 10 (the device synchronized there, on
the compute thread) to its end, so what is measured is the steady state: not the compile,
the warm-up and capture of a graph, nor ``fit()``'s start. The compiled engine and the
graph processor are also warmed (compiled, captured) in an untimed run first. During each
engine run a task on the event loop sleeps 1 ms at a time and records how late it wakes:
the p99 lateness says whether the loop stayed responsive.

Prints ms/step and each variant's time against the hand-written graph. Then, for the
compiled engine, a second ``fit()`` with the same model and batch processor: on the compute
thread of the first (what the engine does: CUDA-graph trees are per thread) against a new
thread (the idle one held by another lease meanwhile), to show what keeping the thread saves.
Run: python benchmarks/graphs.py [--steps 300] [--rounds 3]   (``--device cpu --steps 3
--rounds 1`` smoke-tests the eager and compiled paths on a CPU; the graphs need CUDA)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import anyio
import torch
from _common import device_arguments, machine, median, table
from gpu import WORKLOADS, dataset
from torch import nn

from asynchat import (
    BasicBatchProcessor,
    BatchProcessor,
    Callback,
    CudaGraphBatchProcessor,
    LoopState,
    Trainer,
)
from asynchat._compute import ComputeThread

DEVICE = torch.device("cuda")
WARM_STEPS = 10  # steps an engine run takes before its clock starts


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def batches(shape: tuple[int, ...], batch: int, steps: int) -> list[tuple[torch.Tensor, ...]]:
    data = dataset(shape, batch, steps).tensors
    return [
        (data[0][i : i + batch].to(DEVICE), data[1][i : i + batch].to(DEVICE))
        for i in range(0, batch * steps, batch)
    ]


def setup(make: Callable[[], nn.Module]) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = make().to(DEVICE)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def hand_graph(make: Callable[[], nn.Module], data: list[Any], amp: str | None) -> float:
    """The floor: one captured whole step, replayed with each batch copied in."""
    model, optimizer = setup(make)
    loss_fn = nn.CrossEntropyLoss()
    static_x, static_y = (t.clone() for t in data[0])

    def step() -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16, enabled=amp == "bf16", cache_enabled=False):
            loss = loss_fn(model(static_x), static_y)
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    synchronize()
    start = time.perf_counter()
    for x, y in data:
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        graph.replay()
    synchronize()
    return (time.perf_counter() - start) / len(data)


class Clock(Callback):
    """Times the steps after ``WARM_STEPS`` on the compute thread, the device synchronized."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == WARM_STEPS:
            synchronize()
            self.start = time.perf_counter()
        self.steps = state.global_step - WARM_STEPS

    def on_loop_end(self, state: LoopState) -> None:
        synchronize()
        self.end = time.perf_counter()

    def per_step(self) -> float:
        assert self.steps > 0, f"a timed run needs more than {WARM_STEPS} steps"
        return (self.end - self.start) / self.steps


async def lateness(samples: list[float]) -> None:
    while True:
        start = time.perf_counter()
        await anyio.sleep(0.001)
        samples.append(time.perf_counter() - start - 0.001)


def engine(
    model: nn.Module, optimizer: torch.optim.Optimizer, processor: BatchProcessor, data: list[Any]
) -> tuple[float, float]:
    """Seconds a steady-state step, and the event loop's p99 lateness (s) during the run."""
    clock = Clock()
    trainer = Trainer(model, data, optimizer, batch_processor=processor, num_epochs=1,
                      device=DEVICE, callbacks=[clock])  # fmt: skip
    late: list[float] = []

    async def run() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lateness, late)
            await trainer.fit()
            tasks.cancel_scope.cancel()

    anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    late.sort()
    return clock.per_step(), late[int(0.99 * (len(late) - 1))] if late else 0.0


def variants(amp: Any) -> dict[str, Callable[[], BatchProcessor]]:
    loss = nn.CrossEntropyLoss()
    found: dict[str, Callable[[], BatchProcessor]] = {
        "eager engine": lambda: BasicBatchProcessor(loss, amp=amp),
        'engine, compile={"mode": "reduce-overhead"}': lambda: BasicBatchProcessor(
            loss, amp=amp, compile={"mode": "reduce-overhead"}
        ),
    }
    if DEVICE.type == "cuda":
        found["engine, CudaGraphBatchProcessor"] = lambda: CudaGraphBatchProcessor(loss, amp=amp)
    return found


def measure(
    make: Callable[[], nn.Module], data: list[Any], amp: str | None, rounds: int
) -> dict[str, tuple[float, float]]:
    """Median (seconds a step, p99 lateness) per variant for one workload.

    Each variant trains one model, with one optimizer and batch processor, in all its runs:
    compiled once (a processor compiles in a cache of its own) and warmed in the first.
    """
    runs = {key: (*setup(make), maker()) for key, maker in variants(amp).items()}
    for model, optimizer, processor in runs.values():  # compile, capture, autotune: untimed
        engine(model, optimizer, processor, data[: WARM_STEPS + 10])
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in runs}
    floor = "hand-written graph replay"
    if DEVICE.type == "cuda":
        times[floor] = []
    for _ in range(rounds):
        for key, (model, optimizer, processor) in runs.items():
            times[key].append(engine(model, optimizer, processor, data))
        if DEVICE.type == "cuda":
            times[floor].append((hand_graph(make, data, amp), 0.0))
    return {
        key: (median([t for t, _ in values]), median([late for _, late in values]))
        for key, values in times.items()
    }


def second_fit(make: Callable[[], nn.Module], data: list[Any], amp: str | None) -> list[str]:
    """ms for a second compiled ``fit()`` of ``data``: on the first's thread, on a new one."""
    model, optimizer = setup(make)
    processor = BasicBatchProcessor(
        nn.CrossEntropyLoss(), amp=amp, compile={"mode": "reduce-overhead"}
    )

    def fit() -> Any:
        return Trainer(
            model, data, optimizer, batch_processor=processor, num_epochs=1, device=DEVICE
        ).fit()

    async def run() -> tuple[float, float]:
        await fit()  # compiles and records the trees on the device's compute thread
        seconds = []
        for new_thread in (False, True):
            async with contextlib.AsyncExitStack() as stack:
                if new_thread:  # hold the idle worker, so the fit() below starts another
                    await stack.enter_async_context(ComputeThread(DEVICE))
                synchronize()
                start = time.perf_counter()
                await fit()
                synchronize()
                seconds.append(time.perf_counter() - start)
        return seconds[0], seconds[1]

    same, new = anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    return [f"{1000 * same:.1f}", f"{1000 * new:.1f}", f"{new / same:.2f}x"]


def main() -> None:
    parser = device_arguments(__doc__)
    parser.add_argument("--only", default="", help="run the workloads whose name has this")
    parser.add_argument(
        "--second-fit", default="MLP", help="workloads (names with this) for the second-fit table"
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    print(f"machine: {machine()}")
    print(f"{args.rounds} interleaved rounds of {args.steps} steps, batches on the device; "
          f"medians; engine runs timed after step {WARM_STEPS}", flush=True)  # fmt: skip
    for name, (make, shape, batch, amp) in WORKLOADS.items():
        if args.only not in name:
            continue
        data = batches(shape, batch, args.steps)
        results = measure(make, data, amp, args.rounds)
        base = results.get("hand-written graph replay", results["eager engine"])[0]
        rows = [
            (key, f"{1000 * seconds:.3f}", f"{seconds / base:.2f}x",
             f"{1000 * late:.2f}" if key != "hand-written graph replay" else "-")
            for key, (seconds, late) in results.items()
        ]  # fmt: skip
        # A table per workload, printed as it is done: a run cut short still shows these.
        print(f"\n{name}")
        print(table(["loop", "ms/step", "time vs floor", "loop p99 late ms"], rows), flush=True)
    refits = [
        (name, *second_fit(make, batches(shape, batch, 20), amp))
        for name, (make, shape, batch, amp) in WORKLOADS.items()
        if args.only in name and args.second_fit in name
    ]
    print('\na second compile={"mode": "reduce-overhead"} fit() of 20 steps, same model, processor')
    print(table(["workload", "same thread ms", "new thread ms", "new vs same"], refits))


if __name__ == "__main__":
    main()
