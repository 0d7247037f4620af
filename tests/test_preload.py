"""``asynchat.preload()``: a process's first training imports nothing heavy once it ran.

Each case runs in a fresh interpreter: the suite's own process imported everything long ago.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: What the first training of a process imports unless preloaded: the first optimizer
#: imports torch._dynamo, which brings sympy and torch.fx's symbolic shapes.
HEAVY = ("torch._dynamo", "sympy", "torch.fx.experimental")

FIRST_TRAINING = """
import json, sys
import anyio, torch
from torch import nn
import asynchat

for _ in range(int(sys.argv[1])):
    asynchat.preload()
before = set(sys.modules)
data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(3)]
trainer = asynchat.Trainer(nn.Linear(4, 1), data, lambda m: torch.optim.AdamW(m.parameters()),
                           loss_fn=nn.MSELoss(), num_epochs=1)
anyio.run(trainer.fit)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def imported_by_first_training(preloads: int) -> list[str]:
    """The heavy modules a fresh process's first ``fit()`` imports, after ``preloads``
    calls of ``asynchat.preload()``."""
    out = subprocess.run(
        [sys.executable, "-c", FIRST_TRAINING, str(preloads)],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return [name for name in json.loads(out) if name.startswith(HEAVY)]


def test_the_first_training_of_a_process_imports_torch_dynamo_on_its_compute_thread() -> None:
    """Why preload exists: without it the import (and its garbage collections, which pause
    the event loop) happens as the first job starts."""
    assert "torch._dynamo" in imported_by_first_training(0)


@pytest.mark.parametrize("preloads", [1, 2])
def test_after_preload_the_first_training_imports_nothing_heavy(preloads: int) -> None:
    assert imported_by_first_training(preloads) == []


FROZEN_AT_START_UP = """
import gc, sys
import asynchat

class Held:
    def __del__(self):
        print("freed", file=sys.stderr, flush=True)

held = Held()  # (alive until the teardown, in a reference cycle: freed by the collector)
held.cycle = held
asynchat.preload(freeze=True)
print(gc.get_freeze_count(), flush=True)
asynchat.preload(freeze=True)  # (again: one unfreeze at the exit all the same)
"""


def test_preload_freezes_what_start_up_made_and_unfreezes_it_at_exit() -> None:
    # Regression: a service's `gc.freeze()` (as the README had it: preload(), gc.collect(),
    # gc.freeze()) kept what start-up made from being freed by the interpreter's teardown,
    # where with torch 2.15's CUDA build triton's extension reported those objects, some
    # 30 lines of "nanobind: leaked ..." at every exit. preload(freeze=True) collects and
    # freezes them, and unfreezes them as the process exits: the teardown frees them.
    run = subprocess.run(
        [sys.executable, "-c", FROZEN_AT_START_UP], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[0]) > 10_000  # (torch and what it imports: frozen)
    assert run.stderr.count("freed") == 1, run.stderr  # (frozen for good: never)


def test_preload_takes_freeze_as_a_bool() -> None:
    import asynchat

    with pytest.raises(TypeError, match="freeze must be True or False, got 'yes'"):
        asynchat.preload(freeze="yes")  # type: ignore[arg-type]
