"""The garbage collector's pauses and the private memory of launched ranks, with the fork
server's objects frozen (``gc.freeze()`` once its preloads are in: the default) and not.

A rank forked from the server shares the server's memory until it writes to a page; a
full collection writes to every object it walks (their reference counts and collector
links), so unfrozen, each full collection of a rank both pauses it for as long as it walks
the server's ~300,000 objects (and, in a DDP job, every rank waits for it at the next
collective) and copies their pages into the rank's own memory. The job: two ranks of a
``DistributedDataParallelTrainer`` over a model of 2,000 linear layers with Adam, 3 steps,
a ``Checkpoint`` at each (its host snapshot and ``torch.save`` make tens of thousands of
objects). Each variant launches twice from a fresh launcher process (the second launch
is measured: the server is started by the first), ``--rounds`` times; the table gives
medians over rounds and ranks.

Run: python benchmarks/rank_pauses.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import full_collections, machine, median, table

HERE = Path(__file__).resolve().parent
#: A module the unfrozen variant's fork server imports first: it makes gc.freeze a no-op.
NO_FREEZE = "_rank_pauses_no_freeze"


def _memory() -> dict[str, int]:
    """This process's resident memory by kind, in MiB (Linux)."""
    kinds = {}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            key, _, value = line.partition(":")
            if key in ("Rss", "Private_Clean", "Private_Dirty"):
                kinds[key] = int(value.split()[0]) // 1024
    return kinds


async def _job(rank: int, world_size: int, out: str, save_dir: str) -> None:
    import torch
    from torch import nn

    from asynchat import DistributedDataParallelTrainer
    from asynchat.callbacks import Checkpoint

    pauses = full_collections()
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(2000)])
    data = [(torch.randn(8, 16), torch.randn(8, 16)) for _ in range(4)]
    trainer = DistributedDataParallelTrainer(
        model, data, lambda m: torch.optim.Adam(m.parameters()), loss_fn=nn.MSELoss(),
        num_steps=3, callbacks=[Checkpoint(save_dir, every_n_steps=1)],
    )  # fmt: skip
    begun = time.perf_counter()
    await trainer.fit()
    _report(Path(out, f"rank{rank}.json"), time.perf_counter() - begun, pauses)


def _report(path: Path, fit: float, pauses: list[float]) -> None:
    memory = _memory()
    path.write_text(json.dumps({
        "fit": fit,
        "collections": len(pauses),
        "longest": max(pauses, default=0.0),
        "private": memory["Private_Clean"] + memory["Private_Dirty"],
        "frozen": gc.get_freeze_count(),
    }))  # fmt: skip


def _launcher(frozen: str, out: str) -> None:
    """In a fresh process: launch the job twice; the second one's ranks report."""
    from asynchat import _start_method, launch

    if frozen == "no":
        _start_method.PRELOAD = (NO_FREEZE, *_start_method.PRELOAD)
    for _ in range(2):
        with tempfile.TemporaryDirectory() as save_dir:
            launch(_job, nprocs=2, args=(out, save_dir))


def _run(frozen: bool) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        module = Path(out, f"{NO_FREEZE}.py")
        module.write_text("import gc\n\ngc.freeze = lambda: None\n")
        subprocess.run(
            [sys.executable, __file__, "--launcher", "yes" if frozen else "no", out],
            check=True, env={**os.environ, "PYTHONPATH": f"{out}:{HERE}"},
        )  # fmt: skip
        return [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--launcher", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.launcher:
        _launcher(*options.launcher)
        return
    variants = {"server's objects not frozen (baseline)": False, "frozen (default)": True}
    reports: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(options.rounds):
        for name, frozen in variants.items():
            ranks = _run(frozen)
            assert all((report["frozen"] > 0) == frozen for report in ranks), ranks
            reports[name] += ranks
            each = ", ".join(f"{r['fit']:.2f} s / {r['longest'] * 1e3:.0f} ms" for r in ranks)
            print(f"{name}: fit / longest full collection of each rank: {each}", flush=True)
    base = median([r["longest"] for r in reports["server's objects not frozen (baseline)"]])
    rows = []
    for name, ranks in reports.items():
        longest = median([r["longest"] for r in ranks])
        rows.append((name, f"{longest * 1e3:.0f}", f"{longest / base:.2f}x",
                     f"{median([r['collections'] for r in ranks]):g}",
                     f"{median([r['private'] for r in ranks]):.0f}",
                     f"{median([r['fit'] for r in ranks]):.2f}"))  # fmt: skip
    print(machine())
    print(f"2 DDP ranks, 3 steps with a checkpoint each; medians of {options.rounds} rounds x "
          "2 ranks\n")  # fmt: skip
    print(table(["fork server", "longest full collection ms", "vs baseline",
                 "full collections", "private MiB", "fit s"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
