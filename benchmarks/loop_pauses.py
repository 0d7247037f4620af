"""The event loop's longest pauses while a job trains, and how much of them the garbage
collector makes: with nothing done at start-up, after ``asynchat.preload()``, and after
``asynchat.preload(freeze=True)`` (which runs ``gc.collect(); gc.freeze()`` after it).

A full (generation 2) collection runs on whichever thread allocates when it is due and holds
the GIL throughout, pausing every thread, the event loop too; it walks every tracked object
of the process, of which torch and its compiler hold some 300,000. ``gc.freeze()`` at
start-up moves those out of the collector's sight, so later full collections walk only what
was made since. Two jobs, each in a fresh process per variant, an ``asyncio.sleep(0.001)``
ticker measuring the loop's lateness throughout:

- ``checkpoint``: a model of 2,000 linear layers (4,000 parameter tensors; with Adam's
  states, 12,000) trained 2 steps with a ``Checkpoint`` at each: its host snapshot and
  ``torch.save`` make tens of thousands of objects.
- ``compile``: a small MLP trained with ``BasicBatchProcessor(compile=True)`` and torch's
  compiler caches off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``), i.e. a cold compile.
- ``big-tensor``: one 512 MiB weight (a 16384x8192 linear layer, plain SGD) trained 2 steps
  with a ``Checkpoint`` at each: few objects, many bytes (``torch.save``'s copies).
- ``profile``: a 4-layer Transformer encoder (width 64) trained 6 steps with a ``Profiler``
  recording steps 2-4 (12,000 events): stopping the recording, writing its trace and
  making its table of ops.

Run: python benchmarks/loop_pauses.py [--rounds 3] [--jobs checkpoint compile big-tensor
profile] (``profile`` is not among the defaults)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import full_collections, machine, median, table

VARIANTS = {
    "nothing at start-up (baseline)": "none",
    "asynchat.preload()": "preload",
    "preload(freeze=True)": "freeze",
}


def _job(kind: str, save_dir: str) -> Any:
    import torch
    from torch import nn

    from asynchat import BasicBatchProcessor, Trainer
    from asynchat.callbacks import Checkpoint, Profiler

    inputs, outputs = (8192, 16384) if kind == "big-tensor" else (16, 16)
    data = [(torch.randn(8, inputs), torch.randn(8, outputs)) for _ in range(2)]
    callbacks: list[Any] = [Checkpoint(save_dir, every_n_steps=1)]
    if kind == "checkpoint":
        model: nn.Module = nn.Sequential(*[nn.Linear(16, 16) for _ in range(2000)])
    elif kind == "big-tensor":
        model = nn.Linear(inputs, outputs, bias=False)
    elif kind == "profile":
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        model = nn.TransformerEncoder(layer, num_layers=4)
        data = [(torch.randn(8, 32, 64), torch.randn(8, 32, 64)) for _ in range(6)]
        callbacks = [Profiler(save_dir, wait=0, warmup=1, active=3)]
    else:
        model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        callbacks = []
    optimizer = (  # (SGD: the big tensor's checkpoint is the weight alone)
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.01))
        if kind == "big-tensor"
        else (lambda m: torch.optim.Adam(m.parameters()))
    )
    processor = BasicBatchProcessor(nn.MSELoss(), compile=kind == "compile")
    return Trainer(model, data, optimizer, batch_processor=processor, num_steps=len(data),
                   callbacks=callbacks)  # fmt: skip


async def _measure(kind: str, save_dir: str) -> dict[str, float]:
    trainer = _job(kind, save_dir)
    lateness: list[float] = []
    done = False

    async def tick() -> None:
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lateness.append(time.perf_counter() - before - 0.001)

    ticker = asyncio.create_task(tick())
    pauses = full_collections()  # (the child process ends with the job)
    await trainer.fit()
    done = True
    await ticker
    return {"late": max(lateness), "collections": len(pauses), "longest": max(pauses, default=0)}


def _child(kind: str, variant: str) -> None:
    import asynchat

    if variant in ("preload", "freeze"):
        asynchat.preload(freeze=variant == "freeze")
    with tempfile.TemporaryDirectory() as save_dir:
        print(json.dumps(asyncio.run(_measure(kind, save_dir))))


def _run(kind: str, variant: str) -> dict[str, float]:
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, variant],
        capture_output=True, text=True, check=True, env=env,
    ).stdout  # fmt: skip
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", nargs="+", default=["checkpoint", "compile", "big-tensor"],
                        choices=["checkpoint", "compile", "big-tensor", "profile"])  # fmt: skip
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        _child(*options.child)
        return
    rows = []
    for kind in options.jobs:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
        for _ in range(options.rounds):
            for name, variant in VARIANTS.items():
                runs[name].append(_run(kind, variant))
        base = median([r["late"] for r in runs["nothing at start-up (baseline)"]])
        for name, results in runs.items():
            late = median([r["late"] for r in results])
            rows.append((kind, name, f"{late * 1e3:.0f}", f"{late / base:.2f}x",
                         f"{median([r['collections'] for r in results]):g}",
                         f"{median([r['longest'] for r in results]) * 1e3:.0f}"))  # fmt: skip
    print(machine())
    print(f"medians of {options.rounds} rounds, each variant in a fresh process\n")
    print(table(["job", "at start-up", "loop's longest pause ms", "vs baseline",
                 "full collections", "longest ms"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
